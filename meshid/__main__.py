"""``python -m meshid``."""

from .cli import main

main()
