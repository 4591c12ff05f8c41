"""Run the datastore's Alembic migrations up to head on an open connection."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade_to_head(connection: Connection) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    command.upgrade(alembic_config(connection), "head")
