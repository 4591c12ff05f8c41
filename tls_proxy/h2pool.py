"""Upstream HTTP/2 connections shared by the streams of many downstream connections.

Owns ``H2Pool``: per listener, the h2 connections to each upstream address, each opened under
a ``tag`` (outbound: the TLS state its peer was verified with, as for ``pool.UpstreamPool``)
and given new streams only while that tag is current, no reload has retired it, it has not
received a GOAWAY and its peer's SETTINGS_MAX_CONCURRENT_STREAMS leaves room; at most
``max_connections`` of them per address, idle ones closed after ``idle_timeout``. Each is an
``h2shared.SharedH2``, whose reader task hands each stream's events to the ``StreamHandler``
that opened the stream. A GOAWAY is passed to every stream, which decides by ``after_goaway``
whether it finishes there, is sent again elsewhere or fails. ``pick`` (where a new stream
goes) and ``after_goaway`` are pure. Every listener has a pool, so this module does not import
h2: ``h2shared`` does, when the first connection opens (a sidecar that never sees HTTP/2 does
not carry it).

It must not open sockets (the listener's open function connects, verifies the peer and checks
ALPN), read HTTP semantics nor decide policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from .errors import ProxyError

if TYPE_CHECKING:  # h2 is imported with the first shared connection (h2shared)
    import h2.events

    from .h2shared import SharedH2

log = logging.getLogger(__name__)

# Opens one acquirer may start or wait for before it gives up: a connection that is full or
# gone the moment it is ready (a peer advertising 0 streams, a GOAWAY at once) is not chased.
ACQUIRE_ROUNDS = 3

Decision = Literal["use", "wait", "open", "full"]
Outcome = Literal["finish", "retry", "fail"]


class UpstreamBusy(ProxyError):
    """Every shared connection to the address is at its peer's stream limit and no more may be
    opened (``http.h2_max_connections``): the stream is refused, for the client to retry."""


def pick(
    load: Sequence[tuple[int, int]], *, opening: bool, max_connections: int
) -> tuple[Decision, int]:
    """Where a new stream goes, given the usable connections' ``(open streams, peer's limit)``
    oldest first: ``("use", i)`` the first with room, else ``("wait", -1)`` for a connection
    being opened, ``("open", -1)`` while fewer than ``max_connections`` exist, ``("full", -1)``.
    The oldest with room is filled first, so that the newer ones empty and close when idle."""
    for index, (streams, limit) in enumerate(load):
        if streams < limit:
            return "use", index
    if opening:
        return "wait", -1
    if len(load) < max_connections:
        return "open", -1
    return "full", -1


def after_goaway(stream_id: int, last_stream_id: int, *, body_sent: bool, retried: bool) -> Outcome:
    """What becomes of a stream when its connection receives GOAWAY (RFC 9113 §6.8).

    At or below ``last_stream_id`` the peer may have processed it: it ``finish``es there.
    Above, the peer did not and will not: it is sent again on another connection (``retry``),
    once, if no request body byte has left yet (the body is forwarded, and acknowledged to its
    sender, as it goes, so only then is the whole request still here); else it ``fail``s."""
    if stream_id <= last_stream_id:
        return "finish"
    if not body_sent and not retried:
        return "retry"
    return "fail"


class StreamHandler(Protocol):
    """The downstream end of one stream on a shared connection (``http2`` implements it)."""

    def upstream_event(self, event: h2.events.Event) -> None:
        """An event of this stream, a connection WINDOW_UPDATE, or the peer's GOAWAY."""

    def upstream_lost(self) -> None:
        """The connection broke; the stream is no longer registered on it."""

    def flush(self) -> None:
        """Write out what the events above queued toward the stream's own client."""


