"""Listeners: inbound mTLS → plain loopback app, outbound plain loopback → mTLS upstream.

Owns accepting, the TLS handshake (with a fresh context from ``TlsContexts`` per connection, so
rotation takes effect at the next handshake), SPIFFE authentication (``spiffe_verify``), running
the connection filter chain, and splicing bytes both ways with TCP_NODELAY, backpressure
(``drain``), idle and handshake timeouts and half-close where the transport allows it. It also
owns graceful drain: stop accepting, wait for in-flight connections up to a grace, then close.

It detects the wire protocol (``tcp``: none; ``http``: ALPN ``h2`` after TLS, else the h2
client preface or HTTP/1.1; ``auto``: the same, or opaque TCP, from the first bytes within
``DETECT_TIMEOUT``; ``detect.sniff`` decides). TCP is spliced (``relay.splice``); HTTP/1.1 and
HTTP/2 are handed, authenticated, to the codec ``codecs.CODECS`` names, with a way to open
the upstream (inbound: plain TCP to ``forward``; outbound: mTLS with ``expect_ids`` checked)
and, inbound, the ``x-forwarded-client-cert`` value of the verified peer. HTTP/1.1 upstream
connections are pooled (``pool.UpstreamPool``); HTTP/2 ones are shared by the streams of every
downstream connection (``h2pool.H2Pool``), both keyed by ``_pool_tag`` and cleared on reload.

Transparent listeners (``forward``/``upstream: original_dst``) first recover where an accepted
connection was going (``transparent.destination``: the NAT entry of the iptables REDIRECT) and
relay it there (outbound) or to that port on loopback (inbound); one that was not redirected,
or would loop back into the proxy, is refused and logged before any byte is read.

It must not decide policy (the ``authz`` filter asks ``authz``) nor know which filters or
codecs exist: new filters and codecs slot in through the chain and ``CODECS``, not here.

Half-close: an EOF is passed on as a FIN where the far side is a plain socket, and the other
direction goes on. asyncio cannot half-close a TLS stream (``can_write_eof`` is False, and a
received close_notify shuts the TLS side down), so an EOF toward a TLS side ends the connection
both ways once the data before it is written.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import socket
import ssl
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import streams
from .codecs import CODECS
from .config import (
    SUPPORTED_PROTOCOLS,
    HttpConfig,
    InboundConfig,
    OutboundConfig,
    TimeoutsConfig,
)
from .config import split_address as split
from .detect import Detected, sniff
from .errors import ConfigError, NoOriginalDestination, PeerRejected, RejectReason
from .filters.base import Connection, FilterChain
from .h2pool import H2Pool, Opened
from .l7 import HttpSession, Upstream, UpstreamProtocol, xfcc_value
from .pool import Pooled, UpstreamPool
from .relay import CHUNK as CHUNK_DETECT
from .relay import close_stream as _close
from .relay import set_nodelay as _nodelay
from .relay import splice
from .spiffe_verify import verify_peer
from .tls import ALPN_H2, ALPN_HTTP1, TlsContexts, TlsState, classify_ssl_error, peer_chain_der
from .transparent import OwnConnections, destination

if TYPE_CHECKING:
    from .h2shared import SharedH2

log = logging.getLogger(__name__)

DETECT_TIMEOUT = 1.0  # seconds `auto` waits for a client's first bytes before assuming TCP
ACCEPT_BACKOFF = 0.1  # seconds before accepting again when out of file descriptors or memory
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LISTEN_BACKLOG = 1024  # pending connections per listening socket (asyncio's default is 100)

Clock = Callable[[], datetime]


def check_protocol(name: str, protocol: str) -> None:
    """Refuse protocols whose codec has not landed yet, before anything binds."""
    if protocol not in SUPPORTED_PROTOCOLS:
        raise ConfigError(
            f"listener {name!r}: not yet supported: protocol {protocol} "
            "(lands with protocol detection); use protocol: tcp or http"
        )


class _Acceptor:
    """A listening socket accepted by hand, each raw socket handed to ``handle``.

    Inbound connections start with TLS. asyncio's servers start reading an accepted socket
    before their callback runs (uvloop within the same loop iteration), so a ClientHello would
    land in a plain ``StreamReader`` and ``start_tls`` would wait for it forever. Accepting by
    hand lets ``loop.connect_accepted_socket`` run the handshake from the first byte, with the
    TLS context current at that moment. Same ``close``/``wait_closed`` as ``asyncio.Server``.
    """

    def __init__(
        self, sock: socket.socket, handle: Callable[[socket.socket], Coroutine[Any, Any, None]]
    ) -> None:
        self.sockets = [sock]
        self._handle = handle
        self._connections: set[asyncio.Task[None]] = set()  # a reference until each ends
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sockets[0]
        while True:
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as err:
                if err.errno not in _ACCEPT_RETRY:
                    raise
                log.error("accept failed; retrying", extra={"error": str(err)})
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            client.setblocking(False)
            task = loop.create_task(self._handle(client))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def close(self) -> None:
        self._task.cancel()
        self.sockets[0].close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._task, return_exceptions=True)


async def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on ``host:port`` (the first address ``host`` resolves to)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    sock = socket.create_server(
        address[:2], family=family, backlog=LISTEN_BACKLOG, reuse_port=reuse_port
    )
    sock.setblocking(False)
    return sock


class _Listener:
    """Accepting, tracking in-flight connections and draining them."""

    direction: str
    transparent = False  # relay to each connection's original destination (SO_ORIGINAL_DST)
    _own: OwnConnections | None = None  # transparent outbound: our upstream connections

    def __init__(
        self,
        config: InboundConfig | OutboundConfig,
        tls: TlsContexts,
        chain: FilterChain,
        timeouts: TimeoutsConfig,
        clock: Clock = lambda: datetime.now(UTC),
        http: HttpConfig | None = None,
    ) -> None:
        self.name = config.name
        self.listen = config.listen
        self._tls = tls
        self._clock = clock
        self._server: asyncio.base_events.Server | _Acceptor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._drain_event = asyncio.Event()  # tells L7 codecs to send GOAWAY / stop
        self.port = 0
        self.reuse_port = False  # runtime.workers > 1: every worker binds the same port
        self.pool: UpstreamPool | None = None  # idle HTTP/1.1 upstream connections
        self._opened: weakref.WeakKeyDictionary[asyncio.StreamWriter, Pooled] = (
            weakref.WeakKeyDictionary()
        )  # what the pool needs to know of the HTTP/1.1 upstream connections we opened
        http = http or HttpConfig()
        # HTTP/2 upstream connections, shared by the streams of every downstream connection.
        self.h2pool = H2Pool(*self._h2_limits(timeouts, http))
        self.update(config, chain, timeouts, http)

    def update(
        self,
        config: InboundConfig | OutboundConfig,
        chain: FilterChain,
        timeouts: TimeoutsConfig,
        http: HttpConfig,
    ) -> None:
        """A configuration reload on the same address: connections accepted from now on use
        ``config``, ``chain``, ``timeouts`` and ``http``; open ones finish with what they had
        (policy excepted: every request reads the shared store). Idle pooled upstream
        connections are closed, as they may go where the new config no longer points, and
        shared HTTP/2 ones take no new streams (idle ones close now, busy ones when their
        streams are done). The constructor applies the first configuration the same way."""
        check_protocol(config.name, config.protocol)
        self.protocol = config.protocol
        self._chain = chain
        self._timeouts = timeouts
        self._http = http
        if self.pool is not None:
            self.pool.close()  # sessions that hold it check their connections in and close them
        self.pool = (
            UpstreamPool(http.pool_max_idle, http.pool_idle_timeout) if http.pool_max_idle else None
        )
        self.h2pool.configure(*self._h2_limits(timeouts, http))
        self.h2pool.retire_all()
        self._configure(config)

    @staticmethod
    def _h2_limits(timeouts: TimeoutsConfig, http: HttpConfig) -> tuple[int, float, float, float]:
        """``H2Pool``'s limits: connections per address, idle and read timeouts, and how long
        a new connection may take to send its SETTINGS (as long as a connect may take)."""
        return http.h2_max_connections, http.pool_idle_timeout, timeouts.idle, timeouts.connect

    def _configure(self, config: InboundConfig | OutboundConfig) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        host, port = split(self.listen)
        self._server = await streams.start_server(
            self._accept, host, port, reuse_port=self.reuse_port or None, backlog=LISTEN_BACKLOG
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "listener started",
            extra={"listener": self.name, "direction": self.direction, "port": self.port},
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's server callback: a plain TCP connection."""
        _nodelay(writer)
        serve = functools.partial(self._serve, reader, writer)
        await self._handle(
            writer.get_extra_info("peername"), serve, writer, writer.get_extra_info("socket")
        )

    async def _handle(
        self,
        peer: tuple[str, int] | None,
        serve: Callable[[Connection], Awaitable[None]],
        writer: asyncio.StreamWriter | None,
        sock: socket.socket | None = None,
    ) -> None:
        """Run ``serve`` for one accepted connection: errors recorded, cleanup, ``on_close``."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        chain = self._chain
        peer = peer or ("?", 0)
        conn = Connection(
            listener=self.name,
            direction="inbound" if self.direction == "inbound" else "outbound",
            source_address=str(peer[0]),
            source_port=int(peer[1]),
            destination_port=self.port,
            protocol=self.protocol,
        )
        try:
            if self.transparent and not self._redirected(sock, conn):
                if writer is None and sock is not None:
                    sock.close()  # refused before TLS: nothing else owns the socket yet
                return
            await serve(conn)
        except (OSError, ssl.SSLError, TimeoutError) as err:
            conn.error = conn.error or type(err).__name__
            conn.detail = str(err)
        except asyncio.CancelledError:
            conn.error = conn.error or "drained"
            if not self._draining:
                raise
            # Cancelled by drain(): end quietly (asyncio logs a cancelled connection callback).
        finally:
            await _close(writer)
            chain.on_close(conn)  # the chain it was accepted under, even after a reload
            self._tasks.discard(task)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> None:
        raise NotImplementedError

    def _redirected(self, sock: socket.socket | None, conn: Connection) -> bool:
        """Transparent mode: record where the connection was going (``conn.upstream``; policy
        sees its port), or refuse it, logged, when that is unknown or would loop back here."""
        try:
            if sock is None:
                raise NoOriginalDestination("the transport exposes no socket to ask")
            original, target = destination(sock, inbound=self.direction == "inbound", own=self._own)
        except NoOriginalDestination as err:
            conn.error = "no_original_dst"
            conn.detail = str(err)
            log.info(
                "transparent connection refused",
                extra={"listener": self.name, "source": conn.source, "reason": str(err)},
            )
            return False
        conn.upstream = str(target)
        conn.destination_port = original.port
        return True

    def _rejected(self, conn: Connection, reason: RejectReason, detail: str) -> None:
        conn.result = "rejected"
        conn.error = str(reason)
        conn.detail = detail
        log.info(
            "peer rejected",
            extra={
                "listener": self.name,
                "direction": conn.direction,
                "source": conn.source,
                "upstream": conn.upstream,
                "reason": str(reason),
                "detail": detail,
            },
        )

    def _authorize(self, conn: Connection) -> bool:
        deny = self._chain.on_connection(conn)
        if deny is None:
            return True
        conn.result = "denied"
        conn.error = f"denied_by_{deny.filter}"
        conn.detail = deny.reason
        return False

    async def _open_upstream(
        self, conn: Connection, protocol: UpstreamProtocol, first: str | None = None
    ) -> Upstream | None:
        """A new upstream connection for ``conn`` speaking ``protocol`` (trying ``first``
        first, where there is a choice), or None (logged, ``conn.error`` says why)."""
        raise NotImplementedError

    def _h2_address(self, conn: Connection) -> str:
        """The upstream address ``conn``'s next HTTP/2 stream goes to."""
        raise NotImplementedError

    def _session(self, conn: Connection, xfcc: bytes | None, prefix: bytes) -> HttpSession:
        async def h2_upstream() -> SharedH2 | None:
            address = self._h2_address(conn)

            async def open_shared() -> Opened | None:
                opened = await self._open_upstream(conn, "h2", address)
                if opened is None:
                    return None
                peer = conn.peer_id if self.direction == "outbound" else None
                return Opened(*opened, conn.upstream or address, peer)

            shared = await self.h2pool.acquire(self._pool_tag(), address, open_shared)
            if shared is not None:
                conn.upstream = shared.address
                if self.direction == "outbound":
                    conn.peer_id = shared.peer_id
            return shared

        async def open_upstream(protocol: UpstreamProtocol) -> Upstream | None:
            return await self._open_upstream(conn, protocol)

        pool = self.pool
        if pool is None:
            checkout = checkin = None
        else:
            plain_open = open_upstream

            async def open_upstream(protocol: UpstreamProtocol) -> Upstream | None:
                tag = self._pool_tag()
                opened = await plain_open(protocol)
                if opened is not None and protocol == ALPN_HTTP1:
                    peer = conn.peer_id if self.direction == "outbound" else None
                    self._opened[opened[1]] = Pooled(*opened, conn.upstream or "", peer, tag)
                return opened

            def checkout() -> Upstream | None:
                # Transparent: each connection goes to its own original destination.
                entry = pool.take(self._pool_tag(), conn.upstream if self.transparent else None)
                if entry is None:
                    return None
                conn.upstream = entry.address
                if self.direction == "outbound":
                    conn.peer_id = entry.peer_id
                return entry.reader, entry.writer

            def checkin(upstream: Upstream) -> None:
                entry = self._opened.get(upstream[1])
                if entry is None:
                    upstream[1].close()
                else:
                    pool.put(entry)

        return HttpSession(
            conn=conn,
            chain=self._chain,
            settings=self._http,
            idle=self._timeouts.idle,
            open_upstream=open_upstream,
            xfcc=xfcc,
            prefix=prefix,
            draining=self._drain_event,
            checkout=checkout,
            checkin=checkin,
            h2_upstream=h2_upstream,
        )

    def _pool_tag(self) -> object:
        """What a pooled connection must have been opened under to be reused."""
        return self

    async def _detect(
        self, reader: asyncio.StreamReader, alpn: str | None
    ) -> tuple[Detected, bytes] | None:
        """The wire protocol and the bytes read to find it; None if the client left or idled.

        ``tcp`` reads nothing. After TLS, ALPN ``h2`` decides. Otherwise the first bytes do
        (``detect.sniff``): on ``http`` the h2 preface or else HTTP/1.1, waiting as long as an
        idle keep-alive connection may; on ``auto`` also TCP, waiting ``DETECT_TIMEOUT``.
        """
        if self.protocol == "tcp":
            return "tcp", b""
        if alpn == ALPN_H2:
            return "h2", b""
        http_only = self.protocol == "http"
        loop = asyncio.get_running_loop()
        budget = self._http.keepalive_timeout if http_only else DETECT_TIMEOUT
        deadline = loop.time() + budget
        data = b""
        while (verdict := sniff(data, final=False, http_only=http_only)) is None:
            try:
                chunk = await asyncio.wait_for(
                    reader.read(CHUNK_DETECT), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                if not data and http_only:
                    return None  # an idle connection: close quietly, as HTTP/1.1 does
                chunk = b""
            if not chunk:
                if not data and (http_only or reader.at_eof()):
                    return None
                verdict = sniff(data, final=True, http_only=http_only)
                assert verdict is not None
                break
            if not data and http_only:
                deadline = loop.time() + self._http.header_timeout
            data += chunk
        return verdict, data

    def _l7(self, conn: Connection, detected: Detected) -> None:
        """Record the detected protocol where filters read it (L4 authz skips L7 ones)."""
        conn.protocol = "tcp" if detected == "tcp" else "http"

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, grace: float) -> int:
        """Stop accepting, wait up to ``grace`` seconds for in-flight connections, then cancel
        the rest; returns how many had to be cancelled."""
        self.stop_accepting()
        self._draining = True
        self._drain_event.set()
        if self.pool is not None:
            self.pool.close()
        self.h2pool.retire_all()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        left = set(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        await self.h2pool.close()
        if self._server is not None:
            await self._server.wait_closed()
        return len(left)


class InboundListener(_Listener):
    """mTLS from other sidecars → authenticated, authorized → plain TCP to ``forward``."""

    direction = "inbound"

    def _configure(self, config: InboundConfig | OutboundConfig) -> None:
        assert isinstance(config, InboundConfig)
        self.config = config
        self.transparent = config.transparent

    async def _open_forward(
        self, conn: Connection, protocol: UpstreamProtocol | None = None
    ) -> Upstream | None:
        """A plain connection to the local app (``protocol``: h2 is h2c with prior knowledge)."""
        forward = self.config.forward
        if self.transparent:
            assert conn.upstream is not None  # set by _redirected before _serve
            forward = conn.upstream
        host, port = split(forward)
        conn.upstream = forward
        try:
            opened = await asyncio.wait_for(
                streams.open_connection(host, port), self._timeouts.connect
            )
        except (OSError, TimeoutError) as err:
            conn.error = "forward_unreachable"
            conn.detail = str(err)
            log.warning(
                "local app unreachable", extra={"listener": self.name, "forward": conn.upstream}
            )
            return None
        _nodelay(opened[1])
        return opened

    async def _open_upstream(
        self, conn: Connection, protocol: UpstreamProtocol, first: str | None = None
    ) -> Upstream | None:
        return await self._open_forward(conn, protocol)  # one app address: no choice

    def _h2_address(self, conn: Connection) -> str:
        if self.transparent:
            assert conn.upstream is not None  # set by _redirected before _serve
            return conn.upstream
        return self.config.forward

    async def start(self) -> None:
        host, port = split(self.listen)
        self._server = _Acceptor(await _bind(host, port, self.reuse_port), self._accept_tls)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "listener started",
            extra={"listener": self.name, "direction": self.direction, "port": self.port},
        )

    async def _accept_tls(self, sock: socket.socket) -> None:
        try:
            peer = sock.getpeername()
        except OSError:  # already gone
            sock.close()
            return
        await self._handle(peer, functools.partial(self._serve_tls, sock), None, sock)

    async def _serve_tls(self, sock: socket.socket, conn: Connection) -> None:
        """The TLS handshake over the accepted socket, then ``_serve``."""
        loop = asyncio.get_running_loop()
        state = self._tls.current()
        conn.local_id = state.snapshot.spiffe_id
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = streams.Reader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=state.server,
                ssl_handshake_timeout=self._timeouts.handshake,
            )
        except ssl.SSLError as err:
            self._rejected(conn, classify_ssl_error(err), str(err))
            return
        except (OSError, TimeoutError, ConnectionError) as err:
            self._rejected(conn, RejectReason.HANDSHAKE_FAILED, f"{type(err).__name__}: {err}")
            return  # the failed transport has closed the socket
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            await self._serve(reader, writer, conn, state)
        finally:
            await _close(writer)

    async def _serve(  # type: ignore[override]
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
        state: TlsState,
    ) -> None:
        chain = peer_chain_der(writer.get_extra_info("ssl_object"))
        try:
            peer = verify_peer(chain, state.snapshot.bundles, now=self._clock())
        except PeerRejected as err:
            self._rejected(conn, err.reason, err.detail)
            return
        conn.peer_id = str(peer)
        ssl_object = writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        detected = await self._detect(reader, alpn)
        if detected is None:
            conn.result = "allowed" if self.protocol == "http" else conn.result
            conn.error = conn.error or "no_request"
            return
        kind, prefix = detected
        self._l7(conn, kind)
        if not self._authorize(conn):
            return
        if kind in CODECS:
            conn.result = "allowed"
            xfcc = xfcc_value(state.snapshot.spiffe_id, conn.peer_id)
            session = self._session(conn, xfcc, prefix)
            await CODECS[kind](reader, writer, session)
            return
        opened = await self._open_forward(conn)
        if opened is None:
            return
        up_reader, up_writer = opened
        try:
            conn.result = "allowed"
            if prefix:
                up_writer.write(prefix)
                conn.bytes_in += len(prefix)
            await splice(reader, writer, up_reader, up_writer, conn, self._timeouts.idle)
        finally:
            await _close(up_writer)


