"""attested nodes (node API) and the nodes revision counter

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NODES_REVISION = "nodes_revision"  # bumped by every attestation, ban and eviction


def upgrade() -> None:
    op.create_table(
        "attested_nodes",
        sa.Column("spiffe_id", sa.String(length=2048), nullable=False),
        sa.Column("attestation_type", sa.String(length=32), nullable=False),
        sa.Column("selectors", sa.Text(), nullable=False),
        sa.Column("aliases", sa.Text(), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("previous_serial", sa.String(length=64), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("banned", sa.Boolean(), nullable=False),
        sa.Column("sync_floor", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("spiffe_id"),
    )
    counters = sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger))
    op.bulk_insert(counters, [{"name": NODES_REVISION, "value": 0}])


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM counters WHERE name = :n").bindparams(n=NODES_REVISION))
    op.drop_table("attested_nodes")
