"""The HTTP/2 codec: h2 on both sides of a proxied connection, streams multiplexed.

Owns driving the h2 server state machine toward whoever connected to us over asyncio streams,
and each admitted stream's twin on an upstream connection shared with other downstream
connections (``h2pool``: the connection, its reader and its limits are the pool's; each
``_Stream`` is the ``h2pool.StreamHandler`` of its twin). Per stream: check the request
(``l7.check_fields``; h2 itself validates pseudo-headers and refuses connection-specific
fields, RFC 9113 §8.2), normalize ``:path`` (``path.normalize_path``) before the request
filters see it, forward exactly that path with identity headers rewritten, relay DATA and
trailers both ways, and propagate RST_STREAM both ways. Flow control: DATA is acknowledged to
its sender only when it has been handed to the other side's connection, so what is buffered is
bounded by the windows we advertise. Writes toward the upstreams wait for ``drain``; toward our
client, a stream's response waits (unacknowledged) while the client's transport is congested,
so a shared connection's reader never waits for one slow client. A stream the upstream refused
by GOAWAY before a byte of its body left is sent again on another connection
(``h2pool.after_goaway``). A denied or refused stream is answered on that stream alone (gRPC
requests in gRPC's Trailers-Only form, ``grpc-status``, not an HTTP status). On drain or an
idle timeout a GOAWAY is sent and streams in flight finish. When our client leaves, its streams
are reset upstream; other clients' streams on the same shared connections carry on.

It must not parse HTTP/2 itself (h2 does), decide policy (request filters do) nor know which
listener it serves: ``HttpSession`` carries what differs between inbound and outbound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from .h2conn import server_connection
from .h2pool import UpstreamBusy, after_goaway
from .h2shared import SharedH2
from .l7 import (
    XFCC_HEADER,
    Exchange,
    Header,
    HttpRejected,
    HttpSession,
    LocalResponse,
    RequestHead,
    authz_headers,
    check_fields,
)
from .path import PathError, normalize_path
from .relay import CHUNK, DRAIN_BELOW, drain

log = logging.getLogger(__name__)

MAX_CONCURRENT_STREAMS = 128  # per downstream connection (nginx's http2_max_concurrent_streams)
GRPC_CONTENT_TYPE = b"application/grpc"
# gRPC's mapping of HTTP statuses (grpc/doc/http-grpc-status-mapping.md) for our own answers.
_GRPC_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
GRPC_UNKNOWN = 2

_ProtocolErrors = (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError)


class _Closed(Exception):
    """The downstream connection broke HTTP/2; a GOAWAY has been queued."""


def grpc_status(http_status: int) -> int:
    """The gRPC status code our own HTTP answer ``http_status`` means to a gRPC client."""
    return _GRPC_STATUS.get(http_status, GRPC_UNKNOWN)


def grpc_message(text: str) -> bytes:
    """``grpc-message``: percent-encoded outside printable ASCII and ``%`` (gRPC over HTTP2)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += f"%{byte:02X}".encode()
    return bytes(out)


def local_headers(answer: LocalResponse, *, grpc: bool) -> tuple[list[Header], bytes]:
    """Response headers and body of one of our answers: gRPC's Trailers-Only form (status 200,
    ``grpc-status``, no body) for a gRPC request, a plain-text response otherwise."""
    if grpc:
        message = answer.body.decode("latin-1") or HTTPStatus(answer.status).phrase
        return [
            (b":status", b"200"),
            (b"content-type", GRPC_CONTENT_TYPE),
            (b"grpc-status", str(grpc_status(answer.status)).encode()),
            (b"grpc-message", grpc_message(message)),
            *answer.headers,
        ], b""
    return [
        (b":status", str(answer.status).encode()),
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(answer.body)).encode()),
        *answer.headers,
    ], answer.body


@dataclass(eq=False)
class _Stream:
    """One downstream stream and, once admitted, its upstream twin on a shared connection;
    the ``h2pool.StreamHandler`` of that twin."""

    owner: _Http2
    down_id: int
    ex: Exchange
    grpc: bool = False
    forwarded: list[Header] = field(default_factory=list)  # the request head as sent upstream
    up: SharedH2 | None = None
    up_id: int = 0
    body_sent: bool = False  # a request body byte went upstream: it cannot be sent again
    retried: bool = False
    to_up: bytearray = field(default_factory=bytearray)
    up_trailers: list[Header] | None = None
    request_ended: bool = False  # the client's END_STREAM (or reset) has arrived
    up_end_sent: bool = False
    to_down: bytearray = field(default_factory=bytearray)
    down_trailers: list[Header] | None = None
    response_ended: bool = False  # the upstream's END_STREAM (or our answer) is queued
    responded: bool = False  # response headers sent downstream
    down_end_sent: bool = False
    local: bool = False  # answered by us: the request body is discarded
    finished: bool = False

    def upstream_event(self, event: h2.events.Event) -> None:
        self.owner._on_up_event(self, event)

    def upstream_lost(self) -> None:
        self.owner._upstream_lost(self)

    def flush(self) -> None:
        self.owner._flush()


