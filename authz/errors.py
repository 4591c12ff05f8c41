"""Errors of the authorization package.

``AuthzError`` is the package root. ``PolicyError`` is the only subclass: a policy document or a
policy set breaks a rule. Evaluation never raises; only parsing and compiling do.
"""

from __future__ import annotations


class AuthzError(Exception):
    """Root of every error raised by the ``authz`` package."""


class PolicyError(AuthzError):
    """A policy breaks a rule.

    ``source`` names where the policy came from (a file name, ``<stdin>``, a stored policy name),
    ``line`` is 1-based when the source is text and ``None`` otherwise, ``path`` is the key path
    inside the document (``spec.rules[0].from[0].source.principals[1]``) and ``expected`` says
    what the rule wants, with the offending value.
    """

    def __init__(self, source: str, path: str, expected: str, line: int | None = None) -> None:
        self.source = source
        self.path = path
        self.expected = expected
        self.line = line
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {path or '<document>'}: {expected}")
