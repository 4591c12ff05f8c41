"""Idle upstream connections kept for reuse across downstream connections (HTTP/1.1).

Owns ``UpstreamPool``: per listener, the upstream connections whose last exchange ended
cleanly, most recently used first, each closed after ``idle_timeout`` seconds unused, at
most ``max_idle`` of them. A connection is handed out again only if nothing has happened on
it while idle (no byte, no EOF, no error: an app that closed it, or sent a stray ``408``,
makes it unusable), only to the same address when the listener asks for one (transparent
listeners), and only under the same ``tag`` it was opened with: outbound, the TLS
state (our SVID and the bundles its peer was verified against) at that time, so nothing
opened under an identity that has since rotated is reused. The listener decides the tag and
records the peer; the codec decides when a connection is reusable (both directions of its
last exchange complete). It must not open connections nor read HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pooled:
    """One upstream connection and what the listener knows about it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: str  # where it goes, for the access log
    peer_id: str | None  # the verified SPIFFE ID of the far side (outbound); None to the app
    tag: object  # what it was opened under (outbound: the TlsState); reused only under it


def idle_and_intact(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Nothing arrived while idle: no byte, no EOF, no error, and the transport is open.

    Checked twice per request (check-in and check-out), so it reads the reader's fields
    rather than calling ``at_eof()`` and ``exception()``. StreamReader has no public peek; a
    byte in its buffer is an answer to no request (a 408 before closing, say) and would be
    read as the next request's response."""
    return not (
        writer.transport.is_closing()
        or reader._eof  # type: ignore[attr-defined]
        or reader._exception is not None  # type: ignore[attr-defined]
        or reader._buffer  # type: ignore[attr-defined]
    )


class UpstreamPool:
    """Idle connections of one listener, LIFO, bounded in number and idle time.

    Checking a connection in and out happens once per request, so neither costs a timer: an
    entry carries the loop time it expires at, and one timer per pool (armed for the oldest
    entry while any is idle) closes the expired ones.
    """

    def __init__(self, max_idle: int, idle_timeout: float) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: list[tuple[Pooled, float]] = []  # oldest first: (entry, expiry)
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self.reused = 0  # connections handed out again (for tests and /metrics)

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, tag: object, address: str | None = None) -> Pooled | None:
        """The most recently returned usable connection opened under ``tag`` (and, when
        ``address`` is given, going there: a transparent listener's connections each go to
        their own original destination), or None. Connections of another tag, or no longer
        intact, are closed on the way; those to another address are kept."""
        kept: list[tuple[Pooled, float]] = []
        found: Pooled | None = None
        while self._idle:
            item = self._idle.pop()
            entry = item[0]
            if address is not None and entry.address != address:
                kept.append(item)
                continue
            if entry.tag is tag and idle_and_intact(entry.reader, entry.writer):
                self.reused += 1
                found = entry
                break
            entry.writer.close()  # rotated away from, or closed/used by the far side
        if kept:
            self._idle.extend(reversed(kept))
        return found

    def put(self, entry: Pooled) -> None:
        """Keep ``entry`` for reuse (closed instead when the pool is full, closed or it is no
        longer intact)."""
        if (
            self._closed
            or len(self._idle) >= self.max_idle
            or not idle_and_intact(entry.reader, entry.writer)
        ):
            entry.writer.close()
            return
        loop = asyncio.get_running_loop()
        expiry = loop.time() + self.idle_timeout
        self._idle.append((entry, expiry))
        if self._sweep is None:
            self._sweep = loop.call_at(expiry, self._expire)

    def _expire(self) -> None:
        """Close the connections idle for ``idle_timeout``; re-arm for the next to expire."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        live = [(entry, expiry) for entry, expiry in self._idle if expiry > now]
        for entry, expiry in self._idle:
            if expiry <= now:
                entry.writer.close()
        self._idle = live
        if live:
            self._sweep = asyncio.get_running_loop().call_at(
                min(expiry for _, expiry in live), self._expire
            )

    def close(self) -> None:
        """Close every idle connection and keep none from now on (drain)."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for entry, _ in self._idle:
            entry.writer.close()
        self._idle.clear()
