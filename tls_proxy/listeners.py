"""Listeners: inbound mTLS → plain loopback app, outbound plain loopback → mTLS upstream.

Owns accepting, the TLS handshake (with a fresh context from ``TlsContexts`` per connection, so
rotation takes effect at the next handshake), SPIFFE authentication (``spiffe_verify``), running
the connection filter chain, and splicing bytes both ways with TCP_NODELAY, backpressure
(``drain``), idle and handshake timeouts and half-close where the transport allows it. It also
owns graceful drain: stop accepting, wait for in-flight connections up to a grace, then close.

For ``protocol: tcp`` it splices bytes (``relay.splice``); for an L7 protocol it hands the
authenticated connection to the codec ``codecs.CODECS`` names, with a way to open the upstream
(inbound: plain TCP to ``forward``; outbound: mTLS with ``expect_ids`` checked) and, inbound,
the ``x-forwarded-client-cert`` value of the verified peer.

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
from .errors import ConfigError, PeerRejected, RejectReason
from .filters.base import Connection, FilterChain
from .l7 import HttpSession, Upstream, xfcc_value
from .relay import close_stream as _close
from .relay import set_nodelay as _nodelay
from .relay import splice
from .spiffe_verify import verify_peer
from .tls import TlsContexts, TlsState, classify_ssl_error, peer_chain_der

log = logging.getLogger(__name__)

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
        open_upstream: Callable[[], Awaitable[Upstream | None]],
        xfcc: bytes | None,
    ) -> HttpSession:
        return HttpSession(
            conn=conn,
            chain=self._chain,
            settings=self._http,
            idle=self._timeouts.idle,
            open_upstream=open_upstream,
            xfcc=xfcc,
        )

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, grace: float) -> int:
        """Stop accepting, wait up to ``grace`` seconds for in-flight connections, then cancel
        the rest; returns how many had to be cancelled."""
        self.stop_accepting()
        self._draining = True
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

    async def _open_forward(self, conn: Connection) -> Upstream | None:
        host, port = split(self.config.forward)
        conn.upstream = self.config.forward
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
        if not self._authorize(conn):
            return
        if self.protocol in CODECS:
            conn.result = "allowed"
            xfcc = xfcc_value(state.snapshot.spiffe_id, conn.peer_id)
            session = self._session(conn, lambda: self._open_forward(conn), xfcc)
            await CODECS[self.protocol](reader, writer, session)
            return
        opened = await self._open_forward(conn)
        if opened is None:
            return
        up_reader, up_writer = opened
        try:
            conn.result = "allowed"
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

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> None:
        state = self._tls.current()
        conn.local_id = state.snapshot.spiffe_id
        if self.protocol in CODECS:
            if not self._authorize(conn):
                return
            conn.result = "allowed"
            session = self._session(conn, lambda: self._connect(conn, state), None)
            await CODECS[self.protocol](reader, writer, session)
            return
        opened = await self._connect(conn, state)
        if opened is None:
            return
        up_reader, up_writer = opened
        try:
            if not self._authorize(conn):
                return
            conn.result = "allowed"
            await splice(reader, writer, up_reader, up_writer, conn, self._timeouts.idle)
        finally:
            await _close(up_writer)

    async def _connect(self, conn: Connection, state: TlsState) -> Upstream | None:
        """An mTLS connection to the next upstream whose SPIFFE ID is expected, or None."""
        start = next(self._next)  # round robin; fail over in list order from there
        upstreams = self.config.upstream
        opened: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for offset in range(len(upstreams)):
            address = upstreams[(start + offset) % len(upstreams)]
            conn.upstream = address
            host, port = split(address)
            try:
                opened = await asyncio.wait_for(
                    asyncio.open_connection(
                        host,
                        port,
                        ssl=state.client,
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
        return opened


Listener = InboundListener | OutboundListener
