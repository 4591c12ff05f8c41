"""Signing-authority slots and the rotation planner.

Owns the lifecycle SPIRE uses: an authority is *prepared* (published in the bundle, not yet
signing), then *active* (signing), then *old* (still trusted until it expires or is revoked).
``plan`` decides; the rotator in ``ca.rotator`` acts. Pure: it takes the slots and the time and
returns actions, so tests step an injected clock through whole rotations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

PREPARE_DIVISOR = 2  # prepare the next authority once half of the active one's lifetime is gone
ACTIVATION_DIVISOR = 6  # activate the next authority when 1/6 of the current one's lifetime is left
DEFAULT_CA_TTL = timedelta(hours=24)  # SPIRE's default; SVIDs (1 h) fit many times inside it


class AuthorityKind(StrEnum):
    """What an authority signs."""

    X509 = "x509"
    JWT = "jwt"


class Status(StrEnum):
    """Where an authority is in its lifecycle."""

    PREPARED = "prepared"
    ACTIVE = "active"
    OLD = "old"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Slot:
    """What the planner needs to know about one authority of this server."""

    id: str
    kind: AuthorityKind
    status: Status
    not_before: datetime
    not_after: datetime
    tainted: bool = False

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    def prepare_next_at(self) -> datetime:
        return self.not_before + self.lifetime / PREPARE_DIVISOR

    def activate_next_at(self) -> datetime:
        return self.not_after - self.lifetime / ACTIVATION_DIVISOR


@dataclass(frozen=True)
class Prepare:
    """Create a new authority of ``kind`` and publish it in the bundle without signing."""

    kind: AuthorityKind


@dataclass(frozen=True)
class Activate:
    """Make the prepared authority ``id`` the signer; the active one becomes old.

    ``id`` is None when the authority to activate is the one a preceding ``Prepare`` creates.
    """

    id: str | None
    kind: AuthorityKind


@dataclass(frozen=True)
class Expire:
    """Drop the old authority ``id`` from the bundle: it and everything it signed expired."""

    id: str
    kind: AuthorityKind


Action = Prepare | Activate | Expire


def plan(slots: Sequence[Slot], now: datetime) -> list[Action]:
    """Decide what the rotator must do now, for every kind, in order."""
    actions: list[Action] = []
    for kind in AuthorityKind:
        actions.extend(_plan_kind([s for s in slots if s.kind == kind], kind, now))
    return actions


def _plan_kind(slots: Sequence[Slot], kind: AuthorityKind, now: datetime) -> list[Action]:
    actions: list[Action] = []
    active = _newest(s for s in slots if s.status == Status.ACTIVE)
    prepared = _newest(s for s in slots if s.status == Status.PREPARED)
    if prepared is not None and prepared.not_after <= now:
        prepared = None  # an expired prepared authority is useless; prepare afresh
    if active is None or active.not_after <= now:
        # First start, or the server was down past the active authority's life: a prepared
        # authority is already in the bundle, so it can sign at once; otherwise make one.
        if prepared is None:
            actions.append(Prepare(kind))
        actions.append(Activate(prepared.id if prepared else None, kind))
    elif prepared is None and now >= active.prepare_next_at():
        actions.append(Prepare(kind))
    elif prepared is not None and now >= active.activate_next_at():
        actions.append(Activate(prepared.id, kind))
    for slot in slots:
        if slot.status == Status.OLD and slot.not_after <= now:
            actions.append(Expire(slot.id, kind))
    return actions


def _newest(slots: Iterable[Slot]) -> Slot | None:
    best: Slot | None = None
    for s in slots:
        if best is None or s.not_before > best.not_before:
            best = s
    return best
