"""The agent's client of the node API (grpcio, asyncio, TLS).

Owns the wire: TLS to a server authenticated as ``spiffe://TD/meshid/server`` (its SVID carries
the reserved DNS name ``meshid-server``, which grpcio checks, and the chain must verify against
the trust bundle), the agent's own SVID as client certificate once attested, failover across the
configured servers, and translation of protobuf messages and gRPC errors into agent values and
errors. It decides nothing about what to sign or when.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca.keys import PrivateKey, private_key_pem
from ca.nodeapi import node_pb2, node_pb2_grpc

from .errors import AttestationError, PermissionDenied, ServerUnavailable
from .sync_state import AgentEntry, BundleDoc, SyncUpdate

log = logging.getLogger(__name__)

SERVER_TLS_NAME = "meshid-server"  # the DNS SAN every meshid server SVID carries
CALL_TIMEOUT = 30.0  # seconds for unary calls; streams have none
KEEPALIVE_MS = 20_000  # notice a dead server on an idle sync stream within ~40 s
RETIRED_GRACE = 5.0  # seconds a replaced channel's remaining calls get before it closes
MAX_MESSAGE = 64 * 1024 * 1024  # chunks are far smaller; this only bounds a bad peer


@dataclass(frozen=True)
class AgentSvid:
    spiffe_id: str
    cert_chain: tuple[bytes, ...]  # DER, leaf first
    selectors: tuple[str, ...]
    bundle: BundleDoc | None

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.cert_chain[0])

    def chain_pem(self) -> bytes:
        return b"".join(
            x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
            for d in self.cert_chain
        )


@dataclass(frozen=True)
class SignResult:
    entry_id: str
    cert_chain: tuple[bytes, ...]
    error: str


def csr_for(key: PrivateKey) -> bytes:
    """A PKCS#10 request (DER) proving possession of ``key``; the server decides the identity."""
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return request.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _bundle(msg: node_pb2.Bundle) -> BundleDoc | None:
    if not msg.trust_domain:
        return None
    return BundleDoc(
        msg.trust_domain,
        bytes(msg.spiffe_bundle),
        msg.sequence,
        frozenset(bytes(k) for k in msg.tainted_key_ids),
    )


def _svid(msg: node_pb2.AgentSvid) -> AgentSvid:
    return AgentSvid(
        msg.spiffe_id,
        tuple(bytes(c) for c in msg.cert_chain),
        tuple(msg.selectors),
        _bundle(msg.bundle) if msg.HasField("bundle") else None,
    )


def _entry(msg: node_pb2.Entry) -> AgentEntry:
    return AgentEntry(
        id=msg.id,
        spiffe_id=msg.spiffe_id,
        parent_id=msg.parent_id,
        selectors=frozenset(msg.selectors),
        x509_svid_ttl=msg.x509_svid_ttl,
        jwt_svid_ttl=msg.jwt_svid_ttl,
        dns_names=tuple(msg.dns_names),
        hint=msg.hint,
        federates_with=tuple(msg.federates_with),
        revision=msg.revision,
        expires_at=msg.expires_at,
    )


def decode_sync(msg: node_pb2.SyncEntriesResponse) -> SyncUpdate:
    return SyncUpdate(
        revision=msg.revision,
        full=msg.full,
        more=msg.more,
        upserts=[_entry(e) for e in msg.upserts],
        deleted_ids=list(msg.deleted_ids),
        bundle=_bundle(msg.bundle) if msg.HasField("bundle") else None,
        federated_bundles=(
            [b for b in map(_bundle, msg.federated_bundles) if b is not None]
            if msg.federated_bundles_set
            else None
        ),
    )


def _translate(err: grpc.aio.AioRpcError, what: str) -> Exception:
    code = err.code()
    detail = err.details() or code.name
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"{what}: the server refused this agent: {detail}")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return AttestationError(f"{what}: {detail}")
    return ServerUnavailable(f"{what}: {code.name}: {detail}")


