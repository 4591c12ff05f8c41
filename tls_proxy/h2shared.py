"""One upstream HTTP/2 connection shared by the streams of many downstream connections.

Owns ``SharedH2``: an h2 client connection an ``h2pool.H2Pool`` opened. Its reader task hands
each stream's events to the ``h2pool.StreamHandler`` that opened the stream (``http2``, for one
downstream stream); when the connection breaks it fails its own streams and no others. It is
imported when the first shared connection opens, with h2 (``h2pool`` has the reasons).

It must not open sockets nor read HTTP semantics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from .h2conn import client_connection
from .h2pool import Opened, StreamHandler
from .l7 import Header
from .relay import CHUNK, drain

if TYPE_CHECKING:
    from .h2pool import H2Pool

log = logging.getLogger(__name__)

_ProtocolErrors = (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError)


class SharedH2:
    """One upstream h2 client connection and the streams of any downstream ones it carries."""

    def __init__(self, pool: H2Pool, opened: Opened, tag: object, generation: int) -> None:
        self.pool = pool
        self.reader = opened.reader
        self.writer = opened.writer
        self.address = opened.address
        self.peer_id = opened.peer_id
        self.tag = tag
        self.generation = generation
        self.h2 = client_connection()
        self.handlers: dict[int, StreamHandler] = {}
        # True once the peer's SETTINGS (its stream limit) arrived; False if it never will.
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.goaway = False  # received: no new streams
        self.retired = False  # rotated or reloaded away from: no new streams
        self.closed = False
        self._idle: asyncio.TimerHandle | None = None
        self.flush()
        self.task: asyncio.Task[None] = asyncio.ensure_future(self._run())

    @property
    def usable(self) -> bool:
        """May take new streams (room aside)."""
        ready = self.ready.done() and self.ready.result()
        return ready and not (self.goaway or self.retired or self.closed)

    @property
    def load(self) -> tuple[int, int]:
        """Open streams and the peer's SETTINGS_MAX_CONCURRENT_STREAMS, as ``pick`` takes them."""
        return self.h2.open_outbound_streams, self.h2.remote_settings.max_concurrent_streams

    def open_stream(self, headers: list[Header], handler: StreamHandler) -> int | None:
        """Send ``headers`` on a new stream whose events go to ``handler``; None when the
        connection cannot take it (the peer's limit, or stream IDs used up)."""
        if not self.usable:
            return None
        try:
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, headers)
        except h2.exceptions.TooManyStreamsError:
            return None
        except h2.exceptions.NoAvailableStreamIDError:
            self.retire()  # 2^31 streams: RFC 9113 §5.1.1, a new connection is needed
            return None
        self.handlers[sid] = handler
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.flush()
        return sid

    def release(self, sid: int, reset: ErrorCodes | None = None) -> None:
        """The downstream side is done with stream ``sid``; ``reset`` it if not complete."""
        if self.handlers.pop(sid, None) is None:
            return
        if reset is not None:
            with contextlib.suppress(*_ProtocolErrors):
                self.h2.reset_stream(sid, reset)
        self.flush()
        self._settle()

    def retire(self) -> None:
        """No new streams from now on; closed once the streams it carries are done."""
        self.retired = True
        self._settle()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def close(self) -> None:
        """GOAWAY (nothing opened by the peer was processed) and close; the reader ends."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.writer.is_closing():
            return
        with contextlib.suppress(*_ProtocolErrors):
            self.h2.close_connection()
        self.flush()
        self.writer.close()

    def _settle(self) -> None:
        """Without streams: closed if it takes no new ones, else closed after idling."""
        if self.handlers or self.closed:
            return
        if self.goaway or self.retired:
            self.close()
        elif self._idle is None and self.ready.done():
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(self.pool.idle_timeout, self.close)

    async def _run(self) -> None:
        try:
            while True:
                timeout = self.pool.read_timeout if self.handlers else None
                try:
                    data = await asyncio.wait_for(self.reader.read(CHUNK), timeout)
                except TimeoutError:
                    log.info(
                        "shared upstream connection idle with streams open; closing it",
                        extra={"upstream": self.address, "streams": len(self.handlers)},
                    )
                    break
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as err:
                    log.warning(
                        "HTTP/2 protocol error from the upstream",
                        extra={"upstream": self.address, "detail": str(err)},
                    )
                    break
                touched: dict[int, StreamHandler] = {}
                for event in events:
                    self._dispatch(event, touched)
                self.flush()
                for handler in touched.values():
                    handler.flush()
                await drain(self.writer, self.pool.read_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as err:
            log.info(
                "shared upstream connection failed",
                extra={"upstream": self.address, "detail": str(err)},
            )
        finally:
            self._lost()

    def _dispatch(self, event: h2.events.Event, touched: dict[int, StreamHandler]) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(True)
                self._settle()
            return
        everyone = isinstance(event, h2.events.ConnectionTerminated) or (
            isinstance(event, h2.events.WindowUpdated) and not event.stream_id
        )
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            if not self.ready.done():
                self.ready.set_result(False)
        if everyone:
            for key, handler in list(self.handlers.items()):
                touched[key] = handler
                handler.upstream_event(event)
            self._settle()
            return
        sid: int = getattr(event, "stream_id", None) or 0
        found = self.handlers.get(sid)
        if found is None:
            if isinstance(event, h2.events.DataReceived) and sid:
                with contextlib.suppress(*_ProtocolErrors):  # no one to hand it to: free it
                    self.h2.acknowledge_received_data(event.flow_controlled_length or 0, sid)
            return
        touched[sid] = found
        found.upstream_event(event)

    def _lost(self) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_result(False)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        handlers = list(self.handlers.values())
        self.handlers.clear()
        for handler in handlers:
            handler.upstream_lost()
        for handler in handlers:
            handler.flush()
        self.writer.close()
        self.pool.forget(self)
