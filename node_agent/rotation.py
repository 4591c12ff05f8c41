"""When the agent renews workload SVIDs: a pure planner.

Owns the decision only (decide, then act): each SVID is renewed once about half of its lifetime
has passed, with jitter so thousands of SVIDs issued together do not all renew in the same
second, and at once when the entry changed, the SVID is missing or expired, or its signing
authority was tainted. The agent's rotator performs the plan.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

RENEW_FRACTION = 0.5  # renew at half the lifetime, as SPIRE does
JITTER_FRACTION = 0.1  # +/- 10 % of the lifetime, as SPIRE does
MAX_CHECK_INTERVAL = timedelta(seconds=30)  # re-plan at least this often (clock jumps, sync)
MIN_CHECK_INTERVAL = timedelta(milliseconds=100)  # never spin


@dataclass(frozen=True)
class HeldSvid:
    """What the planner needs to know about one SVID the agent holds."""

    entry_id: str
    entry_revision: int  # the entry revision it was signed for
    not_before: datetime
    not_after: datetime
    renew_at: datetime  # fixed when the SVID arrived (jitter drawn once)
    authority_key_id: bytes | None = None


@dataclass(frozen=True)
class WantedEntry:
    entry_id: str
    revision: int


@dataclass(frozen=True)
class RenewalPlan:
    sign: tuple[str, ...]  # entry ids to (re)sign now
    drop: tuple[str, ...]  # entry ids whose SVIDs are no longer wanted
    next_check: datetime


def renew_at(not_before: datetime, not_after: datetime, rng: random.Random) -> datetime:
    """The moment to renew an SVID valid from ``not_before`` to ``not_after``."""
    lifetime = not_after - not_before
    fraction = RENEW_FRACTION + rng.uniform(-JITTER_FRACTION, JITTER_FRACTION)
    return not_before + lifetime * fraction


def plan_renewals(
    held: Mapping[str, HeldSvid],
    wanted: Collection[WantedEntry],
    now: datetime,
    *,
    tainted_authorities: Collection[bytes] = (),
) -> RenewalPlan:
    """Decide which entries need a new SVID now, which SVIDs to drop, and when to look again."""
    sign: list[str] = []
    next_check = now + MAX_CHECK_INTERVAL
    wanted_ids = set()
    for entry in wanted:
        wanted_ids.add(entry.entry_id)
        svid = held.get(entry.entry_id)
        if (
            svid is None
            or svid.entry_revision != entry.revision
            or now >= svid.renew_at
            or now >= svid.not_after
            or (svid.authority_key_id is not None and svid.authority_key_id in tainted_authorities)
        ):
            sign.append(entry.entry_id)
        else:
            next_check = min(next_check, svid.renew_at)
    drop = tuple(sorted(set(held) - wanted_ids))
    return RenewalPlan(tuple(sign), drop, max(next_check, now + MIN_CHECK_INTERVAL))
