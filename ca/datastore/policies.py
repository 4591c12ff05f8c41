"""Stored authorization policies: one row per policy name, the parsed document as JSON.

Owns the ``policies`` table and the ``policies_revision`` counter that every apply and delete
bumps (proxies and other replicas watch it). Functions take the caller's ``Tx`` so the service
appends the audit event in the same transaction. Parsing and validation are ``authz``'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from ..errors import NotFound
from .models import PolicyRow
from .repository import Tx

POLICIES_REVISION = "policies_revision"  # counter row created by migration 0003


@dataclass(frozen=True)
class StoredPolicy:
    name: str
    document: dict[str, Any]
    revision: int
    created_at: datetime
    updated_at: datetime


def _stored(row: PolicyRow) -> StoredPolicy:
    return StoredPolicy(
        row.name, json.loads(row.document), row.revision, row.created_at, row.updated_at
    )


def upsert(tx: Tx, name: str, document: dict[str, Any], now: datetime) -> tuple[StoredPolicy, bool]:
    """Store ``document`` under ``name``; returns it and whether it changed anything."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    row = tx.session.get(PolicyRow, name, with_for_update=True)
    if row is not None and row.document == text:
        return _stored(row), False
    revision = tx.bump_counter(POLICIES_REVISION)
    if row is None:
        row = PolicyRow(name=name, document=text, revision=revision, created_at=now, updated_at=now)
        tx.session.add(row)
    else:
        row.document, row.revision, row.updated_at = text, revision, now
    tx.session.flush()
    return _stored(row), True


def delete(tx: Tx, name: str) -> StoredPolicy:
    row = tx.session.get(PolicyRow, name, with_for_update=True)
    if row is None:
        raise NotFound(f"policy {name!r} not found")
    stored = _stored(row)
    tx.session.delete(row)
    tx.bump_counter(POLICIES_REVISION)
    tx.session.flush()
    return stored


def get(tx: Tx, name: str) -> StoredPolicy:
    row = tx.session.get(PolicyRow, name)
    if row is None:
        raise NotFound(f"policy {name!r} not found")
    return _stored(row)


def list_all(tx: Tx) -> list[StoredPolicy]:
    return [_stored(r) for r in tx.session.scalars(select(PolicyRow).order_by(PolicyRow.name))]


def revision(tx: Tx) -> int:
    return tx.counter(POLICIES_REVISION)