async def serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: HttpSession
) -> None:
    """Serve HTTP/2 streams on an accepted, authenticated connection until it ends."""
    await _Http2(reader, writer, session).run()


class _Http2:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: HttpSession
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.s = session
        self.conn = session.conn
        self.down = server_connection(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: session.settings.max_header_bytes,
            }
        )
        self.streams: dict[int, _Stream] = {}
        self.dirty: set[SharedH2] = set()  # shared connections with frames of ours to flush
        self.tasks: set[asyncio.Future[None]] = set()
        self.resuming = False  # a task waits for our client's transport to drain
        self.closing = False  # GOAWAY sent or received: no new streams; end when none is left

    # -- the downstream connection --------------------------------------------------------

    async def run(self) -> None:
        watcher: asyncio.Future[None] | None = None
        if self.s.draining is not None:
            watcher = asyncio.ensure_future(self._watch_drain(self.s.draining))
        try:
            self._flush()
            if self.s.prefix:
                await self._receive_down(self.s.prefix)
            while not (self.closing and not self.streams):
                timeout = self.s.idle if self.streams else self.s.settings.keepalive_timeout
                try:
                    data = await asyncio.wait_for(self.reader.read(CHUNK), timeout)
                except TimeoutError:
                    if self.streams:
                        self.conn.error = self.conn.error or "idle_timeout"
                    self._goaway(ErrorCodes.NO_ERROR)
                    break
                if not data:
                    break
                await self._receive_down(data)
        except _Closed:
            pass
        finally:
            if not self.closing:
                self._goaway(ErrorCodes.NO_ERROR)  # drained (cancelled) or the client left
            await self._cleanup(watcher)

    async def _watch_drain(self, draining: asyncio.Event) -> None:
        await draining.wait()
        self._goaway(ErrorCodes.NO_ERROR)
        if not self.streams:
            self.writer.close()  # the reader sees EOF and run() ends

    def _goaway(self, code: ErrorCodes) -> None:
        self.closing = True
        with contextlib.suppress(*_ProtocolErrors):
            self.down.close_connection(error_code=code)
        self._flush()

    async def _cleanup(self, watcher: asyncio.Future[None] | None) -> None:
        """Our client is gone: its streams are reset upstream, where other clients' streams
        on the same shared connections carry on."""
        pending = list(self.tasks)
        if watcher is not None:
            pending.append(watcher)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in list(self.streams.values()):
            stream.ex.error = stream.ex.error or "connection_closed"
            self._finish(stream)
        self._flush()

    async def _receive_down(self, data: bytes) -> None:
        self.conn.bytes_in += len(data)
        try:
            events = self.down.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            log.info(
                "HTTP/2 protocol error from the client",
                extra={**self._fields(), "detail": str(err)},
            )
            self.conn.error = self.conn.error or "h2_protocol_error"
            self._goaway(ErrorCodes.PROTOCOL_ERROR)
            raise _Closed from err
        for event in events:
            self._on_down_event(event)
        self._flush()
        await self._drain()

    def _on_down_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None and event.headers is not None
            self._open_stream(event.stream_id, list(event.headers))
            return
        if isinstance(event, h2.events.WindowUpdated):
            for stream in self._streams_of(self.streams, event.stream_id):
                self._pump_down(stream)
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self.closing = True
            return
        sid = getattr(event, "stream_id", None)
        found = self.streams.get(sid) if sid is not None else None
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            length = event.flow_controlled_length or 0
            if found is None or found.local:
                self._ack(self.down, event.stream_id, length)  # not forwarded: free the window
                return
            self._ack(self.down, event.stream_id, length - len(event.data))  # padding
            found.to_up += event.data
            found.ex.bytes_in += len(event.data)
            self._pump_up(found)
            return
        if found is None:
            return
        stream = found
        if isinstance(event, h2.events.TrailersReceived):
            stream.up_trailers = list(event.headers or ())
        elif isinstance(event, h2.events.StreamEnded):
            stream.request_ended = True
            self._pump_up(stream)
            self._maybe_finish(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream.ex.error = stream.ex.error or "client_reset"
            stream.request_ended = True
            self._finish(stream, ErrorCodes(event.error_code or ErrorCodes.CANCEL))

    # -- one stream -----------------------------------------------------------------------

    def _open_stream(self, sid: int, headers: list[Header]) -> None:
        stream = _Stream(self, sid, Exchange())
        self.streams[sid] = stream
        stream.grpc = any(
            n == b"content-type" and v.startswith(GRPC_CONTENT_TYPE) for n, v in headers
        )
        try:
            head, forwarded = self._check(headers, stream.ex)
        except HttpRejected as err:
            stream.ex.result, stream.ex.error, stream.ex.detail = "rejected", err.reason, err.detail
            log.info(
                "request refused",
                extra={**self._fields(), "status": err.status, "reason": err.reason,
                       "detail": err.detail},
            )  # fmt: skip
            self._answer(stream, LocalResponse(err.status, HTTPStatus(err.status).phrase.encode()))
            return
        if self.closing:
            self._reset(stream, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: retry elsewhere
            return
        stream.forwarded = forwarded
        self._spawn(self._admit(stream, head))

    def _check(self, headers: list[Header], ex: Exchange) -> tuple[RequestHead, list[Header]]:
        """The request as filters see it and as it is forwarded; raises ``HttpRejected``."""
        settings = self.s.settings
        pseudo = {n: v for n, v in headers if n.startswith(b":")}
        regular = [(n, v) for n, v in headers if not n.startswith(b":")]
        method = pseudo.get(b":method", b"").decode("latin-1")
        authority = pseudo.get(b":authority")
        host_field = next((v for n, v in regular if n == b"host"), None)
        host = (authority or host_field or b"").decode("latin-1") or None
        raw_target = pseudo.get(b":path", b"").decode("latin-1")
        ex.method, ex.host, ex.path = method, host, raw_target[:200]
        check_fields(regular, settings.max_headers)
        if method == "CONNECT":
            raise HttpRejected(501, "connect_unsupported", "CONNECT over HTTP/2 is not proxied")
        try:
            target = normalize_path(raw_target, encoded_slashes=settings.encoded_slashes)
        except PathError as err:
            raise HttpRejected(400, "invalid_path", str(err)) from err
        path = target.partition("?")[0]
        ex.path = path
        if self.s.xfcc is not None:
            strip = {h.encode("latin-1") for h in settings.identity_headers}
            regular = [(n, v) for n, v in regular if n not in strip]
            regular.append((XFCC_HEADER, self.s.xfcc))
        forwarded = [
            (n, target.encode("ascii") if n == b":path" else v)
            for n, v in headers
            if n.startswith(b":")
        ] + regular
        seen = regular
        if host_field is None and host is not None:
            seen = [(b"host", host.encode("latin-1")), *regular]  # policy's ``host``, as HTTP/1.1
        return RequestHead(method, target, path, host, authz_headers(seen)), forwarded

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(self._guard(work))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except (OSError, ssl.SSLError, TimeoutError) as err:
            log.info("stream failed", extra={**self._fields(), "detail": str(err)})
            self.writer.close()  # a transport broke or stalled: end the connection

    async def _admit(self, stream: _Stream, head: RequestHead) -> None:
        """Run the request filters, then open the upstream stream (or answer here)."""
        answer = await self.s.chain.on_request(self.conn, head, stream.ex)
        if stream.finished:
            return
        if answer is not None:
            stream.ex.result = "denied"
            self._answer(stream, answer)
            self._flush()
            return
        await self._send_upstream(stream)

    async def _send_upstream(self, stream: _Stream) -> None:
        """Open ``stream``'s twin on a shared upstream connection (or answer it here)."""
        assert self.s.h2_upstream is not None
        if stream.finished:
            return  # the client reset it while it waited (a retry after a GOAWAY)
        try:
            up = await self.s.h2_upstream()
        except UpstreamBusy as err:
            stream.ex.detail = str(err)
            self._reset(stream, ErrorCodes.REFUSED_STREAM)  # every connection full: retry later
            self._flush()
            return
        if stream.finished:
            return
        up_id = None if up is None else up.open_stream(stream.forwarded, stream)
        if up is None or up_id is None:
            stream.ex.error = "upstream_failed"
            stream.ex.detail = self.conn.detail or "upstream unreachable"
            log.warning("upstream failed", extra={**self._fields(), "detail": stream.ex.detail})
            self._answer(stream, LocalResponse(502, b"Bad Gateway"))
            self._flush()
            return
        stream.up, stream.up_id = up, up_id
        stream.ex.result = "allowed"
        self._pump_up(stream)
        self._flush()
        await self._drain()

    def _answer(self, stream: _Stream, answer: LocalResponse) -> None:
        """Answer ``stream`` ourselves; its request body is acknowledged and dropped."""
        headers, body = local_headers(answer, grpc=stream.grpc)
        stream.ex.status = answer.status
        stream.local = True
        self._ack(self.down, stream.down_id, len(stream.to_up))
        stream.to_up.clear()
        try:
            self.down.send_headers(stream.down_id, headers, end_stream=not body)
        except _ProtocolErrors:
            self._finish(stream)
            return
        stream.responded = True
        stream.down_end_sent = not body
        stream.to_down += body
        stream.response_ended = True
        self._pump_down(stream)
        self._maybe_finish(stream)

    def _reset(self, stream: _Stream, code: ErrorCodes) -> None:
        with contextlib.suppress(*_ProtocolErrors):
            self.down.reset_stream(stream.down_id, code)
        stream.ex.error = stream.ex.error or f"reset_{code.name.lower()}"
        stream.request_ended = True
        self._finish(stream)

    def _pump_up(self, stream: _Stream) -> None:
        """Request DATA (then trailers or END_STREAM) toward the upstream, as windows allow."""
        up = stream.up
        if up is None or stream.finished:
            return
        self.dirty.add(up)
        try:
            sent = _send_window(up.h2, stream.up_id, stream.to_up)
            stream.body_sent = stream.body_sent or sent > 0
            if not stream.to_up and stream.request_ended and not stream.up_end_sent:
                if stream.up_trailers:
                    up.h2.send_headers(stream.up_id, stream.up_trailers, end_stream=True)
                else:
                    up.h2.end_stream(stream.up_id)
                stream.up_end_sent = True
        except _ProtocolErrors:
            sent = len(stream.to_up)  # the upstream stream is gone: drop what it cannot take
            stream.to_up.clear()
        self._ack(self.down, stream.down_id, sent)

    def _pump_down(self, stream: _Stream) -> None:
        """Response DATA (then trailers or END_STREAM) toward the client, as windows allow."""
        if stream.down_end_sent or stream.finished:
            return
        if self.writer.transport.get_write_buffer_size() >= DRAIN_BELOW:
            self._resume_later()  # our client reads slowly: the rest waits, unacknowledged
            return
        try:
            sent = _send_window(self.down, stream.down_id, stream.to_down)
            if not stream.to_down and stream.response_ended:
                if stream.down_trailers:
                    self.down.send_headers(stream.down_id, stream.down_trailers, end_stream=True)
                else:
                    self.down.end_stream(stream.down_id)
                stream.down_end_sent = True
        except _ProtocolErrors:
            sent = len(stream.to_down)
            stream.to_down.clear()
        if stream.up is not None and sent:
            self._ack(stream.up.h2, stream.up_id, sent)
            self.dirty.add(stream.up)
        self._maybe_finish(stream)

    def _resume_later(self) -> None:
        if not self.resuming:
            self.resuming = True
            self._spawn(self._resume())

    async def _resume(self) -> None:
        """Once our client's transport has drained, send what waited for it."""
        try:
            await drain(self.writer, self.s.idle)
        finally:
            self.resuming = False
        for stream in list(self.streams.values()):
            self._pump_down(stream)
        self._flush()

    def _maybe_finish(self, stream: _Stream) -> None:
        if not stream.down_end_sent:
            return
        if stream.local and not stream.request_ended:
            # Our answer is complete and the body will not be read: RFC 9113 §8.1.
            with contextlib.suppress(*_ProtocolErrors):
                self.down.reset_stream(stream.down_id, ErrorCodes.NO_ERROR)
            stream.request_ended = True
        if stream.request_ended:
            self._finish(stream)

    def _finish(self, stream: _Stream, reset: ErrorCodes = ErrorCodes.CANCEL) -> None:
        if stream.finished:
            return
        stream.finished = True
        self.streams.pop(stream.down_id, None)
        if stream.up is not None:
            complete = stream.up_end_sent and stream.response_ended
            stream.up.release(stream.up_id, None if complete else reset)  # others' stay
            stream.up = None
        self.conn.requests += 1
        self.s.chain.on_request_end(self.conn, stream.ex)
        if self.closing and not self.streams:
            self._flush()  # the last stream's end, queued just now, goes out first
            self.writer.close()  # GOAWAY sent and nothing left: end the connection

    # -- the stream's twin on a shared upstream connection -------------------------------

    def _upstream_lost(self, stream: _Stream) -> None:
        """The shared connection broke: the stream fails (502 if nothing was sent yet)."""
        stream.ex.error = stream.ex.error or "upstream_closed"
        stream.up = None
        if not stream.responded:
            self._answer(stream, LocalResponse(502, b"Bad Gateway"))
        else:
            self._reset(stream, ErrorCodes.INTERNAL_ERROR)

    def _upstream_goaway(self, stream: _Stream, last_stream_id: int) -> None:
        up = stream.up
        assert up is not None
        outcome = after_goaway(
            stream.up_id, last_stream_id, body_sent=stream.body_sent, retried=stream.retried
        )
        if outcome == "finish":
            return
        up.release(stream.up_id, ErrorCodes.CANCEL)  # never processed by the peer
        stream.up = None
        if outcome == "retry":
            stream.retried = True
            stream.up_end_sent = False
            self._spawn(self._send_upstream(stream))
            return
        stream.ex.error = stream.ex.error or "upstream_goaway"
        stream.ex.detail = "refused by GOAWAY after its body was sent"
        self._answer(stream, LocalResponse(502, b"Bad Gateway"))

    def _on_up_event(self, stream: _Stream, event: h2.events.Event) -> None:
        """An event of ``stream``'s twin (or of its whole connection) from the shared reader."""
        up = stream.up
        if up is None or stream.finished:
            return
        if isinstance(event, h2.events.WindowUpdated):
            self._pump_up(stream)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._upstream_goaway(stream, event.last_stream_id or 0)
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            self._ack(up.h2, event.stream_id, (event.flow_controlled_length or 0) - len(event.data))
            stream.to_down += event.data
            stream.ex.bytes_out += len(event.data)
            self._pump_down(stream)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            with contextlib.suppress(*_ProtocolErrors):
                self.down.send_headers(stream.down_id, list(event.headers or ()))
        elif isinstance(event, h2.events.ResponseReceived):
            headers: list[Header] = list(event.headers or ())
            status = next((v for n, v in headers if n == b":status"), b"0")
            stream.ex.status = int(status) if status.isdigit() else None
            ended = event.stream_ended is not None  # Trailers-Only: one HEADERS frame
            try:
                self.down.send_headers(stream.down_id, headers, end_stream=ended)
            except _ProtocolErrors:
                self._reset(stream, ErrorCodes.CANCEL)
                return
            stream.responded = True
            if ended:
                stream.response_ended = stream.down_end_sent = True
                self._maybe_finish(stream)
        elif isinstance(event, h2.events.TrailersReceived):
            stream.down_trailers = list(event.headers or ())
        elif isinstance(event, h2.events.StreamEnded):
            stream.response_ended = True
            self._pump_down(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream.ex.error = stream.ex.error or "upstream_reset"
            up.release(stream.up_id)  # closed by the peer: nothing to reset
            stream.up = None
            self._reset(stream, ErrorCodes(event.error_code or ErrorCodes.CANCEL))

    # -- plumbing -------------------------------------------------------------------------

    @staticmethod
    def _streams_of(streams: dict[int, _Stream], sid: int | None) -> list[_Stream]:
        if not sid:
            return list(streams.values())  # a connection window update: every stream may go
        stream = streams.get(sid)
        return [stream] if stream is not None else []

    @staticmethod
    def _ack(conn: h2.connection.H2Connection, sid: int, length: int) -> None:
        if length > 0:
            with contextlib.suppress(*_ProtocolErrors):
                conn.acknowledge_received_data(length, sid)

    def _flush(self) -> None:
        data = self.down.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
            self.conn.bytes_out += len(data)
        dirty, self.dirty = self.dirty, set()
        for up in dirty:
            up.flush()

    async def _drain(self) -> None:
        """Backpressure: wait until our client's transport and the shared upstream ones our
        streams use took what was written."""
        writers = {self.writer, *(s.up.writer for s in self.streams.values() if s.up)}
        for writer in writers:
            if not writer.is_closing():
                await drain(writer, self.s.idle)

    def _fields(self) -> dict[str, object]:
        return {
            "listener": self.conn.listener,
            "direction": self.conn.direction,
            "source": self.conn.source,
            "peer_id": self.conn.peer_id,
        }


def _send_window(conn: h2.connection.H2Connection, sid: int, buffer: bytearray) -> int:
    """Send as much of ``buffer`` on ``sid`` as the flow-control window allows; bytes sent."""
    sent = 0
    while buffer:
        size = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if size <= 0:
            break
        chunk = bytes(buffer[:size])
        del buffer[:size]
        conn.send_data(sid, chunk)
        sent += len(chunk)
    return sent
