"""Shared fixtures: database backends (SQLite file, the machine's PostgreSQL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ENV = "MESHID_TEST_DATABASE_URL"
PG_SKIP = (
    f"PostgreSQL backend not tested: set {PG_ENV}=postgresql://postgres@127.0.0.1:5432/test "
    "(as .ci/run does) to run these tests"
)


def _pg_schema_url(base: str) -> Iterator[str]:
    """A fresh schema per test so runs never see each other's rows."""
    url = make_url(base).set(drivername="postgresql+psycopg")
    schema = f"meshid_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each datastore test runs on both backends."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meshid.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(PG_SKIP)
    yield from _pg_schema_url(base)
