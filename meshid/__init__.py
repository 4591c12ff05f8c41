"""The ``meshid`` command line and the composition root that wires the packages together.

It holds no domain logic: commands parse flags, call a package or the admin API, and print.
"""
