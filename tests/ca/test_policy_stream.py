"""WatchPolicies: stored policies streamed to the workloads they select, over real TLS + gRPC.

The pure selection first (table-driven), then the in-process node API server on 127.0.0.1 with
real grpcio clients presenting workload SVIDs minted by the same CA.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain

from authz import parse_policy_dict
from ca.datastore import Datastore
from ca.keys import KeyType, MemoryKeyManager, generate_key, private_key_pem
from ca.nodeapi import node_pb2, node_pb2_grpc
from ca.nodeapi.policy_stream import FeedPolicy, feed_policy, select
from ca.policies import PolicyStore
from ca.service import CaService, CaSettings, X509Request
from tests.ca.nodeapi_support import READ_TIMEOUT, TD, Harness, pem_chain, run, running

WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"
DEADLINE = 1.0  # seconds: a policy change must reach a connected proxy well within this


def _policy(name: str, selector: list[str] | None = None, action: str = "DENY") -> str:
    spec: dict[str, Any] = {"action": action, "rules": [{}]}
    if selector is not None:
        spec["selector"] = {"spiffe_ids": selector}
    document = {"apiVersion": "meshid/v1", "kind": "AuthorizationPolicy"}
    return json.dumps({**document, "metadata": {"name": name}, "spec": spec})


def _feed(name: str, selector: list[str] | None) -> FeedPolicy:
    return feed_policy(name, json.loads(_policy(name, selector)))


# -- selection (pure) -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("policies", "caller", "expected"),
    [
        ([_feed("a", [WEB])], WEB, ["a"]),
        ([_feed("a", [DB])], WEB, []),
        ([_feed("a", None)], WEB, ["a"]),
        ([_feed("a", [DB, WEB])], WEB, ["a"]),
        ([_feed("b", None), _feed("a", [WEB]), _feed("c", [DB])], WEB, ["a", "b"]),
        ([FeedPolicy("broken", b"{}", None, parsed=False)], WEB, ["broken"]),
        ([], WEB, []),
    ],
    ids=[
        "selector names the caller",
        "selector names another",
        "no selector: everyone",
        "one of several",
        "sorted by name, others left out",
        "unparsable stored document: everyone",
        "nothing stored",
    ],
)
def test_selection(policies: list[FeedPolicy], caller: str, expected: list[str]) -> None:
    assert select(policies, 7, caller).names == tuple(expected)
    assert select(policies, 7, caller).revision == 7


def test_an_unparsable_stored_document_is_marked_and_kept_verbatim() -> None:
    broken = feed_policy("broken", {"kind": "Nope"})
    assert not broken.parsed
    assert json.loads(broken.document_json) == {"kind": "Nope"}


# -- the stream -------------------------------------------------------------------------------
def _svid(ca: CaService, spiffe_id: str, ttl: timedelta | None = None) -> tuple[bytes, bytes]:
    key = generate_key(KeyType.EC_P256)
    request = X509Request(SpiffeId(spiffe_id), key.public_key(), ttl=ttl)
    [svid] = ca.sign_x509_svids([request], "test")
    der = [c.public_bytes(serialization.Encoding.DER) for c in svid.chain]
    return private_key_pem(key), pem_chain(der)


def _watch(channel: grpc.aio.Channel, since: int = 0) -> Any:
    stub = node_pb2_grpc.PoliciesStub(channel)  # type: ignore[no-untyped-call]
    return stub.WatchPolicies(node_pb2.WatchPoliciesRequest(since_revision=since))


async def _read(call: Any) -> node_pb2.PolicySet:
    message = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert message is not grpc.aio.EOF, "the stream ended"
    assert isinstance(message, node_pb2.PolicySet)
    return message


def _names(message: node_pb2.PolicySet) -> list[str]:
    return [p.name for p in message.policies]


async def _apply(h: Harness, text: str) -> int:
    result = await asyncio.to_thread(PolicyStore(h.ca).apply, text, "test.yaml", "uid:0")
    return max(a.revision for a in result.applied)


def test_first_set_at_once_then_each_change_selecting_the_caller(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            store = PolicyStore(h.ca)
            await _apply(h, _policy("everyone", None, "ALLOW"))
            await _apply(h, _policy("for-db", [DB]))
            creds = await asyncio.to_thread(_svid, h.ca, WEB)
            async with h.channel(creds) as channel:
                call = _watch(channel)
                first = await _read(call)
                assert _names(first) == ["everyone"]
                assert first.revision == await asyncio.to_thread(store.revision)
                document = json.loads(first.policies[0].document_json)
                parse_policy_dict(document, "wire")  # what the proxy does with it

                started = time.monotonic()
                revision = await _apply(h, _policy("deny-web", [WEB]))
                added = await _read(call)
                assert time.monotonic() - started < DEADLINE
                assert _names(added) == ["deny-web", "everyone"]
                assert added.revision == revision

                # A change to a policy that does not select web sends nothing: the next
                # message is the deletion below, not this one.
                await _apply(h, _policy("for-db", [DB], "ALLOW"))
                started = time.monotonic()
                await asyncio.to_thread(store.delete, "deny-web", "uid:0")
                removed = await _read(call)
                assert time.monotonic() - started < DEADLINE
                assert _names(removed) == ["everyone"]
                assert removed.revision > added.revision + 1
                call.cancel()

    run(scenario)


def test_changes_made_by_another_replica_arrive_by_polling(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            replica = CaService(
                CaSettings(trust_domain=TD, server_id="s2"),
                Datastore(h.ca.store.url),
                MemoryKeyManager(),
            )
            creds = await asyncio.to_thread(_svid, h.ca, WEB)
            async with h.channel(creds) as channel:
                call = _watch(channel)
                assert _names(await _read(call)) == []
                started = time.monotonic()
                # No notification reaches this server from the other replica's service.
                await asyncio.to_thread(
                    PolicyStore(replica).apply, _policy("remote", [WEB]), "r.yaml", "uid:0"
                )
                assert _names(await _read(call)) == ["remote"]
                assert time.monotonic() - started < DEADLINE
                call.cancel()
            replica.store.close()

    run(scenario)


def test_callers_without_a_current_svid_of_our_trust_domain_are_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            stranger = CaService(  # claims example.org too, with its own authority
                CaSettings(trust_domain=TD, server_id="x"),
                Datastore(f"sqlite:///{tmp_path / 'stranger.db'}"),
                MemoryKeyManager(),
            )
            stranger.start()
            other_td = CaService(
                CaSettings(trust_domain=TrustDomain("other.org"), server_id="y"),
                Datastore(f"sqlite:///{tmp_path / 'other.db'}"),
                MemoryKeyManager(),
            )
            other_td.start()
            short = await asyncio.to_thread(_svid, h.ca, WEB, timedelta(seconds=60))
            # Chains OpenSSL cannot verify against our bundle end in the handshake; the rest
            # are refused by our check against the authorities in force (verify_peer_svid).
            refused = {
                "no certificate": (None, grpc.StatusCode.PERMISSION_DENIED),
                "expired by the server's clock": (short, grpc.StatusCode.PERMISSION_DENIED),
                "an SVID from another CA": (
                    await asyncio.to_thread(_svid, stranger, WEB),
                    grpc.StatusCode.UNAVAILABLE,
                ),
                "an SVID of another trust domain": (
                    await asyncio.to_thread(_svid, other_td, "spiffe://other.org/web"),
                    grpc.StatusCode.UNAVAILABLE,
                ),
            }
            h.clock.offset = timedelta(minutes=5)
            for why, (creds, code) in refused.items():
                async with h.channel(creds) as channel:
                    call = _watch(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await asyncio.wait_for(call.read(), READ_TIMEOUT)
                    assert err.value.code() == code, why
            stranger.store.close()
            other_td.store.close()

    run(scenario)


def test_the_stream_ends_when_the_caller_svid_expires(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            creds = await asyncio.to_thread(_svid, h.ca, WEB, timedelta(seconds=60))
            async with h.channel(creds) as channel:
                call = _watch(channel)
                await _read(call)
                h.clock.offset = timedelta(minutes=5)
                await _apply(h, _policy("wake", [DB]))  # any change wakes the stream
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(call.read(), READ_TIMEOUT)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    run(scenario)


def test_stopping_the_server_ends_policy_streams_with_unavailable(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            creds = await asyncio.to_thread(_svid, h.ca, WEB)
            async with h.channel(creds) as channel:
                call = _watch(channel)
                await _read(call)
                await h.server.stop(grace=2.0)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(call.read(), READ_TIMEOUT)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario)
