"""Persistence for the CA server."""
