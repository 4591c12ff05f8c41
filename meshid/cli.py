"""Placeholder."""


def main() -> None:
    """Entry point."""
