"""End to end: an agent attests with x509pop, a node entry aliases it, and the CLI's workload
commands (healthcheck, svid fetch) work against it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from ca.keys import KeyType, private_key_pem
from tests.ca.nodeapi_support import ProvisioningCa
from tests.e2e.test_agent import _wait_for_ids
from tests.support.processes import AgentProcess, ServerProcess, free_port, meshid

pytestmark = pytest.mark.slow
TD = "example.org"


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048], ids=["ec", "rsa"])
def test_x509pop_agent_with_a_node_alias(key_type: KeyType, short_tmp: Path) -> None:
    root = short_tmp
    ca = ProvisioningCa.create()
    node = ca.node("node-7", ("node-7.example.org",), key_type)
    (root / "prov.pem").write_bytes(ca.certificate.public_bytes(Encoding.PEM))
    (root / "node.pem").write_bytes(node.pem())
    (root / "node.key").write_bytes(private_key_pem(node.key))
    port = free_port()
    server = ServerProcess(
        root / "srv",
        root / "adm" / "s.sock",
        extra_args=["--bind", f"127.0.0.1:{port}", "--x509pop-ca-bundle", str(root / "prov.pem")],
    ).start()
    agent = None
    try:
        (root / "bundle.pem").write_text(server.cli("bundle", "show").stdout)
        # A node entry: every node whose certificate says CN=node-7 is also spiffe://TD/nodes/7.
        alias = server.cli(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/nodes/7",
            "--parent-id", f"spiffe://{TD}/meshid/server",
            "--selector", "x509pop:subject:cn:node-7",
        )  # fmt: skip
        assert alias.returncode == 0, alias.stderr
        workload = server.cli(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/on-node-7",
            "--parent-id", f"spiffe://{TD}/nodes/7", "--selector", f"unix:uid:{os.getuid()}",
        )  # fmt: skip
        assert workload.returncode == 0, workload.stderr
        agent = AgentProcess(
            root / "agent",
            root / "wl" / "api.sock",
            [f"127.0.0.1:{port}"],
            root / "bundle.pem",
            extra_args=[
                "--x509pop-cert",
                str(root / "node.pem"),
                "--x509pop-key",
                str(root / "node.key"),
            ],
        ).start()
        endpoint = f"unix://{agent.socket}"
        assert _wait_for_ids(endpoint, [f"spiffe://{TD}/on-node-7"], timeout=30)
        agents = json.loads(server.cli("agent", "list", "-o", "json").stdout)
        [attested] = agents
        assert attested["spiffe_id"].startswith(f"spiffe://{TD}/meshid/agent/x509pop/")

        health = meshid("agent", "healthcheck", "--socket", str(agent.socket))
        assert health.returncode == 0, health.stderr
        out = root / "fetched"
        fetched = meshid(
            "svid", "fetch", "x509", "--socket", str(agent.socket), "--write", str(out)
        )
        assert fetched.returncode == 0, fetched.stderr
        assert f"spiffe://{TD}/on-node-7" in fetched.stdout
        assert stat.S_IMODE((out / "svid.0.key").stat().st_mode) == 0o600
        assert (out / "bundle.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
        env_fetch = meshid(
            "svid", "fetch", "jwt", "--audience", "db", env={"SPIFFE_ENDPOINT_SOCKET": endpoint}
        )
        assert env_fetch.returncode == 0 and env_fetch.stdout.count(".") == 2, env_fetch.stderr
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


def test_healthcheck_fails_without_an_agent(tmp_path: Path) -> None:
    result = meshid("agent", "healthcheck", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1 and "not healthy" in result.stderr
