"""``meshid server run --bind``: the node API in the real server process, agents administered
through the admin API and the ``meshid agent list|show|ban|evict`` commands."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
import typer
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import CliRunner

from ca.keys import KeyType, generate_key, private_key_pem
from ca.nodeapi import node_pb2, node_pb2_grpc
from ca.server_identity import SERVER_TLS_NAME
from meshid.agents_admin import register
from meshid.client import AdminClient, AdminError
from tests.ca.nodeapi_support import (
    READ_TIMEOUT,
    NodeCert,
    ProvisioningCa,
    csr_der,
    pem_chain,
    run,
)
from tests.support.processes import ServerProcess, free_port

pytestmark = pytest.mark.slow


class Node:
    """A minimal agent over grpcio, as ``node_agent`` talks to the server."""

    def __init__(self, address: str, bundle: bytes) -> None:
        self.address = address
        self.bundle = bundle
        self.key = generate_key(KeyType.EC_P256)
        self.credentials: tuple[bytes, bytes] | None = None
        self.spiffe_id = ""

    def channel(self) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.bundle,
            private_key=self.credentials[0] if self.credentials else None,
            certificate_chain=self.credentials[1] if self.credentials else None,
        )
        return grpc.aio.secure_channel(
            self.address, creds, options=[("grpc.ssl_target_name_override", SERVER_TLS_NAME)]
        )

    async def attest(self, kind: str, payload: bytes, node_cert: NodeCert | None = None) -> None:
        async with self.channel() as channel:
            call = node_pb2_grpc.NodeStub(channel).AttestAgent()
            params = node_pb2.AttestParams(type=kind, payload=payload, csr=csr_der(self.key))
            await call.write(node_pb2.AttestAgentRequest(params=params))
            response = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            if response.HasField("challenge"):
                assert node_cert is not None
                answer = node_cert.sign(response.challenge)
                await call.write(node_pb2.AttestAgentRequest(challenge_response=answer))
                response = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            await call.done_writing()
        self.spiffe_id = response.svid.spiffe_id
        self.credentials = (private_key_pem(self.key), pem_chain(response.svid.cert_chain))


@pytest.fixture
def server() -> Iterator[tuple[ServerProcess, str, ProvisioningCa]]:
    root = Path(tempfile.mkdtemp(prefix="mid-", dir="/tmp"))  # short Unix socket paths
    provisioning = ProvisioningCa.create()
    cas = root / "provisioning.pem"
    cas.write_bytes(provisioning.certificate.public_bytes(Encoding.PEM))
    port = free_port()
    proc = ServerProcess(
        root / "srv",
        root / "adm" / "s.sock",
        extra_args=["--bind", f"127.0.0.1:{port}", "--x509pop-ca-bundle", str(cas)],
    ).start()
    yield proc, f"127.0.0.1:{port}", provisioning
    assert proc.stop() == 0


def _cli(socket: Path, *args: str) -> tuple[int, str]:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, [*args, "--socket", str(socket)])
    return result.exit_code, result.output


def test_agents_through_the_server_process(
    server: tuple[ServerProcess, str, ProvisioningCa],
) -> None:
    proc, address, provisioning = server
    bundle = proc.cli("bundle", "show").stdout.encode()
    token = json.loads(proc.cli("token", "generate", "-o", "json").stdout)
    joined = Node(address, bundle)
    popped = Node(address, bundle)
    node_cert = provisioning.node("node-1", ("node-1.example.org",))

    async def attest_both() -> None:
        await joined.attest("join_token", token["token"].encode())
        await popped.attest("x509pop", node_cert.pem(), node_cert)

    run(attest_both)
    assert joined.spiffe_id == token["agent_id"]

    with AdminClient(proc.socket) as admin:
        agents = admin.json("GET", "/v1/agents")
        assert sorted(a["spiffe_id"] for a in agents) == sorted(
            [joined.spiffe_id, popped.spiffe_id]
        )
        shown = admin.json("GET", f"/v1/agents/{quote(popped.spiffe_id, safe='')}")
        assert shown["attestation_type"] == "x509pop" and not shown["banned"]
        assert "x509pop:san:dns:node-1.example.org" in shown["selectors"]
        assert admin.json("GET", f"/v1/agents/{joined.spiffe_id}")["spiffe_id"] == joined.spiffe_id

    # The CLI commands (registered on a Typer app of our own; the lead mounts them on `agent`).
    code, out = _cli(proc.socket, "list", "-o", "json")
    assert code == 0 and len(json.loads(out)) == 2
    code, out = _cli(proc.socket, "show", "--spiffe-id", popped.spiffe_id)
    assert code == 0 and "Attestation type : x509pop" in out
    assert "Selector         : x509pop:subject:cn:node-1" in out

    async def banned_while_syncing() -> None:
        async with popped.channel() as channel:
            call = node_pb2_grpc.NodeStub(channel).SyncEntries(node_pb2.SyncEntriesRequest())
            first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert first.full
            code, out = await asyncio.to_thread(
                _cli, proc.socket, "ban", "--spiffe-id", popped.spiffe_id
            )
            assert code == 0 and "banned" in out, out
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    run(banned_while_syncing)
    code, out = _cli(proc.socket, "ban", "--spiffe-id", popped.spiffe_id)
    assert code == 1 and "already banned" in out
    code, out = _cli(proc.socket, "evict", "--spiffe-id", joined.spiffe_id)
    assert code == 0
    code, out = _cli(proc.socket, "show", "--spiffe-id", joined.spiffe_id)
    assert code == 1 and "not-found" in out
    with AdminClient(proc.socket) as admin:
        with pytest.raises(AdminError, match="not-found"):
            admin.json("POST", f"/v1/agents/{quote(joined.spiffe_id, safe='')}/evict")
        events = admin.json("GET", "/v1/audit", params={"kind": "agent.banned"})
        assert [(e["spiffe_id"], e["actor"]) for e in events] == [
            (popped.spiffe_id, f"uid:{os.getuid()}")
        ]
        evicted = admin.json("GET", "/v1/audit", params={"kind": "agent.evicted"})
        assert [e["spiffe_id"] for e in evicted] == [joined.spiffe_id]
        assert admin.json("POST", "/v1/audit/verify")["ok"]


def test_sigterm_ends_open_streams_and_exits_cleanly(
    server: tuple[ServerProcess, str, ProvisioningCa],
) -> None:
    proc, address, _ = server
    bundle = proc.cli("bundle", "show").stdout.encode()
    token = json.loads(proc.cli("token", "generate", "-o", "json").stdout)
    node = Node(address, bundle)

    async def scenario() -> None:
        await node.attest("join_token", token["token"].encode())
        async with node.channel() as channel:
            call = node_pb2_grpc.NodeStub(channel).SyncEntries(node_pb2.SyncEntriesRequest())
            await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert await asyncio.to_thread(proc.stop) == 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario)
