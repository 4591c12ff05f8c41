"""The Workload API end to end: the real py-spiffe client against the server on a Unix socket.

py-spiffe (``WorkloadApiClient``, ``X509Source``, ``JwtSource``) fetches SVIDs issued by our CA
code; a raw grpcio channel checks exact status codes and the missing header; forked children
with other uids prove that identities follow the kernel's credentials. Every test ends with the
``served`` teardown: server stopped, no task, waiter, call or socket file left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.json_format import MessageToDict
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError
from spiffe import JwtSource, SpiffeId, TrustDomain, WorkloadApiClient, X509Source
from spiffe.workloadapi.errors import (
    FetchJwtSvidError,
    FetchX509SvidError,
    ValidateJwtSvidError,
)

from workload_api import _messages as pb
from workload_api import parse_endpoint_socket
from workload_api.attestors import CompositeAttestor, UnixAttestor
from workload_api.static import StaticIdentityProvider

from . import _pki
from ._harness import (
    CALL_TIMEOUT,
    HEADER,
    endpoint,
    raw_channel,
    served,
    streaming,
    unary,
    x509_svid_stream,
)
from ._pki import DB, PARTNER, TD, WEB

ROOT = f"unix:uid:{os.geteuid()}"  # this test process, as the unix attestor sees it
TIMEOUT = 10.0  # seconds for any single client call; never reached when all is well

RPCS: list[tuple[str, Any, Any, Cardinality]] = [
    ("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse, Cardinality.UNARY_STREAM),
    ("FetchX509Bundles", pb.X509BundlesRequest(), pb.X509BundlesResponse, Cardinality.UNARY_STREAM),
    ("FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse, Cardinality.UNARY_STREAM),
    (
        "FetchJWTSVID",
        pb.JWTSVIDRequest(audience=["billing"]),
        pb.JWTSVIDResponse,
        Cardinality.UNARY_UNARY,
    ),
    (
        "ValidateJWTSVID",
        pb.ValidateJWTSVIDRequest(audience="billing", svid="a.b.c"),
        pb.ValidateJWTSVIDResponse,
        Cardinality.UNARY_UNARY,
    ),
]


def call(channel: grpc.Channel, rpc: str, metadata: Any = HEADER) -> Any:
    """Call one RPC by name on a raw channel; the first message for streams."""
    name, request, response, cardinality = next(r for r in RPCS if r[0] == rpc)
    path = f"/SpiffeWorkloadAPI/{name}"
    if cardinality is Cardinality.UNARY_UNARY:
        return unary(channel, path, response)(request, metadata=metadata, timeout=TIMEOUT)
    replies = streaming(channel, path, response)(request, metadata=metadata, timeout=TIMEOUT)
    try:
        return next(replies)
    finally:
        replies.cancel()


def status_of(channel: grpc.Channel, rpc: str, metadata: Any = HEADER) -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, rpc, metadata)
    return caught.value.code(), caught.value.details()


@pytest.fixture
def provider() -> StaticIdentityProvider:
    """Two identities for this process (web federates with partner.org), one for someone else."""
    return StaticIdentityProvider(
        _pki.snapshot(
            [
                _pki.identity(WEB, {ROOT}, federates_with=[PARTNER]),
                _pki.identity(DB, {ROOT, f"unix:gid:{os.getegid()}"}, hint="internal"),
                _pki.identity("spiffe://example.org/other", {"unix:uid:12345"}),
            ]
        ),
        jwt_signer=_pki.jwt_signer(),
    )


@pytest.fixture
def server(provider: StaticIdentityProvider) -> Iterator[Any]:
    with served(provider) as (server, _):
        yield server


# --- X.509 -------------------------------------------------------------------------------------


def test_fetch_x509_svids_and_bundles(server: Any, provider: StaticIdentityProvider) -> None:
    with WorkloadApiClient(endpoint(server)) as client:
        svids = client.fetch_x509_svids(timeout=TIMEOUT)
        context = client.fetch_x509_context(timeout=TIMEOUT)
        bundles = client.fetch_x509_bundles(timeout=TIMEOUT)
    assert [str(svid.spiffe_id) for svid in svids] == [WEB, DB]
    assert str(context.default_svid.spiffe_id) == WEB, "the first identity is the default"
    ours = provider.current().identities[0]
    assert context.default_svid.leaf.public_bytes(Encoding.DER) == ours.cert_chain[0]
    assert {str(b.trust_domain) for b in context.x509_bundle_set.bundles} == {TD, PARTNER}
    assert {str(b.trust_domain) for b in bundles.bundles} == {TD, PARTNER}
    authority = _pki.authority(TD).signing.certificate
    ours_bundle = bundles.get_bundle_for_trust_domain(TrustDomain(TD))
    assert ours_bundle is not None and ours_bundle.x509_authorities == {authority}


def test_the_socket_is_world_connectable_in_a_0755_folder(server: Any) -> None:
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o777
    assert stat.S_IMODE(server.socket_path.parent.stat().st_mode) == 0o755


def test_spiffe_endpoint_socket_is_honoured(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", endpoint(server))
    assert parse_endpoint_socket(os.environ["SPIFFE_ENDPOINT_SOCKET"]) == server.socket_path
    with WorkloadApiClient() as client:
        assert str(client.fetch_x509_svid(timeout=TIMEOUT).spiffe_id) == WEB


def test_x509_source_receives_a_pushed_rotation(
    server: Any, provider: StaticIdentityProvider
) -> None:
    updated = threading.Event()
    with X509Source(socket_path=endpoint(server), timeout_in_seconds=TIMEOUT) as source:
        before = source.get_x509_context().default_svid.leaf.serial_number
        source.subscribe_for_updates(updated.set)
        rotated = _pki.identity(WEB, {ROOT}, federates_with=[PARTNER])  # a new SVID, same ID
        provider.replace(_pki.snapshot([rotated, *provider.current().identities[1:]]))
        assert updated.wait(TIMEOUT), "the rotation reached the subscribed X509Source"
        after = source.get_x509_context().default_svid
        assert str(after.spiffe_id) == WEB
        assert after.leaf.serial_number != before
        assert after.leaf.public_bytes(Encoding.DER) == rotated.cert_chain[0]


def test_a_removed_identity_ends_the_stream_with_permission_denied(
    server: Any, provider: StaticIdentityProvider
) -> None:
    with raw_channel(server) as channel:
        replies = x509_svid_stream(channel)(pb.X509SVIDRequest(), metadata=HEADER, timeout=TIMEOUT)
        first = next(replies)
        assert [svid.spiffe_id for svid in first.svids] == [WEB, DB]
        provider.replace(_pki.snapshot([provider.current().identities[1]]))
        assert [svid.spiffe_id for svid in next(replies).svids] == [DB]
        provider.replace(_pki.snapshot([]))
        with pytest.raises(grpc.RpcError) as caught:
            next(replies)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_another_workloads_change_is_not_pushed(
    server: Any, provider: StaticIdentityProvider
) -> None:
    web, db, _ = provider.current().identities
    with raw_channel(server) as channel:
        replies = x509_svid_stream(channel)(pb.X509SVIDRequest(), metadata=HEADER, timeout=TIMEOUT)
        first = next(replies)
        renewed_other = _pki.identity("spiffe://example.org/other", {"unix:uid:12345"})
        provider.replace(_pki.snapshot([web, db, renewed_other]))  # not this caller's business
        provider.replace(_pki.snapshot([web, renewed_other]))  # this one is
        second = next(replies)
        assert second != first
        assert [svid.spiffe_id for svid in second.svids] == [WEB]
        replies.cancel()


# --- JWT ---------------------------------------------------------------------------------------


def test_jwt_source_fetches_and_the_api_validates(server: Any) -> None:
    with JwtSource(socket_path=endpoint(server), timeout_in_seconds=TIMEOUT) as source:
        assert source.get_bundle_for_trust_domain(TrustDomain(TD)) is not None
        assert source.get_bundle_for_trust_domain(TrustDomain(PARTNER)) is not None
        token = source.fetch_svid({"billing"})
        assert str(token.spiffe_id) == WEB and token.audience == {"billing"}
        all_tokens = source.fetch_svids({"billing", "audit"})
        assert [str(t.spiffe_id) for t in all_tokens] == [WEB, DB]
        db_token = source.fetch_svid({"billing"}, subject=SpiffeId(DB))
        assert str(db_token.spiffe_id) == DB
    with WorkloadApiClient(endpoint(server)) as client:
        validated = client.validate_jwt_svid(token.token, "billing", timeout=TIMEOUT)
        assert str(validated.spiffe_id) == WEB
        with pytest.raises(ValidateJwtSvidError, match="INVALID_ARGUMENT"):
            client.validate_jwt_svid(token.token, "someone-else", timeout=TIMEOUT)
        with pytest.raises(ValidateJwtSvidError, match="INVALID_ARGUMENT"):
            client.validate_jwt_svid(token.token[:-4] + "AAAA", "billing", timeout=TIMEOUT)
    with raw_channel(server) as channel:
        request = pb.ValidateJWTSVIDRequest(audience="billing", svid=token.token)
        path = "/SpiffeWorkloadAPI/ValidateJWTSVID"
        reply = unary(channel, path, pb.ValidateJWTSVIDResponse)(
            request, metadata=HEADER, timeout=TIMEOUT
        )
        assert reply.spiffe_id == WEB
        claims = MessageToDict(reply.claims)
        assert claims["sub"] == WEB and claims["aud"] == ["billing"]


@pytest.mark.parametrize(
    ("request_", "code", "details"),
    [
        (pb.JWTSVIDRequest(), grpc.StatusCode.INVALID_ARGUMENT, "audience"),
        (
            pb.JWTSVIDRequest(audience=["a"], spiffe_id="spiffe://example.org/other"),
            grpc.StatusCode.PERMISSION_DENIED,
            "no identity issued",
        ),
    ],
    ids=["audience required", "another workload's SPIFFE ID"],
)
def test_fetch_jwt_svid_refusals(
    server: Any, request_: pb.JWTSVIDRequest, code: grpc.StatusCode, details: str
) -> None:
    with raw_channel(server) as channel:
        fetch = unary(channel, "/SpiffeWorkloadAPI/FetchJWTSVID", pb.JWTSVIDResponse)
        with pytest.raises(grpc.RpcError) as caught:
            fetch(request_, metadata=HEADER, timeout=TIMEOUT)
    assert caught.value.code() is code
    assert details in caught.value.details()


def test_a_provider_that_cannot_mint_jwts_answers_unavailable() -> None:
    provider = StaticIdentityProvider(_pki.snapshot([_pki.identity(WEB, {ROOT})]))  # no signer
    with served(provider) as (server, _), raw_channel(server) as channel:
        assert status_of(channel, "FetchJWTSVID")[0] is grpc.StatusCode.UNAVAILABLE


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", [r[0] for r in RPCS])
def test_a_call_without_the_security_header_is_invalid_argument(server: Any, rpc: str) -> None:
    with raw_channel(server) as channel:
        code, details = status_of(channel, rpc, metadata=())
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert details == "security header missing from request"
        code, _ = status_of(channel, rpc, metadata=(("workload.spiffe.io", "false"),))
        assert code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("rpc", [r[0] for r in RPCS])
def test_not_ready_is_unavailable(rpc: str) -> None:
    provider = StaticIdentityProvider(
        _pki.snapshot([_pki.identity(WEB, {ROOT})], ready=False), jwt_signer=_pki.jwt_signer()
    )
    with served(provider) as (server, _), raw_channel(server) as channel:
        assert status_of(channel, rpc)[0] is grpc.StatusCode.UNAVAILABLE


def test_py_spiffe_reports_unavailable_then_gets_the_svid_once_ready() -> None:
    provider = StaticIdentityProvider(_pki.snapshot([_pki.identity(WEB, {ROOT})], ready=False))
    with served(provider) as (server, _), WorkloadApiClient(endpoint(server)) as client:
        with pytest.raises(FetchX509SvidError, match="UNAVAILABLE"):
            client.fetch_x509_svid(timeout=TIMEOUT)
        provider.replace(_pki.snapshot(provider.current().identities))
        assert str(client.fetch_x509_svid(timeout=TIMEOUT).spiffe_id) == WEB


@pytest.mark.parametrize("rpc", [r[0] for r in RPCS])
def test_a_caller_without_identity_is_denied_and_logged(
    rpc: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider = StaticIdentityProvider(
        _pki.snapshot([_pki.identity(WEB, {"unix:uid:12345"})]), jwt_signer=_pki.jwt_signer()
    )
    caplog.set_level(logging.INFO, logger="workload_api.server")
    with served(provider) as (server, _), raw_channel(server) as channel:
        assert status_of(channel, rpc) == (grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
    (record,) = [r for r in caplog.records if r.getMessage() == "no identity for caller"]
    assert record.levelno == logging.INFO
    assert record.pid == os.getpid() and ROOT in record.selectors  # type: ignore[attr-defined]


def test_unauthenticated_verifiers_get_our_bundles_when_allowed() -> None:
    provider = StaticIdentityProvider(_pki.snapshot([_pki.identity(WEB, {"unix:uid:12345"})]))
    with (
        served(provider, allow_unauthenticated_verifiers=True) as (server, _),
        raw_channel(server) as channel,
    ):
        assert set(call(channel, "FetchX509Bundles").bundles) == {f"spiffe://{TD}"}
        assert set(call(channel, "FetchJWTBundles").bundles) == {f"spiffe://{TD}"}
        assert status_of(channel, "FetchX509SVID")[0] is grpc.StatusCode.PERMISSION_DENIED


def test_a_failed_attestation_is_permission_denied(tmp_path: Path) -> None:
    # An empty /proc: the caller's pid is not there, as when it exited before attestation.
    empty = CompositeAttestor([UnixAttestor(proc_root=tmp_path)], proc_root=tmp_path)
    provider = StaticIdentityProvider(_pki.snapshot([_pki.identity(WEB, {ROOT})]))
    with served(provider, empty) as (server, _), raw_channel(server) as channel:
        assert status_of(channel, "FetchX509SVID") == (
            grpc.StatusCode.PERMISSION_DENIED,
            "workload attestation failed",
        )


# --- stream lifetime ---------------------------------------------------------------------------


def test_a_stream_ends_when_its_client_goes_away(provider: StaticIdentityProvider) -> None:
    with served(provider) as (server, loop), raw_channel(server) as channel:
        replies = x509_svid_stream(channel)(pb.X509SVIDRequest(), metadata=HEADER, timeout=TIMEOUT)
        next(replies)
        assert server.active_calls == 1  # the stream is being served
        replies.cancel()
        assert loop.run(server.wait_idle(timedelta(seconds=CALL_TIMEOUT)))
        assert provider.waiters == 0


def test_streams_end_cleanly_when_the_server_stops(provider: StaticIdentityProvider) -> None:
    with served(provider) as (server, loop), raw_channel(server) as channel:
        replies = x509_svid_stream(channel)(pb.X509SVIDRequest(), metadata=HEADER, timeout=TIMEOUT)
        next(replies)
        loop.run(server.stop(timedelta(seconds=CALL_TIMEOUT)))
        with pytest.raises(StopIteration):
            next(replies)  # OK trailers: a clean end, not an error
        assert replies.code() is grpc.StatusCode.OK
        assert not server.socket_path.exists()


def test_serve_forever_stops_cleanly_when_cancelled(provider: StaticIdentityProvider) -> None:
    with served(provider) as (server, loop):
        loop.run(server.stop())

        async def serve_then_cancel() -> bool:
            task = asyncio.ensure_future(server.serve_forever())
            while not server.socket_path.exists():
                await asyncio.sleep(0)  # start() runs within the first few steps
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return not server.socket_path.exists()
            return False

        assert loop.run(serve_then_cancel())


# --- identities follow the kernel's credentials ------------------------------------------------


async def _fetch_first(path: str) -> str:
    channel = Channel(path=path)
    try:
        async with channel.request(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            Cardinality.UNARY_STREAM,
            pb.X509SVIDRequest,
            pb.X509SVIDResponse,
            metadata=dict(HEADER),
            timeout=TIMEOUT,
        ) as stream:
            await stream.send_message(pb.X509SVIDRequest(), end=True)
            reply = await stream.recv_message()
            await stream.cancel()
            assert reply is not None
            return "ok " + " ".join(svid.spiffe_id for svid in reply.svids)
    except GRPCError as err:
        return f"error {err.status.name}"
    finally:
        channel.close()


def _fetch_as(uid: int, path: str) -> str:
    """Fork a child that drops to ``uid`` and fetches its X509-SVID; return what it got.

    The child is a real separate process with its own credentials, so SO_PEERCRED and /proc show
    ``uid``. It cannot exec the venv's python (it lives under /root, closed to other uids), so it
    keeps the forked interpreter and speaks gRPC with grpclib (grpcio is not fork-safe).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = asyncio.run(_fetch_first(path))
        except BaseException as err:
            result = f"crash {err!r}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        chunks.append(pipe.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return b"".join(chunks).decode()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start children with other uids")
def test_processes_with_different_uids_get_different_svids() -> None:
    provider = StaticIdentityProvider(
        _pki.snapshot(
            [
                _pki.identity(WEB, {"unix:uid:65534"}),
                _pki.identity(DB, {"unix:uid:65533", "unix:gid:65533"}),
            ]
        )
    )
    with served(provider) as (server, _):
        path = os.fspath(server.socket_path)
        assert _fetch_as(65534, path) == f"ok {WEB}"
        assert _fetch_as(65533, path) == f"ok {DB}"
        assert _fetch_as(65532, path) == "error PERMISSION_DENIED"  # no entry for this uid
        with WorkloadApiClient(endpoint(server)) as client:  # nor for this process (root)
            with pytest.raises(FetchX509SvidError, match="PERMISSION_DENIED"):
                client.fetch_x509_svid(timeout=TIMEOUT)
            with pytest.raises(FetchJwtSvidError, match="PERMISSION_DENIED"):
                client.fetch_jwt_svid({"a"}, timeout=TIMEOUT)
