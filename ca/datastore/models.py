"""SQLAlchemy table definitions of the CA datastore.

Owns the schema. The first Alembic revision creates exactly these tables; later changes go
through new revisions. Times are stored as UTC and always read back as aware datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the datastore; times must be aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of the CA tables."""


class EntryRow(Base):
    __tablename__ = "entries"
    __table_args__ = (
        UniqueConstraint("spiffe_id", "parent_id", "selectors_key", name="uq_entries_identity"),
        Index("ix_entries_parent_id", "parent_id"),
        Index("ix_entries_spiffe_id", "spiffe_id"),
        Index("ix_entries_revision", "revision"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    spiffe_id: Mapped[str] = mapped_column(String(2048))
    parent_id: Mapped[str] = mapped_column(String(2048))
    selectors: Mapped[str] = mapped_column(Text)  # JSON list of "type:value", sorted
    selectors_key: Mapped[str] = mapped_column(String(64))
    x509_svid_ttl: Mapped[int] = mapped_column(Integer, default=0)
    jwt_svid_ttl: Mapped[int] = mapped_column(Integer, default=0)
    dns_names: Mapped[str] = mapped_column(Text, default="[]")
    hint: Mapped[str] = mapped_column(String(128), default="")
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    downstream: Mapped[bool] = mapped_column(Boolean, default=False)
    federates_with: Mapped[str] = mapped_column(Text, default="[]")
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revision: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class EntryChangeRow(Base):
    """One row per entry change; its key is the revision agents sync from."""

    __tablename__ = "entry_changes"

    revision: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    entry_id: Mapped[str] = mapped_column(String(36), index=True)
    op: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UtcDateTime)


class JoinTokenRow(Base):
    __tablename__ = "join_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    spiffe_id: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class AuthorityRow(Base):
    __tablename__ = "authorities"
    __table_args__ = (Index("ix_authorities_kind_status", "kind", "status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    server_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str] = mapped_column(String(128))
    key_type: Mapped[str] = mapped_column(String(16))
    certificate: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # DER, x509
    chain: Mapped[bytes] = mapped_column(
        LargeBinary, default=b""
    )  # PEM certs appended after the leaf
    public_key: Mapped[bytes] = mapped_column(LargeBinary)  # SubjectPublicKeyInfo DER
    kid: Mapped[str | None] = mapped_column(String(64), nullable=True)  # jwt
    not_before: Mapped[datetime] = mapped_column(UtcDateTime)
    not_after: Mapped[datetime] = mapped_column(UtcDateTime)
    tainted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    activated_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class FederatedBundleRow(Base):
    __tablename__ = "federated_bundles"

    trust_domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    jwks: Mapped[str] = mapped_column(Text)  # SPIFFE bundle JSON as received
    sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    endpoint_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    endpoint_spiffe_id: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    refreshed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class CounterRow(Base):
    """Named monotonic counters (the bundle's ``spiffe_sequence``)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class AuditHeadRow(Base):
    """The chain head: the last event's seq and hash. Locked by every append."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))


class AuditEventRow(Base):
    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_kind", "kind"),
        Index("ix_audit_spiffe_id", "spiffe_id"),
        Index("ix_audit_at", "at"),
        Index("ix_audit_authority", "authority_id", "not_after"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(2048))
    spiffe_id: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    authority_id: Mapped[str | None] = mapped_column(
        String(64), ForeignKey("authorities.id", ondelete="RESTRICT"), nullable=True
    )
    not_after: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AttestedNodeRow(Base):
    """An agent that attested its node: its identity, node selectors and current agent SVID.

    Written by the node API (``ca/datastore/nodes.py``); revision 0002 creates it.
    """

    __tablename__ = "attested_nodes"

    spiffe_id: Mapped[str] = mapped_column(String(2048), primary_key=True)
    attestation_type: Mapped[str] = mapped_column(String(32))
    selectors: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of "type:value"
    aliases: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of SPIFFE IDs
    serial: Mapped[str] = mapped_column(String(64))  # current agent SVID serial, hex
    previous_serial: Mapped[str | None] = mapped_column(String(64), nullable=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)  # of the current agent SVID
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    sync_floor: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    attested_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime)


class PolicyRow(Base):
    """An AuthorizationPolicy as the server stores it: the parsed document as JSON."""

    __tablename__ = "policies"

    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    document: Mapped[str] = mapped_column(Text)  # JSON of authz.policy_to_dict
    revision: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
