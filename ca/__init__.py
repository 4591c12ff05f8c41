"""The meshid certificate authority server."""
