"""Moving bytes between two streams: the opaque splice both L4 and upgraded L7 connections use.

Owns ``splice`` (both directions, backpressure with ``drain``, idle timeout, half-close where
the far side is a plain socket), ``close_stream`` and ``set_nodelay``. It must not parse or
decide anything: it relays what it is given and counts bytes on the ``Connection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

from .filters.base import Connection

CHUNK = 64 * 1024  # bytes read at a time; with drain() this bounds memory per direction
DRAIN_BELOW = 64 * 1024  # asyncio's default high-water mark: below it drain() would not wait


class _EndOfStream(Exception):
    """One direction ended and the far side cannot be half-closed: close the connection."""


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def must_drain(writer: asyncio.StreamWriter) -> bool:
    """Whether ``drain`` would wait (or find the transport closing): callers on the request
    path ask first, and skip the coroutine when the buffer is small, as it nearly always is."""
    transport = writer.transport
    return transport.is_closing() or transport.get_write_buffer_size() >= DRAIN_BELOW


async def drain(writer: asyncio.StreamWriter, timeout: float) -> None:
    """Wait for ``writer``'s buffer to empty below the transport's high-water mark.

    Skips the wait (and ``wait_for``'s task and timer) when the buffer is already small, which
    is nearly always on the request path; a slow peer still gets the full backpressure.
    """
    if must_drain(writer):
        await asyncio.wait_for(writer.drain(), timeout)


class Deadline:
    """One timer per connection bounding whatever read or write its task awaits.

    ``asyncio.wait_for`` costs a task and a timer per call; this keeps one ``call_at`` handle
    and moves a deadline: pushing the deadline later (the usual case: every read re-arms
    ``now + idle``) costs an assignment, and the handle, when it fires early, re-arms itself at
    the current deadline. When the deadline passes while armed, the task is cancelled and
    ``expired`` turns the ``CancelledError`` into ``TimeoutError`` (see ``guard``).
    """

    def __init__(self, task: asyncio.Task[object] | asyncio.Task[None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        current = task or asyncio.current_task()
        assert current is not None
        self._task = current
        self._at: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    def arm(self, at: float) -> None:
        """Bound what the task awaits next by the loop time ``at``."""
        self._at = at
        handle = self._handle
        if handle is None or handle.when() > at:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(at, self._fire)

    def disarm(self) -> None:
        self._at = None

    def _fire(self) -> None:
        self._handle = None
        at = self._at
        if at is None:
            return
        if self._loop.time() < at:
            self._handle = self._loop.call_at(at, self._fire)
            return
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """After a ``CancelledError``: True when it was this deadline (not a real cancel)."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() == 0

    def close(self) -> None:
        self._at = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def close_stream(writer: asyncio.StreamWriter | None) -> None:
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
    """Relay a→b (counted as ``bytes_in``) and b→a (``bytes_out``) until both ends finish.

    One watchdog per connection enforces ``idle`` (no byte either way for that long), rather
    than a timeout around every read: ``asyncio.wait_for`` costs a task and a timer per call,
    which was the relay's largest Python-level cost under load.
    """
    last = [time.monotonic()]

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, inbound: bool) -> None:
        while True:
            data = await src.read(CHUNK)
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
            if must_drain(dst):  # backpressure: never buffer more than the peer takes
                await dst.drain()

    async def watchdog() -> None:
        while True:
            remaining = last[0] + idle - time.monotonic()
            if remaining <= 0:
                conn.error = conn.error or "idle_timeout"
                raise TimeoutError
            await asyncio.sleep(remaining)

    pumps = {
        asyncio.ensure_future(pump(a_reader, b_writer, True)),
        asyncio.ensure_future(pump(b_reader, a_writer, False)),
    }
    dog = asyncio.ensure_future(watchdog())
    everything: set[asyncio.Future[None]] = {*pumps, dog}
    try:
        pending = set(everything)
        while pending & pumps:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if dog in done or any(t.exception() is not None for t in done):
                break  # EOF toward TLS, reset, idle: end both directions
            # A half-close passed on to a plain socket: the other direction goes on.
    finally:
        for task in everything:
            task.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
