"""Errors of the node API: a refusal carries the terse answer for the peer and the detail for
the log (peers learn little; operators learn why)."""

from __future__ import annotations

from ..errors import PermissionDenied


class Refused(PermissionDenied):
    """The caller may not do this. ``public`` goes to the peer; ``str()`` to the log."""

    def __init__(self, public: str, detail: str | None = None) -> None:
        super().__init__(detail or public)
        self.public = public
