"""L4 listeners: inbound mTLS → plain loopback app, outbound plain loopback → mTLS upstream.

Owns accepting, the TLS handshake (with a fresh context from ``TlsContexts`` per connection, so
rotation takes effect at the next handshake), SPIFFE authentication (``spiffe_verify``), running
the connection filter chain, and splicing bytes both ways with TCP_NODELAY, backpressure
(``drain``), idle and handshake timeouts and half-close where the transport allows it. It also
owns graceful drain: stop accepting, wait for in-flight connections up to a grace, then close.

It must not decide policy (the ``authz`` filter asks ``authz``) nor know which filters exist:
new filters and the HTTP codec slot in through the chain and ``protocol``, not here.

Half-close: an EOF is passed on as a FIN where the far side is a plain socket, and the other
direction goes on. asyncio cannot half-close a TLS stream (``can_write_eof`` is False, and a
received close_notify shuts the TLS side down), so an EOF toward a TLS side ends the connection
both ways once the data before it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime

from .config import SUPPORTED_PROTOCOLS, InboundConfig, OutboundConfig, TimeoutsConfig
from .config import split_address as split
from .errors import ConfigError, PeerRejected, RejectReason
from .filters.base import Connection, FilterChain
from .spiffe_verify import verify_peer
from .tls import TlsContexts, classify_ssl_error, peer_chain_der

log = logging.getLogger(__name__)

CHUNK = 64 * 1024  # bytes read at a time; with drain() this bounds memory per direction
Clock = Callable[[], datetime]


def check_protocol(name: str, protocol: str) -> None:
    """Refuse protocols whose codec has not landed yet, before anything binds."""
    if protocol not in SUPPORTED_PROTOCOLS:
        raise ConfigError(
            f"listener {name!r}: not yet supported: protocol {protocol} "
            "(lands with the HTTP codec); use protocol: tcp"
        )


class _EndOfStream(Exception):
    """One direction ended and the far side cannot be half-closed: close the connection."""


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    conn: Connection,
    idle: float,
) -> None:
    """Relay a→b (counted as ``bytes_in``) and b→a (``bytes_out``) until both ends finish."""
    last = [time.monotonic()]

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, inbound: bool) -> None:
        while True:
            try:
                data = await asyncio.wait_for(src.read(CHUNK), idle)
            except TimeoutError:
                if time.monotonic() - last[0] < idle:
                    continue  # the other direction is busy: not idle
                conn.error = conn.error or "idle_timeout"
                raise
            if not data:
                if not dst.can_write_eof():
                    raise _EndOfStream  # TLS cannot carry a half-close: end both directions
                with contextlib.suppress(OSError):
                    dst.write_eof()
                return
            last[0] = time.monotonic()
            if inbound:
                conn.bytes_in += len(data)
            else:
                conn.bytes_out += len(data)
            dst.write(data)
            await dst.drain()  # backpressure: never buffer more than the peer takes

    tasks = [
        asyncio.ensure_future(pump(a_reader, b_writer, True)),
        asyncio.ensure_future(pump(b_reader, a_writer, False)),
    ]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:  # EOF toward TLS, reset, idle: end both ways
                    for other in pending:
                        other.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    pending = set()
                    break
                # A half-close passed on to a plain socket: the other direction goes on.
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
    ) -> None:
        self.name = name
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
    ) -> None:
        check_protocol(config.name, config.protocol)
        super().__init__(config.name, config.listen, tls, chain, timeouts, clock)
        self.config = config

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
        host, port = split(self.config.forward)
        conn.upstream = self.config.forward
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self._timeouts.connect
            )
        except (OSError, TimeoutError) as err:
            conn.error = "forward_unreachable"
            conn.detail = str(err)
            log.warning(
                "local app unreachable", extra={"listener": self.name, "forward": conn.upstream}
            )
            return
        try:
            _nodelay(up_writer)
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
    ) -> None:
        check_protocol(config.name, config.protocol)
        super().__init__(config.name, config.listen, tls, chain, timeouts, clock)
        self.config = config
        self._next = itertools.cycle(range(len(config.upstream)))
        self._expect = frozenset(config.expect_ids)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> None:
        state = self._tls.current()
        conn.local_id = state.snapshot.spiffe_id
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
                return
            except (OSError, TimeoutError) as err:
                log.warning(
                    "upstream unreachable, trying the next",
                    extra={"listener": self.name, "upstream": address, "error": str(err)},
                )
        if opened is None:
            conn.error = "no_upstream"
            conn.detail = f"none of {list(upstreams)} answered"
            return
        up_reader, up_writer = opened
        try:
            _nodelay(up_writer)
            chain = peer_chain_der(up_writer.get_extra_info("ssl_object"))
            try:
                peer = verify_peer(
                    chain, state.snapshot.bundles, now=self._clock(), expect_ids=self._expect
                )
            except PeerRejected as err:
                self._rejected(conn, err.reason, err.detail)
                return
            conn.peer_id = str(peer)
            if not self._authorize(conn):
                return
            conn.result = "allowed"
            await splice(reader, writer, up_reader, up_writer, conn, self._timeouts.idle)
        finally:
            await _close(up_writer)


Listener = InboundListener | OutboundListener
