"""authorization policies and the policies revision counter

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

POLICIES_REVISION = "policies_revision"  # bumped by every apply and delete


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    counters = sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger))
    op.bulk_insert(counters, [{"name": POLICIES_REVISION, "value": 0}])


def downgrade() -> None:
    op.drop_table("policies")
    counters = sa.table("counters", sa.column("name", sa.String))
    op.execute(counters.delete().where(counters.c.name == POLICIES_REVISION))
