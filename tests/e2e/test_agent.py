"""End to end: a real server, a real agent, and the real py-spiffe client as the workload."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from spiffe import JwtSource, WorkloadApiClient, X509Source

from tests.support.processes import AgentProcess, ServerProcess, free_port

pytestmark = pytest.mark.slow
TD = "example.org"


@dataclass
class Mesh:
    server: ServerProcess
    agent: AgentProcess
    agent_id: str

    @property
    def endpoint(self) -> str:
        return f"unix://{self.agent.socket}"


@pytest.fixture
def mesh(short_tmp: Path) -> Iterator[Mesh]:
    root = short_tmp
    port = free_port()
    server = ServerProcess(
        root / "srv", root / "adm" / "s.sock", extra_args=["--bind", f"127.0.0.1:{port}"]
    ).start()
    bundle = root / "bundle.pem"
    bundle.write_text(server.cli("bundle", "show").stdout)
    token_out = server.cli("token", "generate", "-o", "json")
    token = json.loads(token_out.stdout)
    agent = AgentProcess(  # the command form: the trust domain comes from the bundle
        root / "agent", root / "wl" / "api.sock", [f"127.0.0.1:{port}"], bundle,
        join_token=token["token"], trust_domain="",
    ).start()  # fmt: skip
    yield Mesh(server, agent, token["agent_id"])
    agent.stop()
    server.stop()


def _register(mesh: Mesh, path: str, *selectors: str, ttl: int = 0) -> str:
    args = ["entry", "create", "--spiffe-id", f"spiffe://{TD}/{path}", "--parent-id", mesh.agent_id]
    for s in selectors:
        args += ["--selector", s]
    if ttl:
        args += ["--x509-ttl", str(ttl)]
    out = mesh.server.cli(*args, "-o", "json")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["id"])


def test_workload_gets_its_svid_through_x509source(mesh: Mesh) -> None:
    _register(mesh, "web", f"unix:uid:{os.getuid()}")
    source = X509Source(workload_api_client=WorkloadApiClient(mesh.endpoint), timeout_in_seconds=30)
    try:
        assert str(source.get_x509_context().default_svid.spiffe_id) == f"spiffe://{TD}/web"
        assert (
            source.get_bundle_for_trust_domain(
                source.get_x509_context().default_svid.spiffe_id.trust_domain
            )
            is not None
        )
    finally:
        source.close()


def test_rotation_reaches_a_subscribed_x509source(mesh: Mesh) -> None:
    _register(mesh, "short", f"unix:uid:{os.getuid()}", ttl=4)
    source = X509Source(workload_api_client=WorkloadApiClient(mesh.endpoint), timeout_in_seconds=30)
    try:
        first = source.get_x509_context().default_svid.leaf.serial_number
        rotated = threading.Event()

        def on_update() -> None:
            if source.get_x509_context().default_svid.leaf.serial_number != first:
                rotated.set()

        source.subscribe_for_updates(on_update)
        assert rotated.wait(20), "a 4 s SVID must be rotated at about half its life"
    finally:
        source.close()


def test_jwt_fetch_and_validate(mesh: Mesh) -> None:
    _register(mesh, "api", f"unix:uid:{os.getuid()}")
    with WorkloadApiClient(mesh.endpoint) as client:
        source = JwtSource(workload_api_client=client, timeout_in_seconds=30)
        try:
            svid = source.fetch_svid(audience={"db"})
            assert str(svid.spiffe_id) == f"spiffe://{TD}/api"
            validated = client.validate_jwt_svid(svid.token, "db")
            assert str(validated.spiffe_id) == f"spiffe://{TD}/api"
        finally:
            source.close()


def _fetch_ids(endpoint: str) -> list[str]:
    with WorkloadApiClient(endpoint) as client:
        return [str(s.spiffe_id) for s in client.fetch_x509_svids(timeout=10)]


def test_server_outage_and_agent_restart(mesh: Mesh) -> None:
    _register(mesh, "steady", f"unix:uid:{os.getuid()}")
    source = X509Source(workload_api_client=WorkloadApiClient(mesh.endpoint), timeout_in_seconds=30)
    try:
        held = source.get_x509_context().default_svid.leaf.serial_number
        mesh.server.stop()
        # The server is gone: the agent keeps serving what it holds.
        assert _fetch_ids(mesh.endpoint) == [f"spiffe://{TD}/steady"]
        # Restart the agent with the server still down: it comes back from its stored SVID
        # (no token needed) and serves the Workload API; the workload keeps its SVID meanwhile.
        assert mesh.agent.stop() == 0
        mesh.agent.join_token = None
        mesh.agent.output.clear()
        mesh.agent.start()
        assert "agent attested" not in "".join(mesh.agent.output)
        assert source.get_x509_context().default_svid.leaf.serial_number == held
        assert not source.is_closed()
        # The server returns: the agent resyncs without attesting again and serves new SVIDs.
        mesh.server.output.clear()
        mesh.server.start()
        assert _wait_for_ids(mesh.endpoint, [f"spiffe://{TD}/steady"], timeout=60)
    finally:
        source.close()


def _wait_for_ids(endpoint: str, ids: list[str], *, timeout: float) -> bool:
    """Ask until the agent serves ``ids`` (it resyncs with backoff after an outage)."""
    import time

    from spiffe.errors import PySpiffeError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _fetch_ids(endpoint) == ids:
                return True
        except PySpiffeError:
            pass
        time.sleep(0.5)  # polling a remote process's state; there is no event to await
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start children with other uids")
def test_two_uids_get_two_svids_and_a_stranger_none(mesh: Mesh) -> None:
    from tests.workload_api.test_server import _fetch_as

    os.chmod(mesh.agent.socket.parent.parent, 0o755)  # let the setuid children reach the socket
    _register(mesh, "uid-a", "unix:uid:65534")
    _register(mesh, "uid-b", "unix:uid:65533")
    path = str(mesh.agent.socket)
    assert _eventually(lambda: _fetch_as(65534, path) == f"ok spiffe://{TD}/uid-a")
    assert _fetch_as(65533, path) == f"ok spiffe://{TD}/uid-b"
    assert _fetch_as(65532, path) == "error PERMISSION_DENIED"


def test_banned_agent_is_cut_off(mesh: Mesh) -> None:
    _register(mesh, "before", f"unix:uid:{os.getuid()}")
    assert _wait_for_ids(mesh.endpoint, [f"spiffe://{TD}/before"], timeout=30)
    banned = mesh.server.cli("agent", "ban", "--spiffe-id", mesh.agent_id)
    assert banned.returncode == 0, banned.stderr
    assert _eventually(lambda: "server refused this agent" in "".join(mesh.agent.output))
    _register(mesh, "after", f"unix:uid:{os.getuid()}", "unix:gid:0")
    signed = mesh.server.cli("audit", "list", "--spiffe-id", f"spiffe://{TD}/after", "-o", "json")
    assert json.loads(signed.stdout)[-1]["kind"] == "entry.created", (
        "nothing signed for a banned agent"
    )
    # What it already holds keeps working until it expires; nothing new arrives.
    assert _fetch_ids(mesh.endpoint) == [f"spiffe://{TD}/before"]


def _eventually(check: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll a condition in another process (no event crosses the process boundary)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_taint_replaces_svids_at_once(mesh: Mesh) -> None:
    _register(mesh, "long", f"unix:uid:{os.getuid()}", ttl=3600)
    source = X509Source(workload_api_client=WorkloadApiClient(mesh.endpoint), timeout_in_seconds=30)
    try:
        old_issuer = source.get_x509_context().default_svid.leaf.issuer
        replaced = threading.Event()

        def on_update() -> None:
            if source.get_x509_context().default_svid.leaf.issuer != old_issuer:
                replaced.set()

        source.subscribe_for_updates(on_update)
        [active] = [
            a for a in json.loads(mesh.server.cli("authority", "x509", "show", "-o", "json").stdout)
            if a["status"] == "active"
        ]  # fmt: skip
        prepared = json.loads(mesh.server.cli("authority", "x509", "prepare", "-o", "json").stdout)
        assert (
            mesh.server.cli(
                "authority", "x509", "activate", "--authority-id", prepared["id"]
            ).returncode
            == 0
        )
        assert not replaced.is_set(), "a new active authority alone replaces nothing"
        taint = mesh.server.cli("authority", "x509", "taint", "--authority-id", active["id"])
        assert taint.returncode == 0, taint.stderr
        assert replaced.wait(20), "a taint must make the agent replace the SVID at once"
    finally:
        source.close()


def test_restart_during_outage_serves_from_the_optional_disk_cache(short_tmp: Path) -> None:
    root = short_tmp
    port = free_port()
    server = ServerProcess(
        root / "srv", root / "adm" / "s.sock", extra_args=["--bind", f"127.0.0.1:{port}"]
    ).start()
    bundle = root / "bundle.pem"
    bundle.write_text(server.cli("bundle", "show").stdout)
    token = json.loads(server.cli("token", "generate", "-o", "json").stdout)
    agent = AgentProcess(
        root / "agent", root / "wl" / "api.sock", [f"127.0.0.1:{port}"], bundle,
        join_token=token["token"], extra_args=["--persist-svid-cache"],
    ).start()  # fmt: skip
    mesh = Mesh(server, agent, token["agent_id"])
    try:
        _register(mesh, "cached", f"unix:uid:{os.getuid()}")
        assert _wait_for_ids(mesh.endpoint, [f"spiffe://{TD}/cached"], timeout=30)
        server.stop()
        assert agent.stop() == 0  # writes the cache on the way out
        cache = agent.data_dir / "svid_cache.json"
        assert (cache.stat().st_mode & 0o777) == 0o600
        agent.join_token = None
        agent.start()
        # No server: the restarted agent serves the stored SVID at once.
        assert _fetch_ids(mesh.endpoint) == [f"spiffe://{TD}/cached"]
        agent.stop()
        agent.extra_args = ["--no-persist-svid-cache"]
        agent.start()
        assert not cache.exists(), "turning the option off removes the keys from disk"
    finally:
        agent.stop()
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