class OutboundListener(_Listener):
    """Plain TCP from the local app → mTLS to an upstream sidecar whose ID is expected."""

    direction = "outbound"

    def _configure(self, config: InboundConfig | OutboundConfig) -> None:
        assert isinstance(config, OutboundConfig)
        self.config = config
        self._next = itertools.cycle(range(len(config.upstream)))
        self._expect = frozenset(config.expect_ids)
        self.transparent = config.transparent
        if not config.transparent:
            self._own = None
        elif self._own is None:  # keep the ports of connections already opening
            self._own = OwnConnections()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> None:
        conn.local_id = self._tls.current().snapshot.spiffe_id
        detected = await self._detect(reader, None)
        if detected is None:
            conn.result = "allowed" if self.protocol == "http" else conn.result
            conn.error = conn.error or "no_request"
            return
        kind, prefix = detected
        self._l7(conn, kind)
        if kind in CODECS:
            if not self._authorize(conn):
                return
            conn.result = "allowed"
            session = self._session(conn, None, prefix)
            await CODECS[kind](reader, writer, session)
            return
        opened = await self._connect(conn, None)
        if opened is None:
            return
        up_reader, up_writer = opened
        try:
            if not self._authorize(conn):
                return
            conn.result = "allowed"
            if prefix:
                up_writer.write(prefix)
                conn.bytes_in += len(prefix)
            await splice(reader, writer, up_reader, up_writer, conn, self._timeouts.idle)
        finally:
            await _close(up_writer)

    def _pool_tag(self) -> object:
        """The TLS state (our SVID, the bundles a peer is verified against) of the moment:
        after a rotation, connections opened and verified under the old one are not reused."""
        return self._tls.current()

    async def _open_upstream(
        self, conn: Connection, protocol: UpstreamProtocol, first: str | None = None
    ) -> Upstream | None:
        return await self._connect(conn, protocol, first)

    def _h2_address(self, conn: Connection) -> str:
        """Round robin per stream; transparent: the connection's original destination."""
        if self.transparent:
            assert conn.upstream is not None  # set by _redirected before _serve
            return conn.upstream
        return self.config.upstream[next(self._next)]

    async def _connect(
        self, conn: Connection, protocol: UpstreamProtocol | None, first: str | None = None
    ) -> Upstream | None:
        """An mTLS connection to the next upstream (or ``first``) whose SPIFFE ID is
        expected, offering ``protocol`` by ALPN (h2 must be accepted: the codec cannot fall
        back), or None.

        The TLS state is read now, not when the downstream connection arrived: an HTTP
        upstream opens lazily (first request, keep-alive reconnects), maybe after a rotation.
        """
        state = self._tls.current()
        upstreams = self.config.upstream
        if self.transparent:
            assert conn.upstream is not None  # set by _redirected before _serve
            upstreams = (conn.upstream,)
        # Round robin; fail over in list order from there.
        start = upstreams.index(first) if first in upstreams else next(self._next)
        opened: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for offset in range(len(upstreams)):
            address = upstreams[(start + offset) % len(upstreams)]
            conn.upstream = address
            host, port = split(address)
            try:
                opened = await asyncio.wait_for(
                    (
                        self._own.open_connection
                        if self._own is not None
                        else streams.open_connection
                    )(
                        host,
                        port,
                        ssl=state.client_for(protocol),
                        ssl_handshake_timeout=self._timeouts.handshake,
                    ),
                    self._timeouts.connect + self._timeouts.handshake,
                )
                break
            except ssl.SSLError as err:
                self._rejected(conn, classify_ssl_error(err), str(err))
                return None
            except (OSError, TimeoutError) as err:
                log.warning(
                    "upstream unreachable, trying the next",
                    extra={"listener": self.name, "upstream": address, "error": str(err)},
                )
        if opened is None:
            conn.error = "no_upstream"
            conn.detail = f"none of {list(upstreams)} answered"
            return None
        up_writer = opened[1]
        _nodelay(up_writer)
        chain = peer_chain_der(up_writer.get_extra_info("ssl_object"))
        try:
            peer = verify_peer(
                chain, state.snapshot.bundles, now=self._clock(), expect_ids=self._expect
            )
        except PeerRejected as err:
            self._rejected(conn, err.reason, err.detail)
            await _close(up_writer)
            return None
        conn.peer_id = str(peer)
        if protocol == ALPN_H2:
            selected = up_writer.get_extra_info("ssl_object").selected_alpn_protocol()
            if selected != ALPN_H2:
                conn.error = "alpn_mismatch"
                conn.detail = f"{conn.upstream} did not accept h2 by ALPN (selected {selected})"
                log.warning(
                    "upstream does not speak h2",
                    extra={"listener": self.name, "upstream": conn.upstream},
                )
                await _close(up_writer)
                return None
        return opened


Listener = InboundListener | OutboundListener
