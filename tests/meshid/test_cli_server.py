"""End to end: the real CLI against a real server process over its admin Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from spiffe import X509Bundle, X509Svid

from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow
TD = "example.org"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("server")
    proc = ServerProcess(root / "data", root / "admin" / "admin.sock").start()
    yield proc
    assert proc.stop() == 0, "".join(proc.output)


def _json(result: object) -> object:
    assert result.returncode == 0, result.stderr  # type: ignore[attr-defined]
    return json.loads(result.stdout)  # type: ignore[attr-defined]


def test_socket_and_data_permissions(server: ServerProcess) -> None:
    assert stat.S_IMODE(server.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.socket.parent.stat().st_mode) == 0o700
    keys = list((server.data_dir / "keys").iterdir())
    assert keys, "authority keys are on disk"
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((server.data_dir / "keys").stat().st_mode) == 0o700


def test_healthcheck(server: ServerProcess) -> None:
    result = server.cli("server", "healthcheck")
    assert result.returncode == 0 and "healthy" in result.stdout


def test_entry_lifecycle_json(server: ServerProcess) -> None:
    created = _json(
        server.cli(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/cli/web",
            "--parent-id", f"spiffe://{TD}/node/a", "--selector", "unix:uid:1000",
            "--selector", "unix:gid:1000", "--x509-ttl", "120", "--dns", "web.local",
            "--output", "json",
        )
    )  # fmt: skip
    assert isinstance(created, dict)
    assert created["selectors"] == ["unix:gid:1000", "unix:uid:1000"]
    listed = _json(
        server.cli("entry", "list", "--spiffe-id", f"spiffe://{TD}/cli/web", "-o", "json")
    )
    assert [e["id"] for e in listed] == [created["id"]]  # type: ignore[union-attr]
    updated = _json(
        server.cli("entry", "update", "--id", created["id"], "--hint", "web", "-o", "json")
    )
    assert isinstance(updated, dict)
    assert updated["hint"] == "web" and updated["revision"] > created["revision"]
    assert updated["selectors"] == created["selectors"]
    shown = _json(server.cli("entry", "show", "--id", created["id"], "-o", "json"))
    assert shown == updated
    assert server.cli("entry", "delete", "--id", created["id"]).returncode == 0
    gone = server.cli("entry", "show", "--id", created["id"])
    assert gone.returncode == 1 and "not found" in gone.stderr


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--spiffe-id", f"spiffe://{TD}/a/", "--selector", "unix:uid:1"], "spiffe_id"),
        (["--spiffe-id", "spiffe://other.org/a", "--selector", "unix:uid:1"], "spiffe_id"),
        (["--spiffe-id", f"spiffe://{TD}/a", "--selector", "nocolon"], "selectors"),
        (
            ["--spiffe-id", f"spiffe://{TD}/a", "--selector", "unix:uid:1", "--x509-ttl", "-5"],
            "x509_svid_ttl",
        ),
        (
            ["--spiffe-id", f"spiffe://{TD}/a", "--selector", "unix:uid:1", "--dns", "bad_name!"],
            "dns_names",
        ),
        (["--spiffe-id", f"spiffe://{TD}/meshid/agent/x", "--selector", "unix:uid:1"], "spiffe_id"),
        (["--spiffe-id", f"spiffe://{TD}/" + "a" * 2100, "--selector", "unix:uid:1"], "spiffe_id"),
    ],
    ids=[
        "trailing-slash",
        "foreign-td",
        "selector-syntax",
        "negative-ttl",
        "dns",
        "reserved",
        "oversize",
    ],
)
def test_bad_entry_refused_with_one_line_and_nothing_written(
    server: ServerProcess, args: list[str], field: str
) -> None:
    before = _json(server.cli("audit", "list", "-o", "json"))
    result = server.cli("entry", "create", "--parent-id", f"spiffe://{TD}/node/a", *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], result.stderr
    assert _json(server.cli("audit", "list", "-o", "json")) == before


def test_duplicate_entry_conflict(server: ServerProcess) -> None:
    args = ["entry", "create", "--spiffe-id", f"spiffe://{TD}/dup", "--parent-id",
            f"spiffe://{TD}/node/a", "--selector", "unix:uid:7"]  # fmt: skip
    assert server.cli(*args).returncode == 0
    again = server.cli(*args)
    assert again.returncode == 1 and "conflict" in again.stderr


def test_x509_mint_writes_a_valid_svid(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "svid"
    result = server.cli(
        "x509", "mint", "--spiffe-id", f"spiffe://{TD}/minted", "--ttl", "120", "--write", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o600
    svid = X509Svid.load(str(out / "svid.pem"), str(out / "svid.key"), encoding=_pem())
    assert str(svid.spiffe_id) == f"spiffe://{TD}/minted"
    bundle = X509Bundle.load(svid.spiffe_id.trust_domain, str(out / "bundle.pem"), _pem())
    [root] = bundle.x509_authorities
    svid.leaf.verify_directly_issued_by(root)
    lifetime = svid.leaf.not_valid_after_utc - svid.leaf.not_valid_before_utc
    assert lifetime.total_seconds() <= 130


def _pem() -> object:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


def test_jwt_mint_and_bundle(server: ServerProcess) -> None:
    token = server.cli("jwt", "mint", "--spiffe-id", f"spiffe://{TD}/j", "--audience", "db")
    assert token.returncode == 0, token.stderr
    bundle = server.cli("bundle", "show", "--format", "spiffe")
    doc = json.loads(bundle.stdout)
    from spiffe import JwtBundle, JwtSvid, TrustDomain

    # py-spiffe's JwtBundle takes JWT keys only (as the Workload API serves them).
    jwt_only = {"keys": [k for k in doc["keys"] if k["use"] == "jwt-svid"]}
    jwt_bundle = JwtBundle.parse(TrustDomain(TD), json.dumps(jwt_only).encode())
    svid = JwtSvid.parse_and_validate(token.stdout.strip(), jwt_bundle, {"db"})
    assert str(svid.spiffe_id) == f"spiffe://{TD}/j"
    assert doc["spiffe_sequence"] >= 1
    pem = server.cli("bundle", "show")
    assert x509.load_pem_x509_certificates(pem.stdout.encode())


def test_token_generate_last_word(server: ServerProcess) -> None:
    result = server.cli(
        "token", "generate", "--spiffe-id", f"spiffe://{TD}/node/alias", "--ttl", "60"
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.split()[-1]
    assert len(token) >= 32
    events = _json(server.cli("audit", "list", "--kind", "token.created", "-o", "json"))
    assert token not in json.dumps(events), "the secret must never be stored or listed"


def test_federated_bundle_set_list_delete(server: ServerProcess, tmp_path: Path) -> None:
    ours = server.cli("bundle", "show", "--format", "spiffe").stdout
    path = tmp_path / "other.json"
    path.write_text(ours)
    assert (
        server.cli("bundle", "set", "--trust-domain", "other.org", "--file", str(path)).returncode
        == 0
    )
    listed = _json(server.cli("bundle", "list", "-o", "json"))
    assert [b["trust_domain"] for b in listed] == ["other.org"]  # type: ignore[index]
    assert server.cli("bundle", "delete", "--trust-domain", "other.org").returncode == 0
    assert _json(server.cli("bundle", "list", "-o", "json")) == []
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": [{"use": "x509-svid", "kty": "EC", "x5c": []}]}')
    refused = server.cli("bundle", "set", "--trust-domain", "bad.org", "--file", str(bad))
    assert refused.returncode == 1 and "keys[0]" in refused.stderr


def test_other_uid_is_refused_even_if_the_socket_is_opened_up() -> None:
    """The folder (0700) and socket (0600) keep others out; the uid check is a second wall."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    root = Path(tempfile.mkdtemp(prefix="meshid-uid-"))  # /tmp/pytest-of-root is 0700
    os.chmod(root, 0o755)
    proc = ServerProcess(root / "data", root / "admin" / "admin.sock").start()
    try:
        os.chmod(proc.socket.parent, 0o755)
        os.chmod(proc.socket, 0o666)
        assert _status_as_uid(proc.socket, 65534) == 403
        assert _status_as_uid(proc.socket, 0) == 200
    finally:
        proc.stop()
        shutil.rmtree(root)