class NodeClient:
    """One TLS channel to one server; the agent holds one per configured address."""

    def __init__(
        self,
        address: str,
        trust_bundle_pem: Callable[[], bytes],
        credentials: Callable[[], tuple[bytes, bytes] | None],
    ) -> None:
        """``credentials`` returns (key PEM, chain PEM) of the agent SVID, or None before
        attestation; both callables are read whenever the channel is (re)built."""
        self.address = address
        self._bundle = trust_bundle_pem
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: node_pb2_grpc.NodeStub | None = None
        self._built_for: tuple[bytes, tuple[bytes, bytes] | None] | None = None
        self._retired: list[grpc.aio.Channel] = []
        self._closing: set[asyncio.Task[None]] = set()

    def _stub_now(self) -> node_pb2_grpc.NodeStub:
        wanted = (self._bundle(), self._credentials())
        if self._stub is None or wanted != self._built_for:
            old = self._channel
            key_chain = wanted[1]
            creds = grpc.ssl_channel_credentials(
                root_certificates=wanted[0],
                private_key=key_chain[0] if key_chain else None,
                certificate_chain=key_chain[1] if key_chain else None,
            )
            self._channel = grpc.aio.secure_channel(
                self.address,
                creds,
                options=[
                    ("grpc.ssl_target_name_override", SERVER_TLS_NAME),
                    ("grpc.default_authority", SERVER_TLS_NAME),
                    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
                    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                    ("grpc.max_send_message_length", MAX_MESSAGE),
                ],
            )
            self._stub = node_pb2_grpc.NodeStub(self._channel)  # type: ignore[no-untyped-call]
            self._built_for = wanted
            if old is not None:
                # Open streams on the old channel (the sync stream) finish first; older retired
                # channels have had a whole renewal period to drain and are closed now.
                for stale in self._retired:
                    task = asyncio.get_running_loop().create_task(stale.close(RETIRED_GRACE))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
                self._retired = [old]
        assert self._stub is not None
        return self._stub

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        for channel in [*self._retired, *([self._channel] if self._channel else [])]:
            await channel.close()
        self._retired.clear()
        self._channel = None
        self._stub = None

    async def attest_join_token(self, token: str, key: PrivateKey) -> AgentSvid:
        params = node_pb2.AttestParams(type="join_token", payload=token.encode(), csr=csr_for(key))
        return await self._attest(params, None)

    async def attest_x509pop(
        self, chain_pem: bytes, key: PrivateKey, sign_challenge: Callable[[bytes], bytes]
    ) -> AgentSvid:
        params = node_pb2.AttestParams(type="x509pop", payload=chain_pem, csr=csr_for(key))
        return await self._attest(params, sign_challenge)

    async def _attest(
        self, params: node_pb2.AttestParams, sign_challenge: Callable[[bytes], bytes] | None
    ) -> AgentSvid:
        stub = self._stub_now()
        call = stub.AttestAgent()
        try:
            await call.write(node_pb2.AttestAgentRequest(params=params))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise AttestationError("the server ended attestation without an answer")
                if response.HasField("svid"):
                    await call.done_writing()
                    return _svid(response.svid)
                if sign_challenge is None:
                    raise AttestationError(f"unexpected challenge for {params.type} attestation")
                answer = sign_challenge(bytes(response.challenge))
                await call.write(node_pb2.AttestAgentRequest(challenge_response=answer))
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "attestation") from err
        finally:
            call.cancel()

    async def renew(self, key: PrivateKey) -> AgentSvid:
        try:
            response = await self._stub_now().RenewAgent(
                node_pb2.RenewAgentRequest(csr=csr_for(key)), timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "agent SVID renewal") from err
        return _svid(response.svid)

    async def sync(self, since_revision: int) -> AsyncIterator[SyncUpdate]:
        call = self._stub_now().SyncEntries(
            node_pb2.SyncEntriesRequest(since_revision=since_revision)
        )
        try:
            async for msg in call:
                yield decode_sync(msg)
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "entry sync") from err
        finally:
            call.cancel()

    async def sign_x509(self, requests: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        msg = node_pb2.BatchNewX509SVIDRequest(
            requests=[node_pb2.X509SVIDRequest(entry_id=e, csr=c) for e, c in requests]
        )
        try:
            response = await self._stub_now().BatchNewX509SVID(msg, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "X.509-SVID signing") from err
        return [
            SignResult(r.entry_id, tuple(bytes(c) for c in r.cert_chain), r.error)
            for r in response.results
        ]

    async def sign_jwt(self, entry_id: str, audience: Sequence[str]) -> tuple[str, int]:
        try:
            response = await self._stub_now().NewJWTSVID(
                node_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=list(audience)),
                timeout=CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "JWT-SVID signing") from err
        return response.token, response.expires_at


def key_and_chain_pem(key: PrivateKey, svid: AgentSvid) -> tuple[bytes, bytes]:
    return private_key_pem(key), svid.chain_pem()
