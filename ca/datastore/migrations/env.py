"""Alembic environment: migrations run at server start on the connection the server passes in."""

from __future__ import annotations

from alembic import context

from ca.datastore.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - the server always passes its connection
    raise RuntimeError("meshid runs migrations programmatically; pass a connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
