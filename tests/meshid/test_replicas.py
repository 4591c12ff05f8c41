"""Two server replicas on one PostgreSQL database: each has its own authority, the bundle is the
union, entries and the audit chain are shared."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_replicas_share_postgres(tmp_path: Path, database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("replicas share one PostgreSQL database: only the postgresql case runs")
    replicas = [
        ServerProcess(
            tmp_path / f"r{i}", tmp_path / f"r{i}-admin" / "s.sock", database=database_url
        )
        for i in range(2)
    ]
    # Start both at once: migrations and first authorities must not trip over each other.
    errors: list[BaseException] = []

    def start(r: ServerProcess) -> None:
        try:
            r.start()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=start, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        a, b = replicas
        roots = x509.load_pem_x509_certificates(a.cli("bundle", "show").stdout.encode())
        assert len(roots) == 2, "each replica's authority is in the shared bundle"
        assert a.cli("bundle", "show").stdout == b.cli("bundle", "show").stdout
        created = a.cli(
            "entry", "create", "--spiffe-id", "spiffe://example.org/r", "--parent-id",
            "spiffe://example.org/n", "--selector", "unix:uid:1", "-o", "json",
        )  # fmt: skip
        entry_id = json.loads(created.stdout)["id"]
        shown = b.cli("entry", "show", "--id", entry_id, "-o", "json")
        assert json.loads(shown.stdout)["id"] == entry_id
        minted = b.cli(
            "x509", "mint", "--spiffe-id", "spiffe://example.org/r", "--write", str(tmp_path / "s")
        )
        assert minted.returncode == 0, minted.stderr
        verify = a.cli("audit", "verify")
        assert verify.returncode == 0, verify.stderr
    finally:
        for r in replicas:
            if r.proc is not None:
                r.stop()
