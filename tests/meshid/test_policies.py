"""Policies stored on the server: apply, list, show, delete, check against them; bad documents
are refused with the parser's precise error and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow

ALLOW_FRONTEND = """\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {name: web-read}
spec:
  selector: {spiffe_ids: ["spiffe://example.org/web"]}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["spiffe://example.org/frontend"]}}]
      to: [{operation: {methods: ["GET"]}}]
"""
DENY_ADMIN = """\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  action: DENY
  rules:
    - to: [{operation: {paths: ["/admin*"]}}]
"""
BROKEN_SECOND = (
    DENY_ADMIN.replace("no-admin", "fine")
    + "---\napiVersion: meshid/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad}\n"
    + "spec:\n  action: PERMIT\n"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("policies")
    proc = ServerProcess(root / "data", root / "admin" / "s.sock").start()
    yield proc
    proc.stop()


def _state(server: ServerProcess) -> tuple[str, str]:
    return (
        server.cli("policy", "list", "-o", "json").stdout,
        server.cli("audit", "list", "-o", "json").stdout,
    )


def test_apply_list_show_check_delete(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(ALLOW_FRONTEND + "---\n" + DENY_ADMIN)
    applied = server.cli("policy", "apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    assert "web-read: applied" in applied.stdout and "no-admin: applied" in applied.stdout
    again = server.cli("policy", "apply", "-f", str(path))
    assert "web-read: unchanged" in again.stdout, "re-applying the same document changes nothing"
    names = [p["name"] for p in json.loads(server.cli("policy", "list", "-o", "json").stdout)]
    assert names == ["no-admin", "web-read"]
    shown = server.cli("policy", "show", "--name", "web-read")
    assert "spiffe://example.org/frontend" in shown.stdout

    def check(*extra: str) -> int:
        return server.cli(
            "policy", "check", "--destination", "spiffe://example.org/web", *extra
        ).returncode

    assert check("--source", "spiffe://example.org/frontend", "--path", "/api") == 0
    assert check("--source", "spiffe://example.org/frontend", "--path", "/admin/x") == 2
    assert check("--source", "spiffe://example.org/other", "--path", "/api") == 2

    events = json.loads(
        server.cli("audit", "list", "--kind", "policy.applied", "-o", "json").stdout
    )
    assert {e["details"]["name"] for e in events} == {"web-read", "no-admin"}
    assert all(e["actor"].startswith("uid:") for e in events)
    assert server.cli("policy", "delete", "--name", "no-admin").returncode == 0
    assert check("--source", "spiffe://example.org/frontend", "--path", "/admin/x") == 0
    missing = server.cli("policy", "delete", "--name", "no-admin")
    assert missing.returncode == 1 and "not found" in missing.stderr


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (BROKEN_SECOND, "bad.yaml:13: spec.action"),
        ("apiVersion: meshid/v1\nkind: Nope\nmetadata: {name: x}\nspec: {}\n", "bad.yaml:2: kind"),
        ("just: [unclosed\n", "bad.yaml"),
        ("", "no AuthorizationPolicy document"),
    ],
    ids=["second-doc-invalid", "wrong-kind", "bad-yaml", "empty"],
)
def test_invalid_documents_store_nothing(
    server: ServerProcess, tmp_path: Path, text: str, where: str
) -> None:
    before = _state(server)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    refused = server.cli("policy", "apply", "-f", str(path))
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0], refused.stderr
    assert _state(server) == before
