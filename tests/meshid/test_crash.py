"""A server killed with SIGKILL in the middle of a stream of entry creates loses nothing it
acknowledged, and its audit chain still verifies after restart (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from meshid.client import AdminClient, AdminError
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow
WRITERS = 4  # concurrent clients, so the kill lands while several transactions are in flight
ACKED_BEFORE_KILL = 60


def test_sigkill_loses_no_acknowledged_entry(tmp_path: Path, database_url: str) -> None:
    server = ServerProcess(
        tmp_path / "data", tmp_path / "admin" / "admin.sock", database=database_url
    ).start()
    acked: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    stop = threading.Event()

    def writer(n: int) -> None:
        with AdminClient(server.socket, timeout=10) as client:
            i = 0
            while not stop.is_set():
                i += 1
                body = {
                    "spiffe_id": f"spiffe://example.org/crash/w{n}/{i}",
                    "parent_id": "spiffe://example.org/node",
                    "selectors": [f"unix:uid:{n * 100000 + i}"],
                }
                try:
                    entry = client.json("POST", "/v1/entries", json=body)
                except AdminError:
                    return  # the server died under us: this create was never acknowledged
                with lock:
                    acked.append(entry["id"])
                    if len(acked) >= ACKED_BEFORE_KILL:
                        enough.set()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    assert enough.wait(120), "writers made no progress:\n" + "".join(server.output)
    server.kill()
    stop.set()
    for t in threads:
        t.join(30)

    restarted = ServerProcess(server.data_dir, server.socket, database=database_url).start()
    try:
        with AdminClient(restarted.socket) as client:
            stored = {e["id"] for e in client.json("GET", "/v1/entries")}
            missing = set(acked) - stored
            assert not missing, f"{len(missing)} acknowledged entries lost"
            verdict = client.json("POST", "/v1/audit/verify")
            assert verdict["ok"], verdict["reason"]
            created = client.json(
                "GET", "/v1/audit", params={"kind": "entry.created", "limit": 10000}
            )
            audited = {e["details"]["id"] for e in created}
            assert stored <= audited, "every stored entry has its audit event"
    finally:
        assert restarted.stop() == 0
