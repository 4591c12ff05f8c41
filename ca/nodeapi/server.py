"""The node API's gRPC shell: grpclib over TLS with the server's own SVID.

Owns the wire of ``node.proto`` (service ``meshid.node.v1.Node``): TLS presenting the server SVID
(``spiffe://TD/meshid/server`` with DNS SAN ``meshid-server``, renewed in place by
``ServerIdentity``, so new handshakes get the new certificate and trust roots), client
certificates requested but optional at the TLS layer (``AttestAgent`` has none), every other
call authenticated from the TLS peer's certificate, and the mapping of errors to gRPC statuses.
What is decided comes from ``NodeService``, ``EntrySync`` and ``PolicyStream``, which run in
worker threads. The same port serves ``meshid.node.v1.Policies``: ``WatchPolicies`` takes any
X509-SVID of our trust domain (a proxy, not only an agent), checked with ``verify_peer_svid``
against the current authorities, and ends when that SVID expires (the proxy reconnects with its
renewed one).

Why grpclib and not grpcio's server: grpcio can only *not request* client certificates or
*require* them (its Python API exposes no "request, optional" mode), and attestation needs an
unauthenticated call on the same port. grpclib takes an ``ssl.SSLContext`` with
``CERT_OPTIONAL``; agents use grpcio clients unchanged. The peer certificate is read from the
connection's transport, which grpclib's ``Peer`` keeps in its private ``_transport``
(``_peer_leaf`` is the only reader), and ``_Server`` overrides grpclib's private
``_protocol_factory`` to know every connection, so ``stop`` can close idle ones too (grpclib 0.4
only cancels calls; asyncio before 3.13 cannot close a server's clients). The tests fail if a
release renames either.

Statuses: bad parameters ``INVALID_ARGUMENT``; any refusal (bad, used or expired token, failed
challenge, untrusted certificate, banned, evicted, unauthorized entry) ``PERMISSION_DENIED`` with a
terse message (the detail goes to the log at INFO); no authority or database ``UNAVAILABLE``;
server stopping: open sync and policy streams end with ``UNAVAILABLE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from cryptography import x509
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream

from ..datastore import DatastoreError
from ..datastore.entry_graph import sync_marks
from ..errors import (
    AuthorityUnavailable,
    CaError,
    InvalidArgument,
    InvalidSvid,
    NotFound,
    PermissionDenied,
)
from ..server_identity import ServerIdentity, verify_peer_svid
from ..service import CaService
from . import node_pb2
from .attestation import ATTESTATION_TYPES, JOIN_TOKEN, X509POP
from .errors import Refused
from .messages import agent_svid_message, der_chain, policy_set_message, sync_responses
from .policy_stream import PolicyFeed, PolicySet, PolicyStream
from .service import CallingAgent, NodeService
from .sync import EntrySync, Update
from .watch import POLL_INTERVAL, ChangeWatch

log = logging.getLogger(__name__)

SERVICE = "/meshid.node.v1.Node"
POLICIES_SERVICE = "/meshid.node.v1.Policies"
CHALLENGE_TIMEOUT = 30.0  # seconds an agent has to answer the x509pop challenge
GAP_RECHECK = 1.0  # seconds between looks for late-committed revisions (PostgreSQL)
STOP_GRACE = 5.0  # seconds for open calls to end before they are cancelled
CLOSE_GRACE = 0.2  # seconds for connections to close cleanly (TLS close_notify) before abort
ALPN_H2 = "h2"  # gRPC clients insist on HTTP/2 by ALPN


def _peer_leaf(stream: Stream[Any, Any]) -> bytes | None:
    """The DER leaf the TLS client presented, if any (see the module doc)."""
    transport = getattr(stream.peer, "_transport", None)
    if transport is None:
        raise Refused("agent SVID not accepted", "grpclib's Peer has no _transport any more")
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    leaf = ssl_object.getpeercert(binary_form=True)
    return bytes(leaf) if leaf else None


@contextlib.asynccontextmanager
async def _answering(rpc: str) -> AsyncIterator[None]:
    """Translate ``ca`` errors into gRPC statuses at the boundary."""
    try:
        yield
    except Refused as err:
        log.info("node API call refused", extra={"rpc": rpc, "reason": str(err)})
        raise GRPCError(Status.PERMISSION_DENIED, err.public) from err
    except (PermissionDenied, InvalidSvid) as err:
        log.info("node API call refused", extra={"rpc": rpc, "reason": str(err)})
        raise GRPCError(Status.PERMISSION_DENIED, "permission denied") from err
    except InvalidArgument as err:
        raise GRPCError(Status.INVALID_ARGUMENT, str(err)) from err
    except NotFound as err:
        raise GRPCError(Status.NOT_FOUND, str(err)) from err
    except (AuthorityUnavailable, DatastoreError) as err:
        log.warning("node API call failed", extra={"rpc": rpc, "error": str(err)})
        raise GRPCError(Status.UNAVAILABLE, "server unavailable, try another") from err
    except CaError as err:
        log.error("node API call failed", extra={"rpc": rpc}, exc_info=err)
        raise GRPCError(Status.INTERNAL, "internal error") from err


class NodeApi:
    """The handlers of both services, declared to grpclib through ``__mapping__``."""

    def __init__(
        self,
        nodes: NodeService,
        sync: EntrySync,
        watch: ChangeWatch,
        *,
        policies: PolicyFeed,
        policy_watch: ChangeWatch,
    ) -> None:
        self.nodes = nodes
        self.sync = sync
        self.watch = watch
        self.policies = policies
        self.policy_watch = policy_watch
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __mapping__(self) -> Mapping[str, Handler]:
        return {
            f"{SERVICE}/AttestAgent": Handler(
                self.attest_agent,
                Cardinality.STREAM_STREAM,
                node_pb2.AttestAgentRequest,
                node_pb2.AttestAgentResponse,
            ),
            f"{SERVICE}/RenewAgent": Handler(
                self.renew_agent,
                Cardinality.UNARY_UNARY,
                node_pb2.RenewAgentRequest,
                node_pb2.RenewAgentResponse,
            ),
            f"{SERVICE}/SyncEntries": Handler(
                self.sync_entries,
                Cardinality.UNARY_STREAM,
                node_pb2.SyncEntriesRequest,
                node_pb2.SyncEntriesResponse,
            ),
            f"{SERVICE}/BatchNewX509SVID": Handler(
                self.batch_new_x509_svid,
                Cardinality.UNARY_UNARY,
                node_pb2.BatchNewX509SVIDRequest,
                node_pb2.BatchNewX509SVIDResponse,
            ),
            f"{SERVICE}/NewJWTSVID": Handler(
                self.new_jwt_svid,
                Cardinality.UNARY_UNARY,
                node_pb2.NewJWTSVIDRequest,
                node_pb2.NewJWTSVIDResponse,
            ),
            f"{POLICIES_SERVICE}/WatchPolicies": Handler(
                self.watch_policies,
                Cardinality.UNARY_STREAM,
                node_pb2.WatchPoliciesRequest,
                node_pb2.PolicySet,
            ),
        }

    @contextlib.asynccontextmanager
    async def _call(self, rpc: str, stream: Stream[Any, Any]) -> AsyncIterator[None]:
        """Count the call (for a clean stop) and translate its errors."""
        self._active += 1
        self._idle.clear()
        try:
            async with _answering(rpc):
                yield
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _caller(self, stream: Stream[Any, Any]) -> CallingAgent:
        return await asyncio.to_thread(self.nodes.authenticate, _peer_leaf(stream))

    # -- AttestAgent --------------------------------------------------------------------------
    async def attest_agent(
        self, stream: Stream[node_pb2.AttestAgentRequest, node_pb2.AttestAgentResponse]
    ) -> None:
        async with self._call("AttestAgent", stream):
            request = await stream.recv_message()
            if request is None or request.WhichOneof("step") != "params":
                raise InvalidArgument("params", "the first message must carry the params")
            params = request.params
            if params.type == JOIN_TOKEN:
                svid = await asyncio.to_thread(
                    self.nodes.attest_join_token, params.payload, params.csr
                )
            elif params.type == X509POP:
                attempt = await asyncio.to_thread(
                    self.nodes.begin_x509pop, params.payload, params.csr
                )
                await stream.send_message(node_pb2.AttestAgentResponse(challenge=attempt.challenge))
                try:
                    answer = await asyncio.wait_for(stream.recv_message(), CHALLENGE_TIMEOUT)
                except TimeoutError as err:
                    raise Refused(
                        "challenge not answered in time", f"x509pop: {attempt.agent_id}"
                    ) from err
                if answer is None or answer.WhichOneof("step") != "challenge_response":
                    raise InvalidArgument(
                        "challenge_response", "the second message must answer the challenge"
                    )
                svid = await asyncio.to_thread(
                    self.nodes.finish_x509pop, attempt, answer.challenge_response
                )
            else:
                raise InvalidArgument(
                    "params.type", f"must be one of {', '.join(ATTESTATION_TYPES)}", params.type
                )
            await stream.send_message(node_pb2.AttestAgentResponse(svid=agent_svid_message(svid)))

    # -- RenewAgent ---------------------------------------------------------------------------
    async def renew_agent(
        self, stream: Stream[node_pb2.RenewAgentRequest, node_pb2.RenewAgentResponse]
    ) -> None:
        async with self._call("RenewAgent", stream):
            request = await stream.recv_message()
            assert request is not None  # grpclib ends a unary call without one itself
            caller = await self._caller(stream)
            svid = await asyncio.to_thread(self.nodes.renew, caller, request.csr)
            await stream.send_message(node_pb2.RenewAgentResponse(svid=agent_svid_message(svid)))

    # -- SyncEntries --------------------------------------------------------------------------
    async def sync_entries(
        self, stream: Stream[node_pb2.SyncEntriesRequest, node_pb2.SyncEntriesResponse]
    ) -> None:
        async with self._call("SyncEntries", stream):
            request = await stream.recv_message()
            assert request is not None
            caller = await self._caller(stream)
            seen = self.watch.generation  # before reading: a change from now on wakes us
            state, update = await asyncio.to_thread(self.sync.open, caller, request.since_revision)
            log.info(
                "entry sync opened",
                extra={
                    "agent_id": caller.spiffe_id,
                    "since_revision": request.since_revision,
                    "full": update.full,
                    "entries": len(update.upserts),
                    "revision": update.revision,
                },
            )
            await self._send(stream, update)
            while True:
                seen = await self.watch.wait(seen, GAP_RECHECK if state.gaps else None)
                if self.watch.closed:
                    raise GRPCError(Status.UNAVAILABLE, "server is shutting down")
                update = await asyncio.to_thread(self.sync.update, state)
                if not update.empty:
                    await self._send(stream, update)

    @staticmethod
    async def _send(
        stream: Stream[node_pb2.SyncEntriesRequest, node_pb2.SyncEntriesResponse], update: Update
    ) -> None:
        for response in sync_responses(update):
            await stream.send_message(response)

    # -- BatchNewX509SVID ---------------------------------------------------------------------
    async def batch_new_x509_svid(
        self,
        stream: Stream[node_pb2.BatchNewX509SVIDRequest, node_pb2.BatchNewX509SVIDResponse],
    ) -> None:
        async with self._call("BatchNewX509SVID", stream):
            request = await stream.recv_message()
            assert request is not None
            caller = await self._caller(stream)
            wanted = [(r.entry_id, r.csr) for r in request.requests]
            results = await asyncio.to_thread(self.nodes.sign_x509, caller, wanted)
            await stream.send_message(
                node_pb2.BatchNewX509SVIDResponse(
                    results=[
                        node_pb2.X509SVIDResult(
                            entry_id=r.entry_id, cert_chain=der_chain(r.chain), error=r.error
                        )
                        for r in results
                    ]
                )
            )

    # -- NewJWTSVID ---------------------------------------------------------------------------
    async def new_jwt_svid(
        self, stream: Stream[node_pb2.NewJWTSVIDRequest, node_pb2.NewJWTSVIDResponse]
    ) -> None:
        async with self._call("NewJWTSVID", stream):
            request = await stream.recv_message()
            assert request is not None
            caller = await self._caller(stream)
            jwt = await asyncio.to_thread(
                self.nodes.mint_jwt, caller, request.entry_id, list(request.audience)
            )
            await stream.send_message(
                node_pb2.NewJWTSVIDResponse(
                    token=jwt.token, expires_at=int(jwt.expires_at.timestamp())
                )
            )

    # -- WatchPolicies ------------------------------------------------------------------------
    async def watch_policies(
        self, stream: Stream[node_pb2.WatchPoliciesRequest, node_pb2.PolicySet]
    ) -> None:
        async with self._call("WatchPolicies", stream):
            request = await stream.recv_message()
            assert request is not None
            ca = self.nodes.ca
            peer = await asyncio.to_thread(verify_peer_svid, ca, _peer_leaf(stream))
            spiffe_id = str(peer.spiffe_id)
            expires = peer.certificate.not_valid_after_utc
            watch = self.policy_watch
            seen = watch.generation  # before reading: a change from now on wakes us
            policy_stream = PolicyStream(self.policies, spiffe_id)
            first = await asyncio.to_thread(policy_stream.first)
            log.info(
                "policy watch opened",
                extra={
                    "spiffe_id": spiffe_id,
                    "since_revision": request.since_revision,
                    "revision": first.revision,
                    "policies": len(first.policies),
                },
            )
            await self._send_policies(stream, spiffe_id, first)
            while True:
                left = (expires - ca.clock()).total_seconds()
                if left <= 0:
                    raise Refused("client SVID expired", f"{spiffe_id}: SVID expired at {expires}")
                seen = await watch.wait(seen, left)
                if watch.closed:
                    raise GRPCError(Status.UNAVAILABLE, "server is shutting down")
                update = await asyncio.to_thread(policy_stream.next)
                if update is not None:
                    await self._send_policies(stream, spiffe_id, update)

    @staticmethod
    async def _send_policies(
        stream: Stream[node_pb2.WatchPoliciesRequest, node_pb2.PolicySet],
        spiffe_id: str,
        policy_set: PolicySet,
    ) -> None:
        log.debug(
            "policy set sent",
            extra={
                "spiffe_id": spiffe_id,
                "revision": policy_set.revision,
                "policies": ",".join(policy_set.names),
            },
        )
        await stream.send_message(policy_set_message(policy_set))


class _Connection(asyncio.Protocol):
    """grpclib's protocol for one connection, with the connection recorded while it lives."""

    def __init__(self, inner: H2Protocol, live: set[asyncio.BaseTransport]) -> None:
        self._inner = inner
        self._live = live
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._live.add(transport)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._live.discard(self._transport)
        self._inner.connection_lost(exc)


