"""Two servers federate through the https_spiffe bundle endpoint; the admin API over mTLS lets in
only SVIDs of entries marked admin."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ServerProcess, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess, int]]:
    port = free_port()
    a = ServerProcess(tmp_path / "a", tmp_path / "a-admin" / "s.sock", trust_domain="a.org").start()
    b = ServerProcess(
        tmp_path / "b",
        tmp_path / "b-admin" / "s.sock",
        trust_domain="b.org",
        extra_args=["--bundle-endpoint", f"127.0.0.1:{port}"],
    ).start()
    yield a, b, port
    assert a.stop() == 0 and b.stop() == 0


def _keys(bundle_json: str) -> set[str]:
    return {k.get("kid") or k["x5c"][0] for k in json.loads(bundle_json)["keys"]}


def test_federated_bundle_follows_rotation_over_https_spiffe(
    two_servers: tuple[ServerProcess, ServerProcess, int], tmp_path: Path
) -> None:
    a, b, port = two_servers
    initial = b.cli("bundle", "show", "--format", "spiffe").stdout
    path = tmp_path / "b.json"
    path.write_text(initial)
    set_ = a.cli(
        "bundle", "set", "--trust-domain", "b.org", "--file", str(path),
        "--endpoint-url", f"https://127.0.0.1:{port}/",
        "--endpoint-spiffe-id", "spiffe://b.org/meshid/server",
    )  # fmt: skip
    assert set_.returncode == 0, set_.stderr
    assert b.cli("authority", "x509", "prepare").returncode == 0  # b publishes a new root
    refreshed = a.cli("bundle", "refresh", "--trust-domain", "b.org")
    assert refreshed.returncode == 0, refreshed.stderr
    assert "changed" in refreshed.stdout
    [stored] = json.loads(a.cli("bundle", "list", "-o", "json").stdout)
    assert _keys(json.dumps(stored["bundle"])) == _keys(
        b.cli("bundle", "show", "--format", "spiffe").stdout
    )
    assert len(_keys(json.dumps(stored["bundle"]))) == len(_keys(initial)) + 1


def test_https_spiffe_refuses_the_wrong_server_id(
    two_servers: tuple[ServerProcess, ServerProcess, int], tmp_path: Path
) -> None:
    a, b, port = two_servers
    path = tmp_path / "b.json"
    path.write_text(b.cli("bundle", "show", "--format", "spiffe").stdout)
    a.cli(
        "bundle", "set", "--trust-domain", "b.org", "--file", str(path),
        "--endpoint-url", f"https://127.0.0.1:{port}/",
        "--endpoint-spiffe-id", "spiffe://b.org/not-the-server",
    )  # fmt: skip
    before = a.cli("bundle", "list", "-o", "json").stdout
    refused = a.cli("bundle", "refresh", "--trust-domain", "b.org")
    assert refused.returncode == 1
    assert "expected spiffe://b.org/not-the-server" in refused.stderr
    assert a.cli("bundle", "list", "-o", "json").stdout == before, "the last good bundle is kept"


def test_https_spiffe_refuses_an_unknown_ca(
    two_servers: tuple[ServerProcess, ServerProcess, int], tmp_path: Path
) -> None:
    a, _b, port = two_servers
    path = tmp_path / "wrong.json"
    path.write_text(a.cli("bundle", "show", "--format", "spiffe").stdout)  # a's roots, not b's
    a.cli(
        "bundle", "set", "--trust-domain", "b.org", "--file", str(path),
        "--endpoint-url", f"https://127.0.0.1:{port}/",
        "--endpoint-spiffe-id", "spiffe://b.org/meshid/server",
    )  # fmt: skip
    refused = a.cli("bundle", "refresh", "--trust-domain", "b.org")
    assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr


def test_admin_api_over_mtls(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "admin" / "s.sock",
        extra_args=["--admin-listen", f"127.0.0.1:{port}"],
    ).start()
    try:
        entry = server.cli(
            "entry", "create", "--spiffe-id", "spiffe://example.org/ops", "--parent-id",
            "spiffe://example.org/node", "--selector", "unix:uid:0", "--admin",
        )  # fmt: skip
        assert entry.returncode == 0, entry.stderr
        for name in ("ops", "intruder"):
            minted = server.cli(
                "x509",
                "mint",
                "--spiffe-id",
                f"spiffe://example.org/{name}",
                "--write",
                str(tmp_path / name),
            )
            assert minted.returncode == 0, minted.stderr
        url = f"https://127.0.0.1:{port}/v1/entries"

        def client(name: str | None) -> httpx.Client:
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ops" / "bundle.pem"))
            ctx.check_hostname = False  # SPIFFE authentication: the ID is checked, not a host name
            if name:
                ctx.load_cert_chain(tmp_path / name / "svid.pem", tmp_path / name / "svid.key")
            return httpx.Client(verify=ctx)

        with client("ops") as c:
            ok = c.get(url)
            assert ok.status_code == 200
            assert (
                c.post(f"https://127.0.0.1:{port}/v1/tokens", json={"ttl": 60}).status_code == 201
            )
        with client("intruder") as c:
            denied = c.get(url)
            assert denied.status_code == 403 and "no admin entry" in denied.json()["detail"]
        with client(None) as c, pytest.raises(httpx.TransportError):
            c.get(url)
        logins = json.loads(
            server.cli("audit", "list", "--kind", "admin.login", "-o", "json").stdout
        )
        assert "spiffe://example.org/ops" in {e["actor"] for e in logins}
        tokens = json.loads(
            server.cli("audit", "list", "--kind", "token.created", "-o", "json").stdout
        )
        assert tokens[-1]["actor"] == "spiffe://example.org/ops"
    finally:
        assert server.stop() == 0
