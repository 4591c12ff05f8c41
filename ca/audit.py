"""The audit log's hash chain: event digests and chain verification.

Pure: the datastore appends events in the same transaction as the change they record; this module
only says what an event's hash is and whether a sequence of events is intact. Each event's hash
covers its own fields and the previous event's hash, so editing, removing or reordering any event
breaks every later link, and the stored chain head exposes removal of the newest events.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

GENESIS_HASH = "0" * 64  # the "previous hash" of the first event

# What ``json.dumps`` builds on every call with these options, built once: the text is the same,
# and every stored hash depends on it staying the same.
_DETAILS_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)
_HASH_BODY_ENCODER = json.JSONEncoder(separators=(",", ":"))


class EventKind:
    """Names of audited events (strings, so new kinds need no migration)."""

    ENTRY_CREATED = "entry.created"
    ENTRY_UPDATED = "entry.updated"
    ENTRY_DELETED = "entry.deleted"
    TOKEN_CREATED = "token.created"  # noqa: S105 - an event name, not a secret
    TOKEN_USED = "token.used"  # noqa: S105 - an event name, not a secret
    X509_SVID_ISSUED = "x509_svid.issued"
    JWT_SVID_ISSUED = "jwt_svid.issued"
    AUTHORITY_PREPARED = "authority.prepared"
    AUTHORITY_ACTIVATED = "authority.activated"
    AUTHORITY_TAINTED = "authority.tainted"
    AUTHORITY_REVOKED = "authority.revoked"
    AUTHORITY_EXPIRED = "authority.expired"
    BUNDLE_CHANGED = "bundle.changed"
    FEDERATED_BUNDLE_SET = "federated_bundle.set"
    FEDERATED_BUNDLE_DELETED = "federated_bundle.deleted"
    ADMIN_LOGIN = "admin.login"
    SERVER_STARTED = "server.started"
    AGENT_ATTESTED = "agent.attested"
    AGENT_RENEWED = "agent.renewed"
    AGENT_BANNED = "agent.banned"
    AGENT_EVICTED = "agent.evicted"
    POLICY_APPLIED = "policy.applied"
    POLICY_DELETED = "policy.deleted"


@dataclass(frozen=True)
class AuditEvent:
    """One link of the chain as stored."""

    seq: int
    at: datetime
    kind: str
    actor: str
    spiffe_id: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str


def canonical_details(details: dict[str, Any]) -> str:
    """The JSON text stored and hashed for ``details`` (sorted keys, no spaces)."""
    return _DETAILS_ENCODER.encode(details)


def event_hash(
    *,
    seq: int,
    at: datetime,
    kind: str,
    actor: str,
    spiffe_id: str | None,
    details_json: str,
    prev_hash: str,
) -> str:
    """SHA-256 over the previous hash and every field of the event."""
    body = _HASH_BODY_ENCODER.encode(
        [prev_hash, seq, at.isoformat(), kind, actor, spiffe_id, details_json]
    )
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class ChainVerdict:
    """Result of walking the chain: ``ok`` or the first broken event and why."""

    ok: bool
    events_checked: int
    first_bad_seq: int | None = None
    reason: str = ""


def verify_chain(events: Iterable[AuditEvent], *, head_seq: int, head_hash: str) -> ChainVerdict:
    """Walk ``events`` in seq order; name the first event altered or removed."""
    prev_hash = GENESIS_HASH
    expected_seq = 1
    count = 0
    for ev in events:
        count += 1
        if ev.seq != expected_seq:
            return ChainVerdict(
                False, count, expected_seq, f"event {expected_seq} is missing (next is {ev.seq})"
            )
        if ev.prev_hash != prev_hash:
            return ChainVerdict(
                False, count, ev.seq, f"event {ev.seq} does not link to event {ev.seq - 1}"
            )
        recomputed = event_hash(
            seq=ev.seq,
            at=ev.at,
            kind=ev.kind,
            actor=ev.actor,
            spiffe_id=ev.spiffe_id,
            details_json=canonical_details(ev.details),
            prev_hash=ev.prev_hash,
        )
        if recomputed != ev.hash:
            return ChainVerdict(
                False, count, ev.seq, f"event {ev.seq} ({ev.kind}) was altered after it was written"
            )
        prev_hash = ev.hash
        expected_seq += 1
    last_seq = expected_seq - 1
    if last_seq != head_seq:
        return ChainVerdict(
            False,
            count,
            last_seq + 1,
            f"the chain ends at event {last_seq} but {head_seq} were written: "
            f"event {last_seq + 1} onwards removed",
        )
    if prev_hash != head_hash:
        return ChainVerdict(False, count, last_seq, f"event {last_seq} differs from the chain head")
    return ChainVerdict(True, count)
