"""Helpers for the node API tests: an in-process server over real TLS, real grpcio clients.

``running`` starts the CA service on a real database, the server SVID and the node API on
``127.0.0.1:0``; tests talk to it with grpcio exactly as agents do (ssl_channel_credentials with
our bundle, target name ``meshid-server``, the agent SVID as client certificate). Every scenario
runs under ``asyncio.run`` (``run``), which also checks that nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from spiffe import TrustDomain
from sqlalchemy import insert

from ca.bundle import to_pem
from ca.datastore import Datastore
from ca.datastore.models import EntryChangeRow, EntryRow
from ca.entries import EntrySpec
from ca.keys import KeyType, MemoryKeyManager, PrivateKey, generate_key, private_key_pem
from ca.nodeapi import node_pb2, node_pb2_grpc
from ca.nodeapi.server import NodeApiServer
from ca.server_identity import SERVER_TLS_NAME, ServerIdentity
from ca.service import CaService, CaSettings

TD = TrustDomain("example.org")
SERVER_ID = "spiffe://example.org/meshid/server"
READ_TIMEOUT = 5.0  # seconds a test waits for a message it expects
_T = TypeVar("_T")


def run(scenario: Callable[[], Awaitable[_T]]) -> _T:
    """Run an async scenario; afterwards no task of it may still be running."""

    async def checked() -> _T:
        result = await scenario()
        for _ in range(20):  # closed channels finish their cancelled calls within a few steps
            leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if not leftover:
                break
            await asyncio.sleep(0.01)
        assert not leftover, leftover
        return result

    return asyncio.run(checked())


class Clock:
    """A clock tests can move forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def csr_der(key: PrivateKey) -> bytes:
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return request.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def pem_chain(ders: Sequence[bytes]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders
    )


@dataclass
class Agent:
    """An attested agent as a test holds it."""

    spiffe_id: str
    key: PrivateKey
    chain: list[bytes]  # DER, leaf first
    selectors: list[str] = field(default_factory=list)

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.chain[0])

    def credentials(self) -> tuple[bytes, bytes]:
        return private_key_pem(self.key), pem_chain(self.chain)


