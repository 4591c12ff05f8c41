"""The repository suite, run on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from spiffe import TrustDomain
from sqlalchemy import text

from ca.audit import GENESIS_HASH, verify_chain
from ca.datastore import AuditRecord, AuthorityRecord, Datastore, DatastoreError
from ca.entries import EntrySpec, validate_entry
from ca.errors import Conflict, NotFound

TD = TrustDomain("example.org")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> Iterator[Datastore]:
    ds = Datastore(database_url)
    ds.migrate()
    yield ds
    ds.close()


def _entry(
    spiffe_id: str = "spiffe://example.org/web", selectors: tuple[str, ...] = ("unix:uid:1000",)
):
    return validate_entry(
        EntrySpec(spiffe_id=spiffe_id, parent_id="spiffe://example.org/node", selectors=selectors),
        TD,
    )


def test_migrate_is_idempotent(store: Datastore) -> None:
    store.migrate()
    with store.read() as tx:
        assert tx.audit_head()[0] == 0


def test_entry_roundtrip_and_revisions(store: Datastore) -> None:
    with store.write() as tx:
        created = tx.create_entry(_entry(), NOW)
    with store.write() as tx:
        updated = tx.update_entry(replace(_entry(selectors=("unix:uid:1001",)), id=created.id), NOW)
    assert updated.revision > created.revision
    with store.read() as tx:
        got = tx.get_entry(created.id)
    assert [str(s) for s in got.selectors] == ["unix:uid:1001"]
    assert got.created_at == NOW and got.created_at.tzinfo is not None
    with store.write() as tx:
        deleted = tx.delete_entry(created.id, NOW)
    assert deleted.revision > updated.revision
    with store.read() as tx, pytest.raises(NotFound):
        tx.get_entry(created.id)


def test_duplicate_entry_rejected_and_nothing_written(store: Datastore) -> None:
    with store.write() as tx:
        tx.create_entry(_entry(), NOW)
    with (
        pytest.raises(Conflict, match="same spiffe_id, parent_id and selectors"),
        store.write() as tx,
    ):
        tx.append_audit(kind="entry.created", actor="test", now=NOW)
        tx.create_entry(_entry(), NOW)
    with store.read() as tx:
        assert tx.count_entries() == 1
        assert tx.audit_head()[0] == 0  # the audit append rolled back with the failed create


def test_audit_chain_verifies_and_detects_tampering(store: Datastore) -> None:
    with store.write() as tx:
        for i in range(5):
            tx.append_audit(kind="entry.created", actor="uid:0", now=NOW, details={"i": i})
    with store.read() as tx:
        seq, head = tx.audit_head()
        assert verify_chain(tx.iter_audit(), head_seq=seq, head_hash=head).ok
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET details = :d WHERE seq = 3"), {"d": '{"i":42}'})
    with store.read() as tx:
        verdict = verify_chain(tx.iter_audit(), head_seq=seq, head_hash=head)
    assert not verdict.ok and verdict.first_bad_seq == 3


def test_audit_removed_tail_detected(store: Datastore) -> None:
    with store.write() as tx:
        for _ in range(3):
            tx.append_audit(kind="entry.created", actor="uid:0", now=NOW)
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    with store.read() as tx:
        seq, head = tx.audit_head()
        verdict = verify_chain(tx.iter_audit(), head_seq=seq, head_hash=head)
    assert not verdict.ok and verdict.first_bad_seq == 3 and "removed" in verdict.reason


def _authority(authority_id: str) -> AuthorityRecord:
    return AuthorityRecord(
        id=authority_id,
        kind="x509",
        server_id="test",
        status="active",
        key_id="k",
        key_type="ec-p256",
        certificate=None,
        chain=b"",
        public_key=b"",
        kid=None,
        not_before=NOW,
        not_after=NOW + timedelta(days=1),
        tainted=False,
        created_at=NOW,
        activated_at=None,
        revoked_at=None,
    )


def test_audit_batch_stores_times_as_the_typed_columns_do(store: Datastore) -> None:
    """Batch-appended times compare, sort and read back like every other stored time."""
    plus_two = timezone(timedelta(hours=2))
    exact = NOW.astimezone(plus_two)  # whole seconds, given in another zone
    later = NOW + timedelta(microseconds=1)
    expiries = [NOW + timedelta(hours=1), NOW + timedelta(hours=2, microseconds=5)]
    with store.write() as tx:
        tx.insert_authority(_authority("x509-a"))
        tx.insert_token("t1", "h1", None, NOW, NOW + timedelta(hours=1))  # an ORM-typed write
        events = tx.append_audit_batch(
            [
                AuditRecord("x509_svid.issued", "test", exact, "spiffe://example.org/a",
                            {"n": 1}, "x509-a", expiries[0]),
                AuditRecord("x509_svid.issued", "test", later, "spiffe://example.org/b",
                            {"n": 2}, "x509-a", expiries[1].astimezone(plus_two)),
                AuditRecord("x509_svid.issued", "test", later, None, {}, None, None),
            ]
        )  # fmt: skip
    assert [e.seq for e in events] == [1, 2, 3]
    with store.read() as tx:
        stored = tx.list_audit()
        assert [(e.at, e.hash) for e in stored] == [(e.at, e.hash) for e in events]
        assert all(e.at.tzinfo == UTC for e in stored) and stored[0].at == NOW
        assert [e.seq for e in tx.list_audit(since=NOW)] == [1, 2, 3]
        assert [e.seq for e in tx.list_audit(since=later)] == [2, 3]
        assert tx.latest_svid_not_after("x509-a") == expiries[1]
        seq, head = tx.audit_head()
        assert verify_chain(tx.iter_audit(), head_seq=seq, head_hash=head).ok
    with store.engine.connect() as conn:
        audit_at = conn.execute(text("SELECT at FROM audit_events WHERE seq = 1")).scalar_one()
        token_at = conn.execute(text("SELECT created_at FROM join_tokens")).scalar_one()
    assert audit_at == token_at  # the same stored form for the same instant


def test_audit_refuses_a_naive_time_and_writes_nothing(store: Datastore) -> None:
    with (
        pytest.raises(DatastoreError, match="naive datetime"),
        store.write() as tx,
    ):
        tx.append_audit(kind="entry.created", actor="test", now=NOW)
        tx.append_audit(kind="entry.created", actor="test", now=NOW.replace(tzinfo=None))
    with store.read() as tx:
        assert tx.audit_head() == (0, GENESIS_HASH)
        assert tx.list_audit() == []


def test_join_token_single_use_and_expiry(store: Datastore) -> None:
    with store.write() as tx:
        tx.insert_token("t1", "h1", None, NOW, NOW + timedelta(seconds=600))
        tx.insert_token("t2", "h2", None, NOW, NOW + timedelta(seconds=1))
    with store.write() as tx:
        assert tx.redeem_token("h1", NOW) is not None
    with store.write() as tx:
        assert tx.redeem_token("h1", NOW) is None
        assert tx.redeem_token("h2", NOW + timedelta(seconds=2)) is None


def test_the_background_checkpointer_moves_the_wal_into_the_database(tmp_path: Path) -> None:
    """Committed pages reach the database file without a transaction paying for it: the
    checkpointer thread copies them while nothing else writes, and ``close`` stops it."""
    db = tmp_path / "ca.sqlite3"
    ds = Datastore(f"sqlite:///{db}")
    ds.migrate()
    with ds.write() as tx:
        for i in range(300):
            tx.append_audit(kind="entry.created", actor="uid:0", now=NOW, details={"i": i})
    size = db.stat().st_size  # the WAL holds those pages; the threshold is far away
    ds.start_checkpointer(interval=0.02)
    checkpointer = ds._checkpointer
    assert checkpointer is not None
    deadline = time.monotonic() + 10
    while db.stat().st_size == size:
        assert time.monotonic() < deadline, "no checkpoint within 10 s"
        time.sleep(0.02)
    ds.close()
    assert not checkpointer._thread.is_alive()
    reopened = Datastore(f"sqlite:///{db}")
    with reopened.read() as tx:  # and the data is whole
        assert tx.audit_head()[0] >= 300
    reopened.close()


def test_no_checkpointer_where_there_is_no_sqlite_file() -> None:
    ds = Datastore("sqlite://")
    ds.start_checkpointer()
    assert ds._checkpointer is None
    ds.close()
