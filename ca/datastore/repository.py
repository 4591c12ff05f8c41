"""The CA datastore: one repository over SQLite (embedded default) or PostgreSQL.

Owns transactions and the mapping between rows and domain values. Every write goes through
``Datastore.write()``, a single transaction in which the service also appends the audit event
recording the change, so a change and its audit record commit or vanish together.

SQLite runs in WAL mode with foreign keys on and ``synchronous=FULL`` (an acknowledged write
survives a crash of the process or the machine); write transactions start with ``BEGIN
IMMEDIATE`` so concurrent writers queue on the busy timeout instead of failing on lock upgrade.
Checkpoints (copying the WAL back into the database file) run on a background thread started
with the service (``start_checkpointer``), off the path of the transaction that happens to
cross the WAL threshold; SQLite's own auto-checkpoint stays on at a higher threshold as a net.
PostgreSQL serialises audit appends on the ``audit_head`` row lock, which also orders the chain
across server replicas.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from spiffe import SpiffeId, TrustDomain
from sqlalchemy import (
    Engine,
    bindparam,
    column,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from ..audit import GENESIS_HASH, AuditEvent, canonical_details, event_hash
from ..entries import RegistrationEntry, Selector
from ..errors import CaError, Conflict, InvalidArgument, NotFound
from .migrate import upgrade_to_head
from .models import (
    AuditEventRow,
    AuditHeadRow,
    AuthorityRow,
    CounterRow,
    EntryChangeRow,
    EntryRow,
    FederatedBundleRow,
    JoinTokenRow,
)

SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers queue behind each other rather than fail
# The background checkpointer runs every CHECKPOINT_INTERVAL seconds; a committing transaction
# checkpoints itself only past WAL_AUTOCHECKPOINT_PAGES (SQLite's default is 1000: ~4 MiB).
CHECKPOINT_INTERVAL = 1.0
WAL_AUTOCHECKPOINT_PAGES = 10_000

log = logging.getLogger(__name__)
BUNDLE_SEQUENCE = "bundle_sequence"
MIGRATION_LOCK = 0x6D65736869640001  # pg advisory lock key ("meshid" + 1), held while migrating


class DatastoreError(CaError):
    """The database could not be reached or refused an operation."""


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            if conn.get_execution_options().get("meshid_read_only"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True, pool_size=10)
    raise InvalidArgument("database", "must be a sqlite:/// or postgresql:// URL", url)


@dataclass(frozen=True)
class AuthorityRecord:
    """An authority as stored (keys stay in the key manager; only ``key_id`` is here)."""

    id: str
    kind: str
    server_id: str
    status: str
    key_id: str
    key_type: str
    certificate: bytes | None
    chain: bytes
    public_key: bytes
    kid: str | None
    not_before: datetime
    not_after: datetime
    tainted: bool
    created_at: datetime
    activated_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class AuditRecord:
    """An event to append; the datastore gives it its seq and hashes."""

    kind: str
    actor: str
    at: datetime
    spiffe_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    authority_id: str | None = None
    not_after: datetime | None = None


@dataclass(frozen=True)
class JoinTokenRecord:
    id: str
    spiffe_id: str | None
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None


@dataclass(frozen=True)
class FederatedBundleRecord:
    trust_domain: str
    jwks: str
    sequence: int
    endpoint_url: str | None
    endpoint_spiffe_id: str | None
    refreshed_at: datetime | None
    updated_at: datetime


class Datastore:
    """Opens the database, runs migrations, hands out transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self.backend = self.engine.dialect.name
        self._checkpointer: _Checkpointer | None = None

    def start_checkpointer(self, interval: float = CHECKPOINT_INTERVAL) -> None:
        """SQLite files: checkpoint the WAL every ``interval`` seconds on a background thread
        until ``close`` (a no-op for other backends and in-memory databases)."""
        database = make_url(self.url).database
        if self.backend != "sqlite" or not database or database == ":memory:":
            return
        if self._checkpointer is None:
            self._checkpointer = _Checkpointer(database, interval)

    def migrate(self) -> None:
        """Run Alembic migrations to head and make sure the singleton rows exist."""
        try:
            with self.engine.begin() as conn:
                if self.backend == "postgresql":
                    # Replicas starting together take turns; the lock ends with the transaction.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
                upgrade_to_head(conn)
                if self.backend == "postgresql":
                    with Session(bind=conn) as session:
                        Tx(session).ensure_singletons()
            if self.backend != "postgresql":
                with self.write() as tx:
                    tx.ensure_singletons()
        except SQLAlchemyError as err:
            raise DatastoreError(f"cannot migrate the datastore: {err}") from err

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """One read-write transaction; commits on success, rolls back on any error."""
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                with session.begin():
                    yield Tx(session)
            except IntegrityError as err:
                raise Conflict(f"the change conflicts with stored data: {err.orig}") from err
            except SQLAlchemyError as err:
                raise DatastoreError(f"datastore error: {err}") from err

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only transaction (no write lock on SQLite)."""
        conn = self.engine.connect().execution_options(meshid_read_only=True)
        try:
            with Session(bind=conn) as session, session.begin():
                yield Tx(session)
        except SQLAlchemyError as err:
            raise DatastoreError(f"datastore error: {err}") from err
        finally:
            conn.close()


class _Checkpointer:
    """``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection every ``interval`` seconds.

    PASSIVE copies what it can without waiting for readers or blocking writers, so it never
    delays a transaction; sqlite3 releases the GIL while it works. Failures are logged and the
    next round tries again (auto-checkpoint remains the net).
    """

    def __init__(self, database: str, interval: float) -> None:
        self._database = database
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self._database, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            while not self._stopping.wait(self._interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as err:
                    log.warning("WAL checkpoint failed", extra={"error": str(err)})
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


def _dump(values: Sequence[str]) -> str:
    return json.dumps(list(values))


def _entry_from_row(row: EntryRow) -> RegistrationEntry:
    return RegistrationEntry(
        id=row.id,
        spiffe_id=SpiffeId(row.spiffe_id),
        parent_id=SpiffeId(row.parent_id),
        selectors=tuple(Selector.parse(s) for s in json.loads(row.selectors)),
        x509_svid_ttl=timedelta(seconds=row.x509_svid_ttl) if row.x509_svid_ttl else None,
        jwt_svid_ttl=timedelta(seconds=row.jwt_svid_ttl) if row.jwt_svid_ttl else None,
        dns_names=tuple(json.loads(row.dns_names)),
        hint=row.hint,
        admin=row.admin,
        downstream=row.downstream,
        federates_with=tuple(TrustDomain(t) for t in json.loads(row.federates_with)),
        expires_at=row.expires_at,
        revision=row.revision,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _fill_entry_row(row: EntryRow, entry: RegistrationEntry) -> None:
    row.spiffe_id = str(entry.spiffe_id)
    row.parent_id = str(entry.parent_id)
    row.selectors = _dump([str(s) for s in entry.selectors])
    row.selectors_key = entry.selectors_key
    row.x509_svid_ttl = int(entry.x509_svid_ttl.total_seconds()) if entry.x509_svid_ttl else 0
    row.jwt_svid_ttl = int(entry.jwt_svid_ttl.total_seconds()) if entry.jwt_svid_ttl else 0
    row.dns_names = _dump(entry.dns_names)
    row.hint = entry.hint
    row.admin = entry.admin
    row.downstream = entry.downstream
    row.federates_with = _dump([t.name for t in entry.federates_with])
    row.expires_at = entry.expires_at


def _authority_from_row(row: AuthorityRow) -> AuthorityRecord:
    return AuthorityRecord(
        id=row.id,
        kind=row.kind,
        server_id=row.server_id,
        status=row.status,
        key_id=row.key_id,
        key_type=row.key_type,
        certificate=row.certificate,
        chain=row.chain,
        public_key=row.public_key,
        kid=row.kid,
        not_before=row.not_before,
        not_after=row.not_after,
        tainted=row.tainted,
        created_at=row.created_at,
        activated_at=row.activated_at,
        revoked_at=row.revoked_at,
    )


# The batch insert of audit events runs at the driver: its rows carry values already converted
# for the database by ``_TimeConverter``, so no per-row processing is left for SQLAlchemy to do.
# SQLAlchemy still writes the statement, in the dialect's own parameter style.
_AUDIT_COLUMNS = (
    "seq", "at", "kind", "actor", "spiffe_id", "authority_id", "not_after", "details",
    "prev_hash", "hash",
)  # fmt: skip
_AUDIT_TIME_TYPE = AuditEventRow.__table__.c.at.type
# The chain head's statements, built once (building them is most of what they cost to run).
_HEAD_RESERVE = (
    update(AuditHeadRow)
    .where(AuditHeadRow.id == 1)
    .values(seq=AuditHeadRow.seq + bindparam("count"))
)
_HEAD_READ = select(AuditHeadRow.seq, AuditHeadRow.hash).where(AuditHeadRow.id == 1)
_HEAD_SET_HASH = (
    update(AuditHeadRow).where(AuditHeadRow.id == 1).values(hash=bindparam("head_hash"))
)
_audit_insert_cache: dict[tuple[str, str], tuple[str, bool]] = {}


def _audit_insert(dialect: Dialect) -> tuple[str, bool]:
    """The dialect's INSERT of one audit event, and whether it takes positional parameters."""
    key = (dialect.name, dialect.paramstyle)
    cached = _audit_insert_cache.get(key)
    if cached is None:
        plain = table(AuditEventRow.__tablename__, *(column(name) for name in _AUDIT_COLUMNS))
        compiled = insert(plain).compile(dialect=dialect)
        if compiled.positional and tuple(compiled.positiontup or ()) != _AUDIT_COLUMNS:
            raise DatastoreError(f"unexpected audit insert parameters: {compiled.positiontup}")
        cached = _audit_insert_cache[key] = (compiled.string, compiled.positional)
    return cached


