"""The node API over real TLS with real grpcio clients: attestation, authentication, renewal.

Each test runs a scenario under ``asyncio.run`` against an in-process server on 127.0.0.1:0
(``tests/ca/nodeapi_support.py``); the datastore is a real SQLite file, or the machine's
PostgreSQL where the test takes ``database_url``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId

from ca.audit import EventKind
from ca.bundle import from_spiffe_json
from ca.datastore.nodes import get_node
from ca.keys import KeyType, generate_key, private_key_pem
from ca.nodeapi import node_pb2, node_pb2_grpc
from ca.service import X509Request
from ca.validation import validate_x509_svid, verify_chain
from tests.ca.nodeapi_support import (
    TD,
    Agent,
    Harness,
    ProvisioningCa,
    attest,
    csr_der,
    join,
    pem_chain,
    run,
    running,
)


def _code(err: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> grpc.StatusCode:
    return err.value.code()


def _audit(h: Harness, kind: str) -> list[tuple[str, str | None, dict[str, object]]]:
    with h.ca.store.read() as tx:
        return [(e.actor, e.spiffe_id, e.details) for e in tx.list_audit(kind=kind)]


async def _renew(h: Harness, agent: Agent, key: object = None) -> node_pb2.RenewAgentResponse:
    new_key = key or generate_key(KeyType.EC_P256)
    async with h.channel(agent) as channel:
        return await node_pb2_grpc.NodeStub(channel).RenewAgent(
            node_pb2.RenewAgentRequest(csr=csr_der(new_key)),
            timeout=10,  # type: ignore[arg-type]
        )


# -- TLS ------------------------------------------------------------------------------------
def test_the_server_presents_its_svid_with_the_tls_name_and_speaks_h2(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            host, port = h.address.rsplit(":", 1)
            ctx = ssl.create_default_context(cadata=h.bundle_pem().decode())
            ctx.set_alpn_protocols(["h2"])

            def handshake() -> tuple[bytes, str | None]:
                with (
                    socket.create_connection((host, int(port))) as raw,
                    ctx.wrap_socket(raw, server_hostname="meshid-server") as tls,
                ):
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    return der, tls.selected_alpn_protocol()

            der, alpn = await asyncio.to_thread(handshake)
            assert alpn == "h2"
            leaf = x509.load_der_x509_certificate(der)
            assert validate_x509_svid([leaf], trust_domain=TD) == SpiffeId(
                "spiffe://example.org/meshid/server"
            )
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.DNSName) == ["meshid-server"]
            # A renewed server SVID is presented by the next handshake, without a restart.
            await asyncio.to_thread(h.identity.renew)
            renewed, _ = await asyncio.to_thread(handshake)
            serial = x509.load_der_x509_certificate(renewed).serial_number
            assert serial != leaf.serial_number

    run(scenario)


# -- join_token -----------------------------------------------------------------------------
def test_join_token_attestation_is_single_use_and_audited(
    tmp_path: Path, database_url: str
) -> None:
    async def scenario() -> None:
        async with running(tmp_path, database_url) as h:
            issued = await h.in_thread(
                h.ca.generate_token, "uid:0", spiffe_id="spiffe://example.org/cluster/a"
            )
            agent = await attest(h, "join_token", issued.token.encode())
            assert agent.spiffe_id == f"spiffe://example.org/meshid/agent/join_token/{issued.id}"
            assert agent.selectors == []
            chain = [x509.load_der_x509_certificate(d) for d in agent.chain]
            assert validate_x509_svid(chain, trust_domain=TD) == SpiffeId(agent.spiffe_id)
            verify_chain(chain, h.ca.bundle().x509_authorities, now=h.ca.clock())
            assert chain[0].public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) == agent.key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attest(h, "join_token", issued.token.encode())
            assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == "join token invalid, used or expired"
            with h.ca.store.read() as tx:
                node = get_node(tx, agent.spiffe_id)
            assert node is not None
            assert node.aliases == ("spiffe://example.org/cluster/a",)
            assert node.serial == chain[0].serial_number and node.previous_serial is None
            assert not node.banned
            assert _audit(h, EventKind.TOKEN_USED) == [
                (agent.spiffe_id, "spiffe://example.org/cluster/a", {"token_id": issued.id})
            ]
            [(actor, sid, details)] = _audit(h, EventKind.AGENT_ATTESTED)
            assert (actor, sid, details["attestation_type"]) == (
                agent.spiffe_id,
                agent.spiffe_id,
                "join_token",
            )
            assert any(
                a == agent.spiffe_id and s == agent.spiffe_id
                for a, s, _ in _audit(h, EventKind.X509_SVID_ISSUED)
            )
            assert h.ca.verify_audit().ok

    run(scenario)


def test_join_token_refusals_store_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            token = await h.token()
            with h.ca.store.read() as tx:
                before = tx.audit_head()
            cases: list[tuple[str, bytes, bytes | None, grpc.StatusCode]] = [
                ("join_token", token.encode(), b"not a csr", grpc.StatusCode.INVALID_ARGUMENT),
                ("join_token", b"", None, grpc.StatusCode.INVALID_ARGUMENT),
                ("tpm", token.encode(), None, grpc.StatusCode.INVALID_ARGUMENT),
                ("join_token", b"no-such-token", None, grpc.StatusCode.PERMISSION_DENIED),
            ]
            for kind, payload, csr, code in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await attest(h, kind, payload, csr=csr)
                assert _code(err) == code, (kind, payload, err.value.details())
            with h.ca.store.read() as tx:
                assert tx.audit_head() == before
            # Nothing was consumed: the token still works once.
            await attest(h, "join_token", token.encode())

    run(scenario)


def test_an_expired_join_token_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            token = await h.token(ttl=timedelta(seconds=5))
            h.clock.offset = timedelta(seconds=6)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attest(h, "join_token", token.encode())
            assert _code(err) == grpc.StatusCode.PERMISSION_DENIED

    run(scenario)


def test_attestation_must_start_with_params(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h, h.channel() as channel:
            call = node_pb2_grpc.NodeStub(channel).AttestAgent()
            await call.write(node_pb2.AttestAgentRequest(challenge_response=b"x"))
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT

    run(scenario)


# -- x509pop --------------------------------------------------------------------------------
def test_x509pop_attestation_proves_the_node_key(tmp_path: Path) -> None:
    root = ProvisioningCa.create()
    inter = root.intermediate()
    node = inter.node("node-7", ("node-7.example.org", "n7.internal"))
    other = ProvisioningCa.create("someone else's CA").node()

    async def scenario() -> None:
        async with running(tmp_path, provisioning_cas=[root.certificate]) as h:
            agent = await attest(h, "x509pop", node.pem(inter.certificate), answer=node.sign)
            fingerprint = _sha1(node.certificate)
            assert agent.spiffe_id == f"spiffe://example.org/meshid/agent/x509pop/{fingerprint}"
            assert sorted(agent.selectors) == sorted(
                [
                    "x509pop:subject:cn:node-7",
                    f"x509pop:ca:fingerprint:{_sha1(inter.certificate)}",
                    f"x509pop:ca:fingerprint:{_sha1(root.certificate)}",
                    "x509pop:san:dns:node-7.example.org",
                    "x509pop:san:dns:n7.internal",
                ]
            )
            # Re-attestation of the same node is allowed and keeps the ID; the record follows.
            again = await attest(h, "x509pop", node.pem(inter.certificate), answer=node.sign)
            assert again.spiffe_id == agent.spiffe_id
            with h.ca.store.read() as tx:
                stored = get_node(tx, agent.spiffe_id)
            assert stored is not None and stored.serial == again.leaf.serial_number
            assert [d["reattested"] for _, _, d in _audit(h, EventKind.AGENT_ATTESTED)] == [
                False,
                True,
            ]

            # The wrong key answers the challenge: refused, nothing stored.
            wrong = generate_key(KeyType.EC_P256)
            fresh = inter.node("node-8", ())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attest(
                    h,
                    "x509pop",
                    fresh.pem(inter.certificate),
                    answer=lambda c: fresh.sign(c, wrong),
                )
            assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == "challenge response does not verify"
            # Untrusted CA, missing intermediate, expired certificate: refused before a challenge.
            for payload in (
                other.pem(),
                fresh.pem(),
                inter.node("old", (), expired=True).pem(inter.certificate),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await attest(h, "x509pop", payload, answer=None)
                assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
                assert err.value.details() == "node certificate not trusted"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attest(h, "x509pop", b"not pem", answer=None)
            assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
            assert len(h.server.nodes.list_agents()) == 1

    run(scenario)


def test_x509pop_with_an_rsa_node_key_uses_pss(tmp_path: Path) -> None:
    root = ProvisioningCa.create()
    node = root.node("rsa-node", (), KeyType.RSA_2048)

    async def scenario() -> None:
        async with running(tmp_path, provisioning_cas=[root.certificate]) as h:
            agent = await attest(h, "x509pop", node.pem(), answer=node.sign)
            assert agent.selectors[0] == "x509pop:subject:cn:rsa-node"

    run(scenario)


def test_x509pop_is_refused_when_not_configured(tmp_path: Path) -> None:
    node = ProvisioningCa.create().node()

    async def scenario() -> None:
        async with running(tmp_path) as h:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attest(h, "x509pop", node.pem(), answer=node.sign)
            assert _code(err) == grpc.StatusCode.PERMISSION_DENIED

    run(scenario)


def _sha1(cert: x509.Certificate) -> str:
    import hashlib

    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- authentication and renewal -------------------------------------------------------------
def test_calls_need_the_current_svid_of_an_attested_agent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            agent = await join(h)

            def minted(spiffe_id: str) -> tuple[bytes, bytes]:
                key = generate_key(KeyType.EC_P256)
                [svid] = h.ca.sign_x509_svids(
                    [X509Request(SpiffeId(spiffe_id), key.public_key())], "test"
                )
                der = [c.public_bytes(serialization.Encoding.DER) for c in svid.chain]
                return private_key_pem(key), pem_chain(der)

            refused = {
                "no certificate": None,
                "a workload SVID": minted("spiffe://example.org/web"),
                "an agent ID never attested": minted(
                    "spiffe://example.org/meshid/agent/join_token/nobody"
                ),
                "a second SVID for the agent's ID": minted(agent.spiffe_id),
            }
            for why, creds in refused.items():
                async with h.channel(creds) as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await node_pb2_grpc.NodeStub(channel).RenewAgent(
                            node_pb2.RenewAgentRequest(csr=csr_der(generate_key(KeyType.EC_P256))),
                            timeout=10,
                        )
                assert _code(err) == grpc.StatusCode.PERMISSION_DENIED, why

    run(scenario)


def test_renewal_rotates_the_serials(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            first = await join(h)
            key = generate_key(KeyType.EC_P256)
            response = await _renew(h, first, key)
            second = Agent(first.spiffe_id, key, list(response.svid.cert_chain))
            assert response.svid.spiffe_id == first.spiffe_id
            assert second.leaf.serial_number != first.leaf.serial_number
            assert from_spiffe_json(TD, response.svid.bundle.spiffe_bundle).x509_authorities
            # The previous SVID still works while the agent switches; the one before does not.
            key3 = generate_key(KeyType.EC_P256)
            third = Agent(
                first.spiffe_id, key3, list((await _renew(h, first, key3)).svid.cert_chain)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _renew(h, first)
            assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == "agent SVID superseded"
            await _renew(h, third)
            kinds = [d["serial"] for _, _, d in _audit(h, EventKind.AGENT_RENEWED)]
            assert len(kinds) == 3
            del second

    run(scenario)
