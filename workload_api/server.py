"""The SPIFFE Workload API server: grpclib on a Unix socket.

Owns the gRPC shell around the pure parts: the five RPCs of service ``SpiffeWorkloadAPI`` (no
proto package, so paths are ``/SpiffeWorkloadAPI/FetchX509SVID`` etc.), the
``workload.spiffe.io: true`` header check, attestation of each call or stream *once* from the
kernel's peer credentials, and streams that send the whole current state at once and again on
every snapshot change. What a caller gets is ``compose``'s decision; who the caller is comes from
the attestor; the SVIDs come from the ``IdentityProvider``. It must not know how SVIDs are made.

Errors (SPIFFE Workload API §6, SPIRE's messages where it has them)::

    header missing or not "true"         InvalidArgument   security header missing from request
    bad request field / invalid JWT      InvalidArgument   the field and the reason
    attestation failed (gone, reused)    PermissionDenied  workload attestation failed
    no matching identity                 PermissionDenied  no identity issued
    snapshot not ready / server stopping Unavailable
    provider cannot mint a JWT-SVID      Unavailable

Peers get the terse message; the log gets the detail (pid, uid, selectors) at INFO.

Shutdown (``stop``): streams end cleanly first (OK trailers: clients reconnect elsewhere or
retry), then after ``grace`` whatever remains is cancelled, connections are closed and the
socket file is removed, so nothing is left running or open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from google.protobuf.message import Message
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream
from h2.settings import SettingCodes

from . import compose
from ._messages import (
    JWTBundlesRequest,
    JWTBundlesResponse,
    JWTSVIDRequest,
    JWTSVIDResponse,
    ValidateJWTSVIDRequest,
    ValidateJWTSVIDResponse,
    X509BundlesRequest,
    X509BundlesResponse,
    X509SVIDRequest,
    X509SVIDResponse,
)
from .attestors.base import WorkloadAttestor
from .endpoint import DEFAULT_SOCKET_MODE, bind_socket, remove_socket
from .errors import AttestationFailed, IdentityUnavailable, InvalidRequest, NoIdentity
from .peercred import PeerCredentials, peer_credentials, transport_of
from .provider import IdentityProvider, JwtIdentity, Snapshot

log = logging.getLogger(__name__)
MAX_STREAMS_PER_CONNECTION = 1 << 20  # a connection may carry this many concurrent streams

SERVICE = "SpiffeWorkloadAPI"  # no proto package: a package line would break every client
FETCH_X509_SVID = f"/{SERVICE}/FetchX509SVID"
FETCH_X509_BUNDLES = f"/{SERVICE}/FetchX509Bundles"
FETCH_JWT_SVID = f"/{SERVICE}/FetchJWTSVID"
FETCH_JWT_BUNDLES = f"/{SERVICE}/FetchJWTBundles"
VALIDATE_JWT_SVID = f"/{SERVICE}/ValidateJWTSVID"
SECURITY_HEADER = "workload.spiffe.io"  # Workload API §6.2: proves a deliberate API call
SECURITY_HEADER_VALUE = "true"
DEFAULT_STOP_GRACE = timedelta(seconds=5)  # time for streams to end cleanly before cancellation

MISSING_HEADER = "security header missing from request"  # SPIRE's message
ATTESTATION_FAILED = "workload attestation failed"
NOT_READY = "workload API not ready: no identities synced yet"
STOPPING = "workload API is shutting down"
JWT_UNAVAILABLE = "JWT-SVID not available yet"

_Reply = TypeVar("_Reply", bound=Message)
_T = TypeVar("_T")
_P = ParamSpec("_P")


@dataclass(frozen=True)
class Caller:
    """An attested caller: the kernel's credentials and the attestors' selectors."""

    credentials: PeerCredentials
    selectors: frozenset[str]

    def log_fields(self, rpc: str) -> dict[str, object]:
        return {
            "rpc": rpc,
            "pid": self.credentials.pid,
            "uid": self.credentials.uid,
            "gid": self.credentials.gid,
            "selectors": sorted(self.selectors),
        }


class WorkloadApiService:
    """The five handlers, declared to grpclib through ``__mapping__``."""

    def __init__(
        self,
        provider: IdentityProvider,
        attestor: WorkloadAttestor,
        *,
        allow_unauthenticated_verifiers: bool = False,
    ) -> None:
        self._provider = provider
        self._attestor = attestor
        self._allow_unidentified = allow_unauthenticated_verifiers
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._active = 0
        self._transports: set[asyncio.BaseTransport] = set()

    def __mapping__(self) -> Mapping[str, Handler]:
        return {
            FETCH_X509_SVID: Handler(
                self.fetch_x509_svid, Cardinality.UNARY_STREAM, X509SVIDRequest, X509SVIDResponse
            ),
            FETCH_X509_BUNDLES: Handler(
                self.fetch_x509_bundles,
                Cardinality.UNARY_STREAM,
                X509BundlesRequest,
                X509BundlesResponse,
            ),
            FETCH_JWT_SVID: Handler(
                self.fetch_jwt_svid, Cardinality.UNARY_UNARY, JWTSVIDRequest, JWTSVIDResponse
            ),
            FETCH_JWT_BUNDLES: Handler(
                self.fetch_jwt_bundles,
                Cardinality.UNARY_STREAM,
                JWTBundlesRequest,
                JWTBundlesResponse,
            ),
            VALIDATE_JWT_SVID: Handler(
                self.validate_jwt_svid,
                Cardinality.UNARY_UNARY,
                ValidateJWTSVIDRequest,
                ValidateJWTSVIDResponse,
            ),
        }

    @property
    def active_calls(self) -> int:
        """Calls and streams being served right now."""
        return self._active

    # --- the RPCs ----------------------------------------------------------------------------

    async def fetch_x509_svid(self, stream: Stream[X509SVIDRequest, X509SVIDResponse]) -> None:
        await self._serve_stream(stream, FETCH_X509_SVID, compose.x509_svid_response)

    async def fetch_x509_bundles(
        self, stream: Stream[X509BundlesRequest, X509BundlesResponse]
    ) -> None:
        def bundles(snapshot: Snapshot, match: compose.Match) -> X509BundlesResponse:
            return compose.x509_bundles_response(
                snapshot, match, allow_unidentified=self._allow_unidentified
            )

        await self._serve_stream(stream, FETCH_X509_BUNDLES, bundles)

    async def fetch_jwt_bundles(
        self, stream: Stream[JWTBundlesRequest, JWTBundlesResponse]
    ) -> None:
        def bundles(snapshot: Snapshot, match: compose.Match) -> JWTBundlesResponse:
            return compose.jwt_bundles_response(
                snapshot, match, allow_unidentified=self._allow_unidentified
            )

        await self._serve_stream(stream, FETCH_JWT_BUNDLES, bundles)

    async def fetch_jwt_svid(self, stream: Stream[JWTSVIDRequest, JWTSVIDResponse]) -> None:
        with self._tracked():
            request = await self._open_call(stream)
            caller = await self._attest(stream, FETCH_JWT_SVID)
            snapshot = self._servable(self._provider.current())
            match = self._match(snapshot, caller, FETCH_JWT_SVID)
            audiences, targets = self._decide(
                caller, FETCH_JWT_SVID, compose.jwt_svid_targets, request, match
            )
            minted: list[JwtIdentity] = []
            for identity in targets:
                try:
                    minted.append(await self._provider.fetch_jwt_svid(identity.entry_id, audiences))
                except IdentityUnavailable as err:
                    log.info(
                        "JWT-SVID unavailable",
                        extra={**caller.log_fields(FETCH_JWT_SVID), "reason": str(err)},
                    )
                    raise GRPCError(Status.UNAVAILABLE, JWT_UNAVAILABLE) from err
            await stream.send_message(compose.jwt_svid_response(zip(targets, minted, strict=True)))

    async def validate_jwt_svid(
        self, stream: Stream[ValidateJWTSVIDRequest, ValidateJWTSVIDResponse]
    ) -> None:
        with self._tracked():
            request = await self._open_call(stream)
            caller = await self._attest(stream, VALIDATE_JWT_SVID)
            snapshot = self._servable(self._provider.current())
            match = self._match(snapshot, caller, VALIDATE_JWT_SVID)
            response = self._decide(
                caller,
                VALIDATE_JWT_SVID,
                compose.validate_jwt_svid,
                request,
                snapshot,
                match,
                allow_unidentified=self._allow_unidentified,
            )
            await stream.send_message(response)

    # --- the shared shell --------------------------------------------------------------------

    async def _serve_stream(
        self,
        stream: Stream[Any, _Reply],
        rpc: str,
        build: Callable[[Snapshot, compose.Match], _Reply],
    ) -> None:
        """Send the whole state now, then again whenever it changes for this caller."""
        with self._tracked():
            await self._open_call(stream)
            caller = await self._attest(stream, rpc)  # once per stream: selectors are fixed
            snapshot = self._servable(self._provider.current())
            sent: _Reply | None = None
            while True:
                match = self._match(snapshot, caller, rpc)
                message = self._decide(caller, rpc, build, snapshot, match)
                if message != sent:  # another workload's change is not news to this one
                    await stream.send_message(message)
                    sent = message
                changed = await self._next_snapshot(snapshot.version)
                if changed is None:
                    return  # stopping: end the stream with OK, the client reconnects
                snapshot = self._servable(changed)

    async def _open_call(self, stream: Stream[Any, Any]) -> Any:
        if self._stopping.is_set():
            raise GRPCError(Status.UNAVAILABLE, STOPPING)
        if stream.metadata is None or stream.metadata.get(SECURITY_HEADER) != SECURITY_HEADER_VALUE:
            raise GRPCError(Status.INVALID_ARGUMENT, MISSING_HEADER)
        return await stream.recv_message()

    async def _attest(self, stream: Stream[Any, Any], rpc: str) -> Caller:
        credentials: PeerCredentials | None = None
        try:
            transport = transport_of(stream.peer)
            credentials = peer_credentials(transport)
            self._remember(transport)
            selectors = await self._attestor.attest(credentials.pid)
        except AttestationFailed as err:
            fields: dict[str, object] = {"rpc": rpc, "reason": str(err)}
            if credentials is not None:
                fields.update(pid=credentials.pid, uid=credentials.uid, gid=credentials.gid)
            log.info("workload attestation failed", extra=fields)
            raise GRPCError(Status.PERMISSION_DENIED, ATTESTATION_FAILED) from err
        return Caller(credentials, selectors)

    def _servable(self, snapshot: Snapshot) -> Snapshot:
        if not snapshot.ready:
            raise GRPCError(Status.UNAVAILABLE, NOT_READY)
        return snapshot

    def _match(self, snapshot: Snapshot, caller: Caller, rpc: str) -> compose.Match:
        match = compose.match_identities(snapshot, caller.selectors)
        for identity in match.dropped:
            log.warning(
                "identity dropped: its hint repeats an earlier one (hints are unique per response)",
                extra={
                    **caller.log_fields(rpc),
                    "entry_id": identity.entry_id,
                    "hint": identity.hint,
                },
            )
        return match

    def _decide(
        self,
        caller: Caller,
        rpc: str,
        decide: Callable[_P, _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run a composition step, turning its refusals into gRPC statuses (and log lines)."""
        try:
            return decide(*args, **kwargs)
        except NoIdentity as err:
            log.info("no identity for caller", extra=caller.log_fields(rpc))
            raise GRPCError(Status.PERMISSION_DENIED, compose.NO_IDENTITY) from err
        except InvalidRequest as err:
            log.info("invalid request", extra={**caller.log_fields(rpc), "reason": str(err)})
            raise GRPCError(Status.INVALID_ARGUMENT, str(err)) from err

    async def _next_snapshot(self, version: int) -> Snapshot | None:
        """The next snapshot, or None once the server is stopping."""
        change = asyncio.ensure_future(self._provider.wait_changed(version))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({change, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (change, stop):
                task.cancel()
            await asyncio.gather(change, stop, return_exceptions=True)
        if stop.done() and not stop.cancelled():
            return None
        return change.result()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def _remember(self, transport: asyncio.BaseTransport) -> None:
        self._transports = {t for t in self._transports if not t.is_closing()}
        self._transports.add(transport)

    # --- shutdown ----------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """Streams end with OK at their next wake-up; new calls get Unavailable."""
        self._stopping.set()

    async def wait_idle(self, timeout: timedelta) -> bool:
        """True once no call is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout.total_seconds())
        except TimeoutError:
            return False
        return True

    def close_connections(self) -> int:
        """Close every connection a call came in on; returns how many were open."""
        open_transports = [t for t in self._transports if not t.is_closing()]
        for transport in open_transports:
            transport.close()
        self._transports.clear()
        return len(open_transports)


class _ManyStreamsServer(Server):
    """grpclib's server, advertising room for many concurrent streams per connection.

    h2 defaults to 100 (SETTINGS_MAX_CONCURRENT_STREAMS), and a grpcio client queues every
    stream past that on the connection; one process's py-spiffe sources share a connection, so
    the 101st ``X509Source`` would hang. grpc-go servers (SPIRE) allow practically unlimited.
    The new setting is sent right after grpclib's connection preface; ``_connection`` (the
    H2Connection) is private grpclib API, pinned by ``test_many_streams_on_one_connection``.
    """

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        made = protocol.connection_made

        def connection_made(transport: asyncio.BaseTransport) -> None:
            made(transport)
            connection = protocol.connection
            connection._connection.update_settings(
                {SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS_PER_CONNECTION}
            )
            connection.flush()

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        return protocol


class WorkloadApiServer:
    """The Workload API on a Unix socket: ``start()``, ``stop()``, or ``serve_forever()``."""

    def __init__(
        self,
        provider: IdentityProvider,
        attestor: WorkloadAttestor,
        socket_path: str | os.PathLike[str],
        *,
        socket_mode: int = DEFAULT_SOCKET_MODE,
        allow_unauthenticated_verifiers: bool = False,
    ) -> None:
        self._provider = provider
        self._attestor = attestor
        self._socket_path = Path(socket_path)
        self._socket_mode = socket_mode
        self._allow_unidentified = allow_unauthenticated_verifiers
        self._service: WorkloadApiService | None = None
        self._server: Server | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    @property
    def active_calls(self) -> int:
        return 0 if self._service is None else self._service.active_calls

    async def wait_idle(self, timeout: timedelta) -> bool:
        """True once no call or stream is being served (False if ``timeout`` passed first)."""
        if self._service is None:
            return True
        return await self._service.wait_idle(timeout)

    async def start(self) -> None:
        """Bind the socket (folder made 0755, stale socket removed, mode applied) and serve."""
        if self._server is not None:
            raise RuntimeError("the Workload API server is already started")
        self._service = WorkloadApiService(
            self._provider,
            self._attestor,
            allow_unauthenticated_verifiers=self._allow_unidentified,
        )
        self._stopped = asyncio.Event()
        sock = bind_socket(self._socket_path, mode=self._socket_mode)
        server = _ManyStreamsServer([self._service])
        try:
            await server.start(sock=sock)
        except BaseException:
            sock.close()
            remove_socket(self._socket_path)
            raise
        self._server = server
        log.info(
            "workload API serving",
            extra={"socket": str(self._socket_path), "mode": f"{self._socket_mode:o}"},
        )

    async def stop(self, grace: timedelta = DEFAULT_STOP_GRACE) -> None:
        """End streams cleanly, wait up to ``grace``, then cancel, disconnect and unlink."""
        server, service = self._server, self._service
        if server is None or service is None:
            return
        self._server = None
        service.begin_stop()
        clean = await service.wait_idle(grace)
        server.close()  # stop listening; cancel what did not end within the grace
        await server.wait_closed()
        closed = service.close_connections()
        remove_socket(self._socket_path)
        assert self._stopped is not None
        self._stopped.set()
        log.info(
            "workload API stopped",
            extra={"socket": str(self._socket_path), "clean": clean, "connections": closed},
        )

    async def serve_forever(self, grace: timedelta = DEFAULT_STOP_GRACE) -> None:
        """Start if needed and serve until ``stop()`` or cancellation (which stops cleanly)."""
        if self._server is None:
            await self.start()
        assert self._stopped is not None
        try:
            await self._stopped.wait()
        finally:
            await self.stop(grace)

    async def __aenter__(self) -> WorkloadApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