class _Server(Server):
    """grpclib's server that knows its connections (see the module doc)."""

    def __init__(self, handlers: Sequence[Any]) -> None:
        super().__init__(handlers)
        self.connections: set[asyncio.BaseTransport] = set()

    def _protocol_factory(self) -> H2Protocol:
        # The listener only calls asyncio.Protocol methods, which _Connection forwards.
        return _Connection(super()._protocol_factory(), self.connections)  # type: ignore[return-value]

    async def close_connections(self, grace: float) -> int:
        """Close what is still connected; abort what does not close within ``grace``."""
        count = len(self.connections)
        for transport in list(self.connections):
            transport.close()
        deadline = asyncio.get_running_loop().time() + grace
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for transport in list(self.connections):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        await asyncio.sleep(0)  # let the aborted transports finish closing
        return count


def tls_context(identity: ServerIdentity) -> ssl.SSLContext:
    """The server SVID's context, asking for (not requiring) a client certificate.

    ``ServerIdentity`` keeps it current: a renewed SVID and new trust roots apply to the next
    handshake. Chains are checked again in our code (``NodeService.authenticate``).
    """
    ctx = identity.context(client_auth=True)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols([ALPN_H2])
    return ctx


class NodeApiServer:
    """The node API of one server replica: the pollers, the handlers, the listener."""

    def __init__(
        self,
        ca: CaService,
        identity: ServerIdentity,
        *,
        provisioning_cas: Sequence[x509.Certificate] = (),
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.ca = ca
        self.identity = identity
        self.nodes = NodeService(ca, provisioning_cas=provisioning_cas)
        self.sync = EntrySync(self.nodes)
        self._poll_interval = poll_interval
        self._server: _Server | None = None
        self._api: NodeApi | None = None
        self._watch: ChangeWatch | None = None
        self._policy_watch: ChangeWatch | None = None
        self.policies = PolicyFeed(ca)
        self._pollers: list[asyncio.Task[None]] = []
        self._unlisten: Any = None
        self.port = 0

    def _read_marks(self) -> Any:
        with self.ca.store.read() as tx:
            return sync_marks(tx)

    async def start(self, sock: socket.socket) -> int:
        """Serve on a bound, listening TCP socket (the server owns it from now); returns its
        port."""
        loop = asyncio.get_running_loop()
        watch = ChangeWatch(self._read_marks, interval=self._poll_interval)
        policy_watch = ChangeWatch(self.policies.revision, interval=self._poll_interval)

        def kick() -> None:
            watch.kick()
            policy_watch.kick()

        def on_change() -> None:
            # From the thread that committed; the loop is gone once the server stopped.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(kick)

        self._watch, self._policy_watch = watch, policy_watch
        self._unlisten = self.ca.add_change_listener(on_change)
        self._pollers = [
            asyncio.create_task(watch.run(), name="node-api-change-poll"),
            asyncio.create_task(policy_watch.run(), name="node-api-policy-poll"),
        ]
        self._api = NodeApi(
            self.nodes, self.sync, watch, policies=self.policies, policy_watch=policy_watch
        )
        self._server = _Server([self._api])
        await self._server.start(sock=sock, ssl=tls_context(self.identity))
        host, self.port = sock.getsockname()[:2]
        log.info("node API listening", extra={"host": host, "port": self.port})
        return self.port

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """End open calls (streams get ``UNAVAILABLE``), then cancel, disconnect, stop polling."""
        server, api, watch = self._server, self._api, self._watch
        if server is None or api is None or watch is None:
            return
        self._server = None
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        watch.close()
        if self._policy_watch is not None:
            self._policy_watch.close()
        clean = await api.wait_idle(grace)
        server.close()
        await server.wait_closed()
        connections = await server.close_connections(CLOSE_GRACE)
        for poller in self._pollers:
            poller.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        self._pollers = []
        log.info("node API stopped", extra={"clean": clean, "connections": connections})

    async def __aenter__(self) -> NodeApiServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