@dataclass
class Harness:
    ca: CaService
    identity: ServerIdentity
    server: NodeApiServer
    address: str
    clock: Clock

    def bundle_pem(self) -> bytes:
        return to_pem(self.ca.bundle())

    def channel(self, agent: Agent | tuple[bytes, bytes] | None = None) -> grpc.aio.Channel:
        creds = agent.credentials() if isinstance(agent, Agent) else agent
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.bundle_pem(),
            private_key=creds[0] if creds else None,
            certificate_chain=creds[1] if creds else None,
        )
        return grpc.aio.secure_channel(
            self.address, credentials, options=[("grpc.ssl_target_name_override", SERVER_TLS_NAME)]
        )

    async def in_thread(self, func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a blocking CaService call as the admin API does: in a worker thread."""
        return await asyncio.to_thread(func, *args, **kwargs)

    async def token(self, alias: str | None = None, ttl: timedelta | None = None) -> str:
        kwargs: dict[str, Any] = {"spiffe_id": alias}
        if ttl is not None:
            kwargs["ttl"] = ttl
        issued = await self.in_thread(self.ca.generate_token, "uid:0", **kwargs)
        return issued.token

    async def entry(self, path: str, parent: str, *selectors: str, **extra: Any) -> Any:
        spec = EntrySpec(
            spiffe_id=f"spiffe://example.org/{path}",
            parent_id=parent,
            selectors=list(selectors) or ["unix:uid:1000"],
            **extra,
        )
        return await self.in_thread(self.ca.create_entry, spec, "uid:0")


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path,
    database_url: str | None = None,
    *,
    provisioning_cas: Sequence[x509.Certificate] = (),
    poll_interval: float = 0.2,
) -> AsyncIterator[Harness]:
    clock = Clock()
    url = database_url or f"sqlite:///{tmp_path / 'nodeapi.db'}"
    ca = CaService(
        CaSettings(trust_domain=TD, server_id="s1"), Datastore(url), MemoryKeyManager(), clock=clock
    )
    ca.start()
    identity = ServerIdentity(ca, tmp_path / f"private-{uuid.uuid4().hex[:6]}")
    server = NodeApiServer(
        ca, identity, provisioning_cas=provisioning_cas, poll_interval=poll_interval
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = await server.start(sock)
    try:
        yield Harness(ca, identity, server, f"127.0.0.1:{port}", clock)
    finally:
        await server.stop(grace=2.0)
        ca.store.close()


# -- client calls ---------------------------------------------------------------------------
async def attest(
    h: Harness,
    attestation_type: str,
    payload: bytes,
    *,
    key: PrivateKey | None = None,
    answer: Callable[[bytes], bytes] | None = None,
    csr: bytes | None = None,
) -> Agent:
    """AttestAgent as an agent does it; raises grpc.aio.AioRpcError on refusal."""
    key = key or generate_key(KeyType.EC_P256)
    params = node_pb2.AttestParams(
        type=attestation_type, payload=payload, csr=csr if csr is not None else csr_der(key)
    )
    async with h.channel() as channel:
        call = node_pb2_grpc.NodeStub(channel).AttestAgent()
        await call.write(node_pb2.AttestAgentRequest(params=params))
        while True:
            response = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert response is not grpc.aio.EOF
            if response.HasField("svid"):
                await call.done_writing()
                svid = response.svid
                return Agent(svid.spiffe_id, key, list(svid.cert_chain), list(svid.selectors))
            assert answer is not None, "unexpected challenge"
            assert len(response.challenge) == 32
            await call.write(
                node_pb2.AttestAgentRequest(challenge_response=answer(response.challenge))
            )


async def join(h: Harness, alias: str | None = None) -> Agent:
    return await attest(h, "join_token", (await h.token(alias)).encode())


async def read_update(call: Any) -> list[node_pb2.SyncEntriesResponse]:
    """The messages of one update (until ``more`` is false)."""
    messages = []
    while True:
        message = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert message is not grpc.aio.EOF, "the stream ended"
        messages.append(message)
        if not message.more:
            return messages


def upsert_ids(messages: Sequence[node_pb2.SyncEntriesResponse]) -> set[str]:
    return {e.id for m in messages for e in m.upserts}


# -- x509pop material -----------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass(frozen=True)
class ProvisioningCa:
    certificate: x509.Certificate
    key: PrivateKey

    @classmethod
    def create(cls, cn: str = "provisioning CA") -> ProvisioningCa:
        key = generate_key(KeyType.EC_P256)
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def intermediate(self, cn: str = "provisioning intermediate") -> ProvisioningCa:
        key = generate_key(KeyType.EC_P256)
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return ProvisioningCa(cert, key)

    def node(
        self,
        cn: str = "node-1",
        dns: Sequence[str] = ("node-1.example.org",),
        key_type: KeyType = KeyType.EC_P256,
        *,
        expired: bool = False,
    ) -> NodeCert:
        key = generate_key(key_type)
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=2))
            .not_valid_after(now - timedelta(hours=1) if expired else now + timedelta(days=1))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), False
            )
        return NodeCert(builder.sign(self.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class NodeCert:
    certificate: x509.Certificate
    key: PrivateKey

    def pem(self, *intermediates: x509.Certificate) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.certificate, *intermediates)
        )

    def sign(self, challenge: bytes, key: PrivateKey | None = None) -> bytes:
        """The challenge response as the contract defines it."""
        signer = key or self.key
        if isinstance(signer, ec.EllipticCurvePrivateKey):
            return signer.sign(challenge, ec.ECDSA(hashes.SHA256()))
        assert isinstance(signer, rsa.RSAPrivateKey)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return signer.sign(challenge, pss, hashes.SHA256())


# -- bulk data ------------------------------------------------------------------------------
def bulk_entries(ca: CaService, parent: str, count: int, prefix: str = "bulk") -> None:
    """``count`` entries under ``parent`` in one transaction, bypassing the per-entry audit
    (test data only: 20,000 audited creates would take minutes)."""
    now = datetime.now(UTC)
    with ca.store.write() as tx:
        conn = tx.session.connection()
        ids = [str(uuid.uuid4()) for _ in range(count)]
        revisions = (
            conn.execute(
                insert(EntryChangeRow).returning(
                    EntryChangeRow.revision, sort_by_parameter_order=True
                ),
                [{"entry_id": e, "op": "create", "at": now} for e in ids],
            )
            .scalars()
            .all()
        )
        conn.execute(
            insert(EntryRow),
            [
                {
                    "id": e,
                    "spiffe_id": f"spiffe://example.org/{prefix}/w{i}",
                    "parent_id": parent,
                    "selectors": f'["unix:uid:{i}"]',
                    "selectors_key": f"{prefix}{i:060d}",
                    "x509_svid_ttl": 0,
                    "jwt_svid_ttl": 0,
                    "dns_names": "[]",
                    "hint": "",
                    "admin": False,
                    "downstream": False,
                    "federates_with": "[]",
                    "expires_at": None,
                    "revision": revision,
                    "created_at": now,
                    "updated_at": now,
                }
                for i, (e, revision) in enumerate(zip(ids, revisions, strict=True))
            ],
        )