def _status_as_uid(sock_path: Path, uid: int) -> int:
    """HTTP status the admin API gives a raw client running as ``uid`` (forked, setuid)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to uid, one raw HTTP request, report the status line
        status = b"000"
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(str(sock_path))
                conn.sendall(b"GET /v1/entries HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status = conn.recv(64).split(b" ")[1]
        finally:
            os.write(write_end, status)
            os._exit(0)
    os.close(write_end)
    status = os.read(read_end, 3)
    os.close(read_end)
    os.waitpid(pid, 0)
    return int(status)


def test_audit_tamper_detected(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", tmp_path / "admin" / "admin.sock").start()
    try:
        for i in range(3):
            assert proc.cli(
                "entry", "create", "--spiffe-id", f"spiffe://{TD}/t{i}", "--parent-id",
                f"spiffe://{TD}/node/a", "--selector", f"unix:uid:{i}",
            ).returncode == 0  # fmt: skip
        ok = proc.cli("audit", "verify")
        assert ok.returncode == 0 and "intact" in ok.stdout
        events = _json(proc.cli("audit", "list", "--kind", "entry.created", "-o", "json"))
        target = events[1]["seq"]  # type: ignore[index]
        with sqlite3.connect(proc.data_dir / "datastore.sqlite3") as db:
            db.execute("UPDATE audit_events SET actor = 'uid:4242' WHERE seq = ?", (target,))
        broken = proc.cli("audit", "verify")
        assert broken.returncode == 1
        assert f"event {target}" in broken.stderr and "altered" in broken.stderr
    finally:
        proc.stop()


def test_times_are_rfc3339_with_a_zone(server: ServerProcess) -> None:
    events = server.cli("audit", "list", "--since", "2000-01-01T00:00:00Z", "-o", "json")
    assert events.returncode == 0 and json.loads(events.stdout)
    future = server.cli("audit", "list", "--since", "2999-01-01T00:00:00+02:00", "-o", "json")
    assert json.loads(future.stdout) == []
    naive = server.cli("audit", "list", "--since", "2000-01-01T00:00:00")
    assert naive.returncode == 1 and "time zone" in naive.stderr
    entry = server.cli(
        "entry", "create", "--spiffe-id", f"spiffe://{TD}/expiring", "--parent-id",
        f"spiffe://{TD}/node/a", "--selector", "unix:uid:5", "--expires-at", "2999-01-01T00:00:00Z",
        "-o", "json",
    )  # fmt: skip
    assert json.loads(entry.stdout)["expires_at"].startswith("2999-01-01T00:00:00")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"parent_id": f"spiffe://{TD}/n", "selectors": ["unix:uid:1"]}, "spiffe_id"),
        (
            {
                "spiffe_id": f"spiffe://{TD}/x",
                "parent_id": f"spiffe://{TD}/n",
                "selectors": "unix:uid:1",
            },
            "selectors",
        ),
        (
            {"spiffe_id": f"spiffe://{TD}/x", "parent_id": f"spiffe://{TD}/n", "selectors": []},
            "selectors",
        ),
        (
            {"spiffe_id": 5, "parent_id": f"spiffe://{TD}/n", "selectors": ["unix:uid:1"]},
            "spiffe_id",
        ),
        (
            {
                "spiffe_id": f"spiffe://{TD}/x",
                "parent_id": f"spiffe://{TD}/n",
                "selectors": ["unix:uid:1"],
                "extra": 1,
            },
            "extra",
        ),
        (
            {
                "spiffe_id": f"spiffe://{TD}/x",
                "parent_id": f"spiffe://{TD}/n",
                "selectors": ["unix:uid:1"],
                "hint": "h" * 500,
            },
            "hint",
        ),
        (
            {
                "spiffe_id": f"spiffe://{TD}/x",
                "parent_id": f"spiffe://{TD}/n",
                "selectors": ["u:" + "v" * 5000],
            },
            "selectors",
        ),
    ],
    ids=[
        "missing",
        "selectors-not-list",
        "selectors-empty",
        "wrong-type",
        "unknown-field",
        "oversize-hint",
        "oversize-selector",
    ],
)
def test_api_problem_details_name_the_field(
    server: ServerProcess, body: dict[str, object], field: str
) -> None:
    from meshid.client import AdminClient

    with AdminClient(server.socket) as client:
        before = client.json("GET", "/v1/audit", params={"limit": 10000})
        response = client._http.post("/v1/entries", json=body)
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["field"].split(".")[0] == field and problem["rule"], problem
        assert client.json("GET", "/v1/audit", params={"limit": 10000}) == before


def test_api_rejects_malformed_json(server: ServerProcess) -> None:
    from meshid.client import AdminClient

    with AdminClient(server.socket) as client:
        response = client._http.post(
            "/v1/entries", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["status"] == 400
        assert client._http.get("/openapi.json").status_code == 200


def test_mint_from_a_public_key(server: ServerProcess) -> None:
    from cryptography.hazmat.primitives import serialization

    from ca.keys import KeyType, generate_key
    from meshid.client import AdminClient

    key = generate_key(KeyType.EC_P256)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with AdminClient(server.socket) as client:
        out = client.json(
            "POST",
            "/v1/x509/mint",
            json={"spiffe_id": f"spiffe://{TD}/pk", "public_key": pem.decode()},
        )
        leaf = x509.load_pem_x509_certificates(out["chain_pem"].encode())[0]
        assert leaf.public_key() == key.public_key()
        both = client._http.post(
            "/v1/x509/mint",
            json={"spiffe_id": f"spiffe://{TD}/pk", "public_key": pem.decode(), "csr": "x"},
        )
        assert both.status_code == 400 and both.json()["field"] == "csr"
