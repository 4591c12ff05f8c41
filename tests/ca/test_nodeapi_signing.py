"""BatchNewX509SVID and NewJWTSVID over real TLS: only for entries the agent is authorized for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from spiffe import SpiffeId

from ca.audit import EventKind
from ca.keys import KeyType, generate_key
from ca.nodeapi import node_pb2, node_pb2_grpc
from ca.validation import validate_x509_svid, verify_chain
from tests.ca.nodeapi_support import (
    SERVER_ID,
    TD,
    Agent,
    Harness,
    ProvisioningCa,
    attest,
    csr_der,
    join,
    run,
    running,
)

NOT_AUTHORIZED = "entry not authorized for this agent"


async def _sign(
    h: Harness, agent: Agent, *entry_ids: str, csr: bytes | None = None
) -> list[node_pb2.X509SVIDResult]:
    requests = [
        node_pb2.X509SVIDRequest(
            entry_id=e, csr=csr if csr is not None else csr_der(generate_key(KeyType.EC_P256))
        )
        for e in entry_ids
    ]
    async with h.channel(agent) as channel:
        response = await node_pb2_grpc.NodeStub(channel).BatchNewX509SVID(
            node_pb2.BatchNewX509SVIDRequest(requests=requests), timeout=10
        )
    return list(response.results)


async def _jwt(
    h: Harness, agent: Agent, entry_id: str, *audience: str
) -> node_pb2.NewJWTSVIDResponse:
    async with h.channel(agent) as channel:
        return await node_pb2_grpc.NodeStub(channel).NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=list(audience)), timeout=10
        )


def test_an_agent_cannot_get_an_svid_for_someone_elses_entry(
    tmp_path: Path, database_url: str
) -> None:
    async def scenario() -> None:
        async with running(tmp_path, database_url) as h:
            a, b = await join(h), await join(h)
            mine = await h.entry(
                "web", a.spiffe_id, x509_svid_ttl=120, dns_names=["web.example.org"]
            )
            theirs = await h.entry("db", b.spiffe_id)
            results = await _sign(h, a, mine.id, theirs.id, "no-such-entry")
            assert [(r.entry_id, r.error) for r in results] == [
                (mine.id, ""),
                (theirs.id, NOT_AUTHORIZED),
                ("no-such-entry", NOT_AUTHORIZED),
            ]
            assert not results[1].cert_chain and not results[2].cert_chain
            chain = [x509.load_der_x509_certificate(d) for d in results[0].cert_chain]
            assert validate_x509_svid(chain, trust_domain=TD) == SpiffeId(
                "spiffe://example.org/web"
            )
            verify_chain(chain, h.ca.bundle().x509_authorities, now=h.ca.clock())
            leaf = chain[0]
            assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() <= 130
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.DNSName) == ["web.example.org"]
            # Every issuance is audited with the agent as actor; the refusals issue nothing.
            with h.ca.store.read() as tx:
                issued = [
                    (e.actor, e.spiffe_id)
                    for e in tx.list_audit(kind=EventKind.X509_SVID_ISSUED)
                    if e.spiffe_id in {"spiffe://example.org/web", "spiffe://example.org/db"}
                ]
            assert issued == [(a.spiffe_id, "spiffe://example.org/web")]
            # B gets its own.
            [result] = await _sign(h, b, theirs.id)
            assert result.cert_chain and not result.error

    run(scenario)


def test_bad_csrs_fail_per_request_not_per_batch(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            agent = await join(h)
            one = await h.entry("one", agent.spiffe_id)
            async with h.channel(agent) as channel:
                response = await node_pb2_grpc.NodeStub(channel).BatchNewX509SVID(
                    node_pb2.BatchNewX509SVIDRequest(
                        requests=[
                            node_pb2.X509SVIDRequest(entry_id=one.id, csr=b"garbage"),
                            node_pb2.X509SVIDRequest(
                                entry_id=one.id, csr=csr_der(generate_key(KeyType.EC_P256))
                            ),
                        ]
                    ),
                    timeout=10,
                )
            bad, good = response.results
            assert bad.error.startswith("csr:") and not bad.cert_chain
            assert good.cert_chain and not good.error

    run(scenario)


def test_transitive_alias_and_node_entry_authorization(tmp_path: Path) -> None:
    root = ProvisioningCa.create()
    node = root.node("node-1", ())

    async def scenario() -> None:
        async with running(tmp_path, provisioning_cas=[root.certificate]) as h:
            agent = await join(h, alias="spiffe://example.org/cluster/blue")
            other = await join(h)
            pop = await attest(h, "x509pop", node.pem(), answer=node.sign)
            child = await h.entry("app", agent.spiffe_id)
            grandchild = await h.entry("app-sidecar", "spiffe://example.org/app")
            via_alias = await h.entry("blue-app", "spiffe://example.org/cluster/blue")
            fleet = await h.entry("fleet", SERVER_ID, "x509pop:subject:cn:node-1")
            fleet_app = await h.entry("fleet-app", "spiffe://example.org/fleet")
            results = await _sign(
                h, agent, child.id, grandchild.id, via_alias.id, fleet.id, fleet_app.id
            )
            assert [r.error for r in results] == ["", "", "", NOT_AUTHORIZED, NOT_AUTHORIZED]
            results = await _sign(h, pop, fleet.id, fleet_app.id, child.id)
            assert [r.error for r in results] == ["", "", NOT_AUTHORIZED]
            results = await _sign(h, other, child.id, grandchild.id, via_alias.id)
            assert {r.error for r in results} == {NOT_AUTHORIZED}
            # A new entry is signable at once (the cached walk is checked again on a miss).
            late = await h.entry("late", agent.spiffe_id)
            [result] = await _sign(h, agent, late.id)
            assert not result.error

    run(scenario)


def test_jwt_svids_only_for_authorized_entries(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            a, b = await join(h), await join(h)
            mine = await h.entry("web", a.spiffe_id, jwt_svid_ttl=60)
            theirs = await h.entry("db", b.spiffe_id)
            response = await _jwt(h, a, mine.id, "spiffe://example.org/db")
            claims = jwt.decode(response.token, options={"verify_signature": False})
            assert claims["sub"] == "spiffe://example.org/web"
            assert claims["aud"] in ("spiffe://example.org/db", ["spiffe://example.org/db"])
            assert claims["exp"] == response.expires_at
            assert claims["exp"] - claims["iat"] <= 60
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _jwt(h, a, theirs.id, "x")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == NOT_AUTHORIZED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _jwt(h, a, mine.id)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(scenario)


def test_ban_cuts_off_signing_and_renewal_and_evict_forces_reattestation(
    tmp_path: Path,
) -> None:
    root = ProvisioningCa.create()
    node = root.node("node-1", ())

    async def scenario() -> None:
        async with running(tmp_path, provisioning_cas=[root.certificate]) as h:
            agent = await attest(h, "x509pop", node.pem(), answer=node.sign)
            entry = await h.entry("web", agent.spiffe_id)
            assert not (await _sign(h, agent, entry.id))[0].error
            await h.in_thread(h.server.nodes.ban, agent.spiffe_id, "uid:0")
            for call in (
                _sign(h, agent, entry.id),
                _jwt(h, agent, entry.id, "aud"),
                _renew(h, agent),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert err.value.details() == "agent is banned"
            # A banned node cannot attest again either.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attest(h, "x509pop", node.pem(), answer=node.sign)
            assert err.value.details() == "agent is banned"
            # Evicting removes the record: the old SVID is useless, attesting again works.
            await h.in_thread(h.server.nodes.evict, agent.spiffe_id, "uid:0")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _sign(h, agent, entry.id)
            assert err.value.details() == "agent is not attested"
            again = await attest(h, "x509pop", node.pem(), answer=node.sign)
            assert again.spiffe_id == agent.spiffe_id
            assert not (await _sign(h, again, entry.id))[0].error
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _sign(h, agent, entry.id)  # the pre-eviction SVID stays refused
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    run(scenario)


def test_an_evicted_join_token_agent_needs_a_new_token(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            token = await h.token()
            agent = await attest(h, "join_token", token.encode())
            await h.in_thread(h.server.nodes.evict, agent.spiffe_id, "uid:0")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _renew(h, agent)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attest(h, "join_token", token.encode())
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await join(h)).spiffe_id != agent.spiffe_id

    run(scenario)


async def _renew(h: Harness, agent: Agent) -> node_pb2.RenewAgentResponse:
    async with h.channel(agent) as channel:
        return await node_pb2_grpc.NodeStub(channel).RenewAgent(
            node_pb2.RenewAgentRequest(csr=csr_der(generate_key(KeyType.EC_P256))), timeout=10
        )


def test_concurrent_calls_of_many_agents(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            agents = [await join(h) for _ in range(8)]
            entries = [await h.entry(f"w{i}", a.spiffe_id) for i, a in enumerate(agents)]
            results = await asyncio.gather(
                *(_sign(h, a, e.id) for a, e in zip(agents, entries, strict=True))
            )
            assert all(r[0].cert_chain and not r[0].error for r in results)

    run(scenario)