class _TimeConverter:
    """Aware datetimes to what the dialect stores, as ``UtcDateTime`` binds them, memoised."""

    def __init__(self, dialect: Dialect) -> None:
        # The dialect's own variant of the type, as a typed insert would use (on SQLite it
        # formats the text that stored times compare as).
        self._bind = _AUDIT_TIME_TYPE.dialect_impl(dialect).bind_processor(dialect)
        self._seen: dict[datetime, Any] = {}

    def __call__(self, value: datetime | None) -> Any:
        if value is None:
            return None
        try:
            return self._seen[value]
        except KeyError:
            pass
        try:
            converted = self._bind(value) if self._bind is not None else value
        except ValueError as err:  # a naive datetime
            raise DatastoreError(f"datastore error: {err}") from err
        self._seen[value] = converted
        return converted


def _event_from_row(row: AuditEventRow) -> AuditEvent:
    details = json.loads(row.details)
    return AuditEvent(
        seq=row.seq,
        at=row.at,
        kind=row.kind,
        actor=row.actor,
        spiffe_id=row.spiffe_id,
        details=details if isinstance(details, dict) else {"_": details},
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


class Tx:
    """Operations inside one transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # -- singletons -------------------------------------------------------------------------
    def ensure_singletons(self) -> None:
        if self.session.get(AuditHeadRow, 1) is None:
            self.session.add(AuditHeadRow(id=1, seq=0, hash=GENESIS_HASH))
        if self.session.get(CounterRow, BUNDLE_SEQUENCE) is None:
            self.session.add(CounterRow(name=BUNDLE_SEQUENCE, value=0))
        self.session.flush()

    # -- counters ---------------------------------------------------------------------------
    def bump_counter(self, name: str) -> int:
        self.session.execute(
            update(CounterRow).where(CounterRow.name == name).values(value=CounterRow.value + 1)
        )
        value = self.session.scalar(select(CounterRow.value).where(CounterRow.name == name))
        if value is None:
            raise DatastoreError(f"counter {name!r} is missing; run migrations")
        return value

    def counter(self, name: str) -> int:
        return self.session.scalar(select(CounterRow.value).where(CounterRow.name == name)) or 0

    # -- entries ----------------------------------------------------------------------------
    def _record_change(self, entry_id: str, op: str, now: datetime) -> int:
        change = EntryChangeRow(entry_id=entry_id, op=op, at=now)
        self.session.add(change)
        self.session.flush()
        return change.revision

    def create_entry(self, entry: RegistrationEntry, now: datetime) -> RegistrationEntry:
        entry_id = entry.id or str(uuid.uuid4())
        self._check_unique(entry, exclude_id=None)
        revision = self._record_change(entry_id, "create", now)
        row = EntryRow(id=entry_id, revision=revision, created_at=now, updated_at=now)
        _fill_entry_row(row, entry)
        self.session.add(row)
        self.session.flush()
        return _entry_from_row(row)

    def _check_unique(self, entry: RegistrationEntry, exclude_id: str | None) -> None:
        # The unique constraint is the real guard; this check gives the operator a clear message.
        query = select(EntryRow.id).where(
            EntryRow.spiffe_id == str(entry.spiffe_id),
            EntryRow.parent_id == str(entry.parent_id),
            EntryRow.selectors_key == entry.selectors_key,
        )
        if exclude_id is not None:
            query = query.where(EntryRow.id != exclude_id)
        existing = self.session.scalar(query)
        if existing is not None:
            raise Conflict(
                f"an entry with the same spiffe_id, parent_id and selectors exists: {existing}"
            )

    def get_entry(self, entry_id: str) -> RegistrationEntry:
        row = self.session.get(EntryRow, entry_id)
        if row is None:
            raise NotFound(f"entry {entry_id!r} not found")
        return _entry_from_row(row)

    def list_entries(
        self,
        *,
        spiffe_id: str | None = None,
        parent_id: str | None = None,
        selector: str | None = None,
        limit: int | None = None,
    ) -> list[RegistrationEntry]:
        query = select(EntryRow).order_by(EntryRow.spiffe_id, EntryRow.id)
        if spiffe_id is not None:
            query = query.where(EntryRow.spiffe_id == spiffe_id)
        if parent_id is not None:
            query = query.where(EntryRow.parent_id == parent_id)
        if selector is not None:
            query = query.where(EntryRow.selectors.contains(json.dumps(selector)))
        if limit is not None:
            query = query.limit(limit)
        return [_entry_from_row(r) for r in self.session.scalars(query)]

    def update_entry(self, entry: RegistrationEntry, now: datetime) -> RegistrationEntry:
        row = self.session.get(EntryRow, entry.id, with_for_update=True)
        if row is None:
            raise NotFound(f"entry {entry.id!r} not found")
        self._check_unique(entry, exclude_id=entry.id)
        _fill_entry_row(row, entry)
        row.revision = self._record_change(entry.id, "update", now)
        row.updated_at = now
        self.session.flush()
        return _entry_from_row(row)

    def delete_entry(self, entry_id: str, now: datetime) -> RegistrationEntry:
        row = self.session.get(EntryRow, entry_id, with_for_update=True)
        if row is None:
            raise NotFound(f"entry {entry_id!r} not found")
        entry = _entry_from_row(row)
        revision = self._record_change(entry_id, "delete", now)
        self.session.delete(row)
        self.session.flush()
        return replace(entry, revision=revision)

    def count_entries(self) -> int:
        return self.session.scalar(select(func.count()).select_from(EntryRow)) or 0

    # -- audit ------------------------------------------------------------------------------
    def append_audit(
        self,
        *,
        kind: str,
        actor: str,
        now: datetime,
        spiffe_id: str | None = None,
        details: dict[str, Any] | None = None,
        authority_id: str | None = None,
        not_after: datetime | None = None,
    ) -> AuditEvent:
        """Append one event to the chain (see ``append_audit_batch``)."""
        record = AuditRecord(kind, actor, now, spiffe_id, details or {}, authority_id, not_after)
        return self.append_audit_batch([record])[0]

    def append_audit_batch(
        self, records: Sequence[AuditRecord], *, returning: bool = True
    ) -> list[AuditEvent]:
        """Append events in order with one head lock and one multi-row insert.

        The head is locked first (an UPDATE), so concurrent appenders, on this replica or
        another, queue here and the chain stays linear. ``returning=False`` skips building the
        stored events (the signing path only needs them written) and returns an empty list.
        """
        if not records:
            return []
        conn = self.session.connection()
        conn.execute(_HEAD_RESERVE, {"count": len(records)})
        last_seq, prev_hash = conn.execute(_HEAD_READ).one()
        seq = int(last_seq) - len(records)
        prev_hash = str(prev_hash)
        # A batch shares one or two distinct times; each is converted for the database once.
        to_db = _TimeConverter(conn.dialect)
        events: list[AuditEvent] = []
        rows: list[tuple[Any, ...]] = []
        for rec in records:
            seq += 1
            at_db = to_db(rec.at)  # refuses a naive time, as the typed column does
            # Hashed as it reads back (UTC), so the chain verifies whatever zone it came in.
            at = rec.at.astimezone(UTC)
            details_json = canonical_details(rec.details)
            digest = event_hash(
                seq=seq,
                at=at,
                kind=rec.kind,
                actor=rec.actor,
                spiffe_id=rec.spiffe_id,
                details_json=details_json,
                prev_hash=prev_hash,
            )
            rows.append(
                (
                    seq,
                    at_db,
                    rec.kind,
                    rec.actor,
                    rec.spiffe_id,
                    rec.authority_id,
                    to_db(rec.not_after),
                    details_json,
                    prev_hash,
                    digest,
                )
            )  # in the order of _AUDIT_COLUMNS
            if returning:
                events.append(
                    AuditEvent(
                        seq, at, rec.kind, rec.actor, rec.spiffe_id, dict(rec.details),
                        prev_hash, digest,
                    )
                )  # fmt: skip
            prev_hash = digest
        sql, positional = _audit_insert(conn.dialect)
        if positional:
            conn.exec_driver_sql(sql, rows)
        else:
            conn.exec_driver_sql(sql, [dict(zip(_AUDIT_COLUMNS, row, strict=True)) for row in rows])
        conn.execute(_HEAD_SET_HASH, {"head_hash": prev_hash})
        return events

    def list_audit(
        self,
        *,
        spiffe_id: str | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        query = select(AuditEventRow).where(AuditEventRow.seq > after_seq)
        if spiffe_id is not None:
            query = query.where(AuditEventRow.spiffe_id == spiffe_id)
        if kind is not None:
            query = query.where(AuditEventRow.kind == kind)
        if since is not None:
            query = query.where(AuditEventRow.at >= since)
        query = query.order_by(AuditEventRow.seq).limit(limit)
        return [_event_from_row(r) for r in self.session.scalars(query)]

    def audit_head(self) -> tuple[int, str]:
        head = self.session.get(AuditHeadRow, 1)
        if head is None:
            return 0, GENESIS_HASH
        return head.seq, head.hash

    def iter_audit(self, batch: int = 2000) -> Iterator[AuditEvent]:
        after = 0
        while True:
            query = (
                select(AuditEventRow)
                .where(AuditEventRow.seq > after)
                .order_by(AuditEventRow.seq)
                .limit(batch)
            )
            rows = list(self.session.scalars(query))
            if not rows:
                return
            for row in rows:
                yield _event_from_row(row)
            after = rows[-1].seq

    def latest_svid_not_after(self, authority_id: str) -> datetime | None:
        """The latest expiry of any SVID the authority signed (from the audit log)."""
        return self.session.scalar(
            select(func.max(AuditEventRow.not_after)).where(
                AuditEventRow.authority_id == authority_id
            )
        )

    # -- authorities ------------------------------------------------------------------------
    def insert_authority(self, record: AuthorityRecord) -> None:
        self.session.add(AuthorityRow(**record.__dict__))
        self.session.flush()

    def list_authorities(
        self,
        *,
        kind: str | None = None,
        server_id: str | None = None,
        include_revoked: bool = False,
    ) -> list[AuthorityRecord]:
        query = select(AuthorityRow).order_by(AuthorityRow.not_before)
        if kind is not None:
            query = query.where(AuthorityRow.kind == kind)
        if server_id is not None:
            query = query.where(AuthorityRow.server_id == server_id)
        if not include_revoked:
            query = query.where(AuthorityRow.status != "revoked")
        return [_authority_from_row(r) for r in self.session.scalars(query)]

    def get_authority(self, authority_id: str, *, lock: bool = False) -> AuthorityRecord:
        row = self.session.get(AuthorityRow, authority_id, with_for_update=lock)
        if row is None:
            raise NotFound(f"authority {authority_id!r} not found")
        return _authority_from_row(row)

    def update_authority(self, authority_id: str, **values: Any) -> None:
        self.session.execute(
            update(AuthorityRow).where(AuthorityRow.id == authority_id).values(**values)
        )

    # -- join tokens ------------------------------------------------------------------------
    def insert_token(
        self,
        token_id: str,
        token_hash: str,
        spiffe_id: str | None,
        now: datetime,
        expires_at: datetime,
    ) -> JoinTokenRecord:
        self.session.add(
            JoinTokenRow(
                id=token_id,
                token_hash=token_hash,
                spiffe_id=spiffe_id,
                created_at=now,
                expires_at=expires_at,
            )
        )
        self.session.flush()
        return JoinTokenRecord(token_id, spiffe_id, now, expires_at, None)

    def redeem_token(self, token_hash: str, now: datetime) -> JoinTokenRecord | None:
        """Mark the token used if it is unused and unexpired; None otherwise (single use)."""
        result = self.session.execute(
            update(JoinTokenRow)
            .where(
                JoinTokenRow.token_hash == token_hash,
                JoinTokenRow.used_at.is_(None),
                JoinTokenRow.expires_at > now,
            )
            .values(used_at=now)
        )
        if getattr(result, "rowcount", 0) != 1:
            return None
        row = self.session.scalar(select(JoinTokenRow).where(JoinTokenRow.token_hash == token_hash))
        assert row is not None
        return JoinTokenRecord(row.id, row.spiffe_id, row.created_at, row.expires_at, row.used_at)

    def list_tokens(self) -> list[JoinTokenRecord]:
        rows = self.session.scalars(select(JoinTokenRow).order_by(JoinTokenRow.created_at))
        return [
            JoinTokenRecord(r.id, r.spiffe_id, r.created_at, r.expires_at, r.used_at) for r in rows
        ]

    def prune_tokens(self, now: datetime) -> int:
        result = self.session.execute(delete(JoinTokenRow).where(JoinTokenRow.expires_at <= now))
        return int(getattr(result, "rowcount", 0))

    # -- federated bundles ------------------------------------------------------------------
    def set_federated_bundle(self, record: FederatedBundleRecord) -> None:
        row = self.session.get(FederatedBundleRow, record.trust_domain, with_for_update=True)
        if row is None:
            self.session.add(FederatedBundleRow(**record.__dict__))
        else:
            for key, value in record.__dict__.items():
                setattr(row, key, value)
        self.session.flush()

    def get_federated_bundle(self, trust_domain: str) -> FederatedBundleRecord:
        row = self.session.get(FederatedBundleRow, trust_domain)
        if row is None:
            raise NotFound(f"no federated bundle for trust domain {trust_domain!r}")
        return _federated_from_row(row)

    def list_federated_bundles(self) -> list[FederatedBundleRecord]:
        rows = self.session.scalars(
            select(FederatedBundleRow).order_by(FederatedBundleRow.trust_domain)
        )
        return [_federated_from_row(r) for r in rows]

    def delete_federated_bundle(self, trust_domain: str) -> None:
        row = self.session.get(FederatedBundleRow, trust_domain)
        if row is None:
            raise NotFound(f"no federated bundle for trust domain {trust_domain!r}")
        self.session.delete(row)
        self.session.flush()


def _federated_from_row(row: FederatedBundleRow) -> FederatedBundleRecord:
    return FederatedBundleRecord(
        trust_domain=row.trust_domain,
        jwks=row.jwks,
        sequence=row.sequence,
        endpoint_url=row.endpoint_url,
        endpoint_spiffe_id=row.endpoint_spiffe_id,
        refreshed_at=row.refreshed_at,
        updated_at=row.updated_at,
    )
