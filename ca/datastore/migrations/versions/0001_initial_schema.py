"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "authorities",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("server_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("key_id", sa.String(length=128), nullable=False),
        sa.Column("key_type", sa.String(length=16), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=True),
        sa.Column("chain", sa.LargeBinary(), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("kid", sa.String(length=64), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tainted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("authorities", schema=None) as batch_op:
        batch_op.create_index("ix_authorities_kind_status", ["kind", "status"], unique=False)

    op.create_table(
        "counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "entries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("spiffe_id", sa.String(length=2048), nullable=False),
        sa.Column("parent_id", sa.String(length=2048), nullable=False),
        sa.Column("selectors", sa.Text(), nullable=False),
        sa.Column("selectors_key", sa.String(length=64), nullable=False),
        sa.Column("x509_svid_ttl", sa.Integer(), nullable=False),
        sa.Column("jwt_svid_ttl", sa.Integer(), nullable=False),
        sa.Column("dns_names", sa.Text(), nullable=False),
        sa.Column("hint", sa.String(length=128), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("downstream", sa.Boolean(), nullable=False),
        sa.Column("federates_with", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("spiffe_id", "parent_id", "selectors_key", name="uq_entries_identity"),
    )
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.create_index("ix_entries_parent_id", ["parent_id"], unique=False)
        batch_op.create_index("ix_entries_revision", ["revision"], unique=False)
        batch_op.create_index("ix_entries_spiffe_id", ["spiffe_id"], unique=False)

    op.create_table(
        "entry_changes",
        sa.Column(
            "revision",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("entry_id", sa.String(length=36), nullable=False),
        sa.Column("op", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("revision"),
    )
    with op.batch_alter_table("entry_changes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_entry_changes_entry_id"), ["entry_id"], unique=False)

    op.create_table(
        "federated_bundles",
        sa.Column("trust_domain", sa.String(length=255), nullable=False),
        sa.Column("jwks", sa.Text(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("endpoint_url", sa.String(length=2048), nullable=True),
        sa.Column("endpoint_spiffe_id", sa.String(length=2048), nullable=True),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("trust_domain"),
    )
    op.create_table(
        "join_tokens",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("spiffe_id", sa.String(length=2048), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=2048), nullable=False),
        sa.Column("spiffe_id", sa.String(length=2048), nullable=True),
        sa.Column("authority_id", sa.String(length=64), nullable=True),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["authority_id"], ["authorities.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_at", ["at"], unique=False)
        batch_op.create_index("ix_audit_authority", ["authority_id", "not_after"], unique=False)
        batch_op.create_index("ix_audit_kind", ["kind"], unique=False)
        batch_op.create_index("ix_audit_spiffe_id", ["spiffe_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_spiffe_id")
        batch_op.drop_index("ix_audit_kind")
        batch_op.drop_index("ix_audit_authority")
        batch_op.drop_index("ix_audit_at")

    op.drop_table("audit_events")
    op.drop_table("join_tokens")
    op.drop_table("federated_bundles")
    with op.batch_alter_table("entry_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_entry_changes_entry_id"))

    op.drop_table("entry_changes")
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.drop_index("ix_entries_spiffe_id")
        batch_op.drop_index("ix_entries_revision")
        batch_op.drop_index("ix_entries_parent_id")

    op.drop_table("entries")
    op.drop_table("counters")
    with op.batch_alter_table("authorities", schema=None) as batch_op:
        batch_op.drop_index("ix_authorities_kind_status")

    op.drop_table("authorities")
    op.drop_table("audit_head")
