"""Attested nodes: the node API's records of the agents that attested, and its cheap reads.

Owns the ``attested_nodes`` table (one row per agent SPIFFE ID: how it attested, its node
selectors and aliases, its current and previous agent SVID serial, the banned flag) and the
``nodes_revision`` counter that every attestation, ban and eviction bumps so that other server
replicas notice. Functions take the ``Tx`` of the caller's transaction: the service appends the
audit event in that same transaction. It must not decide anything (who may attest, what is
authorized): that is ``ca.nodeapi``'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update

from .models import AttestedNodeRow, JoinTokenRow
from .repository import JoinTokenRecord, Tx

NODES_REVISION = "nodes_revision"  # counter row created by migration 0002


@dataclass(frozen=True)
class AttestedNode:
    """An attested agent as stored."""

    spiffe_id: str
    attestation_type: str
    selectors: tuple[str, ...]
    aliases: tuple[str, ...]
    serial: int  # of the current agent SVID
    previous_serial: int | None  # still accepted while the agent switches to the new SVID
    expires_at: datetime
    banned: bool
    created_at: datetime
    attested_at: datetime
    last_seen: datetime
    sync_floor: int = 0  # an agent resuming below this entry revision gets a full snapshot

    def accepts_serial(self, serial: int) -> bool:
        return serial == self.serial or (
            self.previous_serial is not None and serial == self.previous_serial
        )


def _serial_text(serial: int) -> str:
    return f"{serial:x}"


def _node_from_row(row: AttestedNodeRow) -> AttestedNode:
    return AttestedNode(
        spiffe_id=row.spiffe_id,
        attestation_type=row.attestation_type,
        selectors=tuple(json.loads(row.selectors)),
        aliases=tuple(json.loads(row.aliases)),
        serial=int(row.serial, 16),
        previous_serial=int(row.previous_serial, 16) if row.previous_serial else None,
        expires_at=row.expires_at,
        banned=row.banned,
        created_at=row.created_at,
        attested_at=row.attested_at,
        last_seen=row.last_seen,
        sync_floor=row.sync_floor,
    )


def get_node(tx: Tx, spiffe_id: str, *, lock: bool = False) -> AttestedNode | None:
    row = tx.session.get(AttestedNodeRow, spiffe_id, with_for_update=lock)
    return None if row is None else _node_from_row(row)


def list_nodes(tx: Tx) -> list[AttestedNode]:
    rows = tx.session.scalars(select(AttestedNodeRow).order_by(AttestedNodeRow.spiffe_id))
    return [_node_from_row(r) for r in rows]


def save_node(tx: Tx, node: AttestedNode) -> None:
    """Insert the node or replace every field of the stored one (attestation)."""
    row = tx.session.get(AttestedNodeRow, node.spiffe_id, with_for_update=True)
    if row is None:
        row = AttestedNodeRow(spiffe_id=node.spiffe_id)
        tx.session.add(row)
    row.attestation_type = node.attestation_type
    row.selectors = json.dumps(list(node.selectors))
    row.aliases = json.dumps(list(node.aliases))
    row.serial = _serial_text(node.serial)
    row.previous_serial = (
        _serial_text(node.previous_serial) if node.previous_serial is not None else None
    )
    row.expires_at = node.expires_at
    row.banned = node.banned
    row.sync_floor = node.sync_floor
    row.created_at = node.created_at
    row.attested_at = node.attested_at
    row.last_seen = node.last_seen
    tx.session.flush()
    bump_nodes_revision(tx)


def rotate_serial(tx: Tx, spiffe_id: str, serial: int, expires_at: datetime, now: datetime) -> bool:
    """The agent renewed: the new serial becomes current, the current one previous."""
    row = tx.session.get(AttestedNodeRow, spiffe_id, with_for_update=True)
    if row is None:
        return False
    row.previous_serial = row.serial
    row.serial = _serial_text(serial)
    row.expires_at = expires_at
    row.last_seen = now
    tx.session.flush()
    return True


def touch(tx: Tx, spiffe_id: str, now: datetime) -> None:
    tx.session.execute(
        update(AttestedNodeRow).where(AttestedNodeRow.spiffe_id == spiffe_id).values(last_seen=now)
    )


def set_banned(tx: Tx, spiffe_id: str, banned: bool) -> bool:
    result = tx.session.execute(
        update(AttestedNodeRow).where(AttestedNodeRow.spiffe_id == spiffe_id).values(banned=banned)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    bump_nodes_revision(tx)
    return True


def delete_node(tx: Tx, spiffe_id: str) -> bool:
    result = tx.session.execute(
        delete(AttestedNodeRow).where(AttestedNodeRow.spiffe_id == spiffe_id)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    bump_nodes_revision(tx)
    return True


def bump_nodes_revision(tx: Tx) -> int:
    return tx.bump_counter(NODES_REVISION)


def nodes_revision(tx: Tx) -> int:
    return tx.counter(NODES_REVISION)


def find_token(tx: Tx, token_hash: str) -> JoinTokenRecord | None:
    """The join token with this hash, used or not (a read; ``Tx.redeem_token`` consumes it)."""
    row = tx.session.scalar(select(JoinTokenRow).where(JoinTokenRow.token_hash == token_hash))
    if row is None:
        return None
    return JoinTokenRecord(row.id, row.spiffe_id, row.created_at, row.expires_at, row.used_at)
