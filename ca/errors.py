"""Errors of the CA server.

``CaError`` is the package root. Subclasses exist only where a caller branches on them (the admin
API maps each to a status code). Messages say what failed, the offending value and the rule.
"""

from __future__ import annotations


class CaError(Exception):
    """Root of every error raised by the ``ca`` package."""


class InvalidArgument(CaError):
    """A request field breaks a rule. ``field`` names it, ``rule`` says what was expected."""

    def __init__(self, field: str, rule: str, value: object = None) -> None:
        self.field = field
        self.rule = rule
        self.value = value
        shown = "" if value is None else f" (got {_short(value)})"
        super().__init__(f"{field}: {rule}{shown}")


class NotFound(CaError):
    """The named object does not exist."""


class Conflict(CaError):
    """The request contradicts the current state (duplicate entry, authority in the wrong state)."""


class PermissionDenied(CaError):
    """The caller may not do this."""


class InvalidSvid(CaError):
    """A certificate or token breaks the SPIFFE specification; the message cites the section."""


class AuthorityUnavailable(CaError):
    """No active signing authority can serve the request right now."""


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
