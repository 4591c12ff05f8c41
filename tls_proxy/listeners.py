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
and, inbound, the ``x-forwarded-client-cert`` value of the verified peer.

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
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

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
from .l7 import HttpSession, Upstream, UpstreamProtocol, xfcc_value
from .relay import CHUNK as CHUNK_DETECT
from .relay import close_stream as _close
from .relay import set_nodelay as _nodelay
from .relay import splice
from .spiffe_verify import verify_peer
from .tls import ALPN_H2, TlsContexts, classify_ssl_error, peer_chain_der
from .transparent import OwnConnections, destination

log = logging.getLogger(__name__)

DETECT_TIMEOUT = 1.0  # seconds `auto` waits for a client's first bytes before assuming TCP

Clock = Callable[[], datetime]


def check_protocol(name: str, protocol: str) -> None:
    """Refuse protocols whose codec has not landed yet, before anything binds."""
    if protocol not in SUPPORTED_PROTOCOLS:
        raise ConfigError(
            f"listener {name!r}: not yet supported: protocol {protocol} "
            "(lands with protocol detection); use protocol: tcp or http"
        )


class _Listener:
    """Accepting, tracking in-flight connections and draining them."""

    direction: str
    transparent = False  # relay to each connection's original destination (SO_ORIGINAL_DST)
    _own: OwnConnections | None = None  # transparent outbound: our upstream connections

    def __init__(
        self,
        name: str,
        listen: str,
        tls: TlsContexts,
        chain: FilterChain,
        timeouts: TimeoutsConfig,
        clock: Clock,
        protocol: str,
        http: HttpConfig,
    ) -> None:
        self.name = name
        self.protocol = protocol
        self._http = http
        self.listen = listen
        self._tls = tls
        self._chain = chain
        self._timeouts = timeouts
        self._clock = clock
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._drain_event = asyncio.Event()  # tells L7 codecs to send GOAWAY / stop
        self.port = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        host, port = split(self.listen)
        self._server = await asyncio.start_server(self._accept, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "listener started",
            extra={"listener": self.name, "direction": self.direction, "port": self.port},
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        conn = Connection(
            listener=self.name,
            direction="inbound" if self.direction == "inbound" else "outbound",
            source_address=str(peer[0]),
            source_port=int(peer[1]),
            destination_port=self.port,
            protocol=self.protocol,
        )
        try:
            _nodelay(writer)
            if self.transparent and not self._redirected(writer, conn):
                return
            await self._serve(reader, writer, conn)
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
            self._chain.on_close(conn)
            self._tasks.discard(task)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> None:
        raise NotImplementedError

    def _redirected(self, writer: asyncio.StreamWriter, conn: Connection) -> bool:
        """Transparent mode: record where the connection was going (``conn.upstream``; policy
        sees its port), or refuse it, logged, when that is unknown or would loop back here."""
        try:
            original, target = destination(
                writer.get_extra_info("socket"), inbound=self.direction == "inbound", own=self._own
            )
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

    def _session(
        self,
        conn: Connection,
        open_upstream: Callable[[UpstreamProtocol], Awaitable[Upstream | None]],
        xfcc: bytes | None,
        prefix: bytes,
    ) -> HttpSession:
        return HttpSession(
            conn=conn,
            chain=self._chain,
            settings=self._http,
            idle=self._timeouts.idle,
            open_upstream=open_upstream,
            xfcc=xfcc,
            prefix=prefix,
            draining=self._drain_event,
        )

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
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        left = set(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        return len(left)


class InboundListener(_Listener):
    """mTLS from other sidecars → authenticated, authorized → plain TCP to ``forward``."""

    direction = "inbound"

    def __init__(
        self,
        config: InboundConfig,
        tls: TlsContexts,
        chain: FilterChain,
        timeouts: TimeoutsConfig,
        clock: Clock = lambda: datetime.now(UTC),
        http: HttpConfig | None = None,
    ) -> None:
        check_protocol(config.name, config.protocol)
        super().__init__(
            config.name,
            config.listen,
            tls,
            chain,
            timeouts,
            clock,
            config.protocol,
            http or HttpConfig(),
        )
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
                asyncio.open_connection(host, port), self._timeouts.connect
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

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> None:
        state = self._tls.current()
        conn.local_id = state.snapshot.spiffe_id
        try:
            await writer.start_tls(state.server, ssl_handshake_timeout=self._timeouts.handshake)
        except ssl.SSLError as err:
            self._rejected(conn, classify_ssl_error(err), str(err))
            return
        except (OSError, TimeoutError, ConnectionError) as err:
            self._rejected(conn, RejectReason.HANDSHAKE_FAILED, f"{type(err).__name__}: {err}")
            return
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
            session = self._session(conn, lambda p: self._open_forward(conn, p), xfcc, prefix)
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

    def __init__(
        self,
        config: OutboundConfig,
        tls: TlsContexts,
        chain: FilterChain,
        timeouts: TimeoutsConfig,
        clock: Clock = lambda: datetime.now(UTC),
        http: HttpConfig | None = None,
    ) -> None:
        check_protocol(config.name, config.protocol)
        super().__init__(
            config.name,
            config.listen,
            tls,
            chain,
            timeouts,
            clock,
            config.protocol,
            http or HttpConfig(),
        )
        self.config = config
        self._next = itertools.cycle(range(len(config.upstream)))
        self._expect = frozenset(config.expect_ids)
        self.transparent = config.transparent
        self._own = OwnConnections() if config.transparent else None

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
            session = self._session(conn, lambda p: self._connect(conn, p), None, prefix)
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

    async def _connect(
        self, conn: Connection, protocol: UpstreamProtocol | None
    ) -> Upstream | None:
        """An mTLS connection to the next upstream whose SPIFFE ID is expected, offering
        ``protocol`` by ALPN (h2 must be accepted: the codec cannot fall back), or None.

        The TLS state is read now, not when the downstream connection arrived: an HTTP
        upstream opens lazily (first request, keep-alive reconnects), maybe after a rotation.
        """
        state = self._tls.current()
        start = next(self._next)  # round robin; fail over in list order from there
        upstreams = self.config.upstream
        if self.transparent:
            assert conn.upstream is not None  # set by _redirected before _serve
            upstreams = (conn.upstream,)
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
                        else asyncio.open_connection
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
