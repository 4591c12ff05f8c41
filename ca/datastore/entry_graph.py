"""Reads of the registration-entry graph for the node API: children, changes, sync marks.

Owns the queries the node API's authorization walk and entry sync run: entries by parent ID
(many parents per query), entries by ID, the ``entry_changes`` feed after a revision, and the
cheap "has anything changed?" marks a server polls. Read-only; it must not decide what an agent
is authorized for (``ca.nodeapi.authz`` does).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import func, select

from ..entries import RegistrationEntry
from .models import EntryChangeRow, EntryRow, FederatedBundleRow
from .nodes import nodes_revision
from .repository import BUNDLE_SEQUENCE, Tx
from .repository import _entry_from_row as entry_from_row  # the one row -> entry mapping

IN_CHUNK = 500  # parameters per IN (...) query: well below SQLite's and PostgreSQL's limits

_T = TypeVar("_T")


@dataclass(frozen=True)
class EntryChange:
    revision: int
    entry_id: str
    op: str  # create | update | delete
    at: datetime


@dataclass(frozen=True)
class SyncMarks:
    """What a poll compares: any difference means something an agent may care about changed."""

    entry_revision: int
    bundle_sequence: int
    nodes_revision: int
    federated: tuple[int, datetime | None]  # (count, latest update) of federated bundles


def _chunks(values: Collection[_T], size: int = IN_CHUNK) -> Iterator[list[_T]]:
    items = list(values)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def children_of(tx: Tx, parent_ids: Collection[str]) -> list[RegistrationEntry]:
    """Every entry whose parent_id is one of ``parent_ids``."""
    found: list[RegistrationEntry] = []
    for chunk in _chunks(sorted(parent_ids)):
        rows = tx.session.scalars(select(EntryRow).where(EntryRow.parent_id.in_(chunk)))
        found.extend(entry_from_row(r) for r in rows)
    return found


def entries_by_id(tx: Tx, entry_ids: Collection[str]) -> dict[str, RegistrationEntry]:
    found: dict[str, RegistrationEntry] = {}
    for chunk in _chunks(sorted(entry_ids)):
        for row in tx.session.scalars(select(EntryRow).where(EntryRow.id.in_(chunk))):
            found[row.id] = entry_from_row(row)
    return found


def max_revision(tx: Tx) -> int:
    return tx.session.scalar(select(func.max(EntryChangeRow.revision))) or 0


def min_revision(tx: Tx) -> int:
    return tx.session.scalar(select(func.min(EntryChangeRow.revision))) or 0


def _change(row: EntryChangeRow) -> EntryChange:
    return EntryChange(row.revision, row.entry_id, row.op, row.at)


def changes_after(tx: Tx, revision: int, *, also: Collection[int] = ()) -> list[EntryChange]:
    """Changes with a larger revision, plus those among ``also`` (revisions seen missing)."""
    query = select(EntryChangeRow).where(EntryChangeRow.revision > revision)
    changes = [_change(r) for r in tx.session.scalars(query.order_by(EntryChangeRow.revision))]
    for chunk in _chunks(sorted(also)):
        rows = tx.session.scalars(select(EntryChangeRow).where(EntryChangeRow.revision.in_(chunk)))
        changes.extend(_change(r) for r in rows)
    return sorted(changes, key=lambda c: c.revision)


def change_at(tx: Tx, revision: int) -> EntryChange | None:
    row = tx.session.get(EntryChangeRow, revision)
    return None if row is None else _change(row)


def changes_between(tx: Tx, low: int, high: int, *, since: datetime) -> list[EntryChange]:
    """Changes with low < revision <= high made at or after ``since``."""
    query = (
        select(EntryChangeRow)
        .where(
            EntryChangeRow.revision > low,
            EntryChangeRow.revision <= high,
            EntryChangeRow.at >= since,
        )
        .order_by(EntryChangeRow.revision)
    )
    return [_change(r) for r in tx.session.scalars(query)]


def present_revisions(tx: Tx, revisions: Sequence[int]) -> set[int]:
    found: set[int] = set()
    for chunk in _chunks(revisions):
        found.update(
            tx.session.scalars(
                select(EntryChangeRow.revision).where(EntryChangeRow.revision.in_(chunk))
            )
        )
    return found


def sync_marks(tx: Tx) -> SyncMarks:
    count, latest = tx.session.execute(
        select(func.count(), func.max(FederatedBundleRow.updated_at)).select_from(
            FederatedBundleRow
        )
    ).one()
    return SyncMarks(
        entry_revision=max_revision(tx),
        bundle_sequence=tx.counter(BUNDLE_SEQUENCE),
        nodes_revision=nodes_revision(tx),
        federated=(int(count), latest),
    )