@dataclass(frozen=True)
class Opened:
    """A connection the listener opened (and, outbound, verified) for the pool."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: str  # where it went: the access log's ``upstream``
    peer_id: str | None  # the verified SPIFFE ID of the far side (outbound); None to the app


Opener = Callable[[], Awaitable[Opened | None]]


class H2Pool:
    """The shared upstream h2 connections of one listener, by upstream address."""

    def __init__(
        self, max_connections: int, idle_timeout: float, read_timeout: float, ready_timeout: float
    ) -> None:
        self._by_address: dict[str, list[SharedH2]] = {}
        # Opens under way: (tag, address, task). Tags are compared by identity, not hashed.
        self._opening: list[tuple[object, str, asyncio.Task[SharedH2 | None]]] = []
        self._generation = 0
        self.opened = 0  # connections opened (for tests)
        self.configure(max_connections, idle_timeout, read_timeout, ready_timeout)

    def configure(
        self, max_connections: int, idle_timeout: float, read_timeout: float, ready_timeout: float
    ) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout  # seconds a connection without streams stays open
        self.read_timeout = read_timeout  # seconds without a byte while streams are open
        self.ready_timeout = ready_timeout  # seconds from connected to the peer's SETTINGS

    def all(self) -> list[SharedH2]:
        """Every open connection, usable or not."""
        return [c for conns in self._by_address.values() for c in conns]

    @property
    def connections(self) -> int:
        return sum(len(conns) for conns in self._by_address.values())

    @property
    def streams(self) -> int:
        return sum(len(c.handlers) for conns in self._by_address.values() for c in conns)

    async def acquire(self, tag: object, address: str, open_: Opener) -> SharedH2 | None:
        """A connection to ``address`` opened under ``tag`` with room for one more stream,
        opened with ``open_`` when none has; None when that fails. Raises ``UpstreamBusy`` when
        ``max_connections`` are full. Call ``open_stream`` on it before awaiting anything."""
        for _ in range(ACQUIRE_ROUNDS):
            conns = self._current(tag, address)
            task = self._opening_task(tag, address)
            decision, index = pick(
                [c.load for c in conns],
                opening=task is not None,
                max_connections=self.max_connections,
            )
            if decision == "use":
                return conns[index]
            if decision == "full":
                raise UpstreamBusy(
                    f"{len(conns)} connections to {address} at their peer's stream limit"
                )
            if task is None:
                task = asyncio.ensure_future(self._open(tag, address, open_))
                self._opening.append((tag, address, task))
            shared = await asyncio.shield(task)  # one client leaving does not stop the open
            if shared is None:
                return None
            if shared.usable and shared.load[0] < shared.load[1]:
                return shared  # (outbound may have failed over to another address)
        return None

    def retire_all(self) -> None:
        """A reload or drain: no connection open now takes new streams; idle ones close now,
        busy ones when their streams are done."""
        self._generation += 1
        for conns in list(self._by_address.values()):
            for conn in list(conns):
                conn.retire()

    async def close(self) -> None:
        """Close every connection now and fail their streams (the end of a drain)."""
        self.retire_all()
        tasks: list[asyncio.Future[object]] = []
        for _, _, task in self._opening:
            task.cancel()
            tasks.append(task)  # type: ignore[arg-type]
        for conns in list(self._by_address.values()):
            for conn in conns:
                conn.task.cancel()
                conn.writer.close()
                tasks.append(conn.task)  # type: ignore[arg-type]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _current(self, tag: object, address: str) -> list[SharedH2]:
        """The usable connections to ``address``; those of another tag or an earlier
        generation are retired on the way (closed if idle)."""
        conns = self._by_address.get(address, [])
        for conn in list(conns):
            if conn.tag is not tag or conn.generation != self._generation:
                conn.retire()
        return [c for c in conns if c.usable]

    def _opening_task(self, tag: object, address: str) -> asyncio.Task[SharedH2 | None] | None:
        return next((t for g, a, t in self._opening if g is tag and a == address), None)

    async def _open(self, tag: object, address: str, open_: Opener) -> SharedH2 | None:
        try:
            opened = await open_()
            if opened is None:
                return None
            from .h2shared import SharedH2  # noqa: PLC0415  h2 only once a connection opens

            shared = SharedH2(self, opened, tag, self._generation)
            try:
                ready = await asyncio.wait_for(asyncio.shield(shared.ready), self.ready_timeout)
            except TimeoutError:
                ready = False
            if not ready:
                log.warning("upstream sent no HTTP/2 SETTINGS", extra={"upstream": shared.address})
                shared.writer.close()
                await asyncio.gather(shared.task, return_exceptions=True)
                return None
            self._by_address.setdefault(shared.address, []).append(shared)
            self.opened += 1
            return shared
        finally:
            self._opening = [e for e in self._opening if not (e[0] is tag and e[1] == address)]

    def forget(self, conn: SharedH2) -> None:
        conns = self._by_address.get(conn.address, [])
        if conn in conns:
            conns.remove(conn)
        if not conns:
            self._by_address.pop(conn.address, None)
