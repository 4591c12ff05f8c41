"""The HTTP/1.1 codec: a fast path for the common shapes, h11 for everything else, on both
sides of a proxied connection, one request at a time.

Owns reading request heads (limits: ``http.max_header_bytes`` for their size, ``http.max_headers``
for their field count; a header timeout from the first byte, a keep-alive timeout before it),
normalizing the target (``path.normalize_path``) before the request filters see it, forwarding
exactly that target with identity headers rewritten, and relaying the answer. Keep-alive: the
downstream connection serves request after request; the upstream one is reused while both its
sides are done, and reopened otherwise; a connection whose exchange completed cleanly can go back
to the listener's pool (``HttpSession.checkin``) for another downstream connection.

Two ways to carry an exchange, chosen per exchange:

- **Fast path** (``h1fast``): a request head ``h1fast.parse_request`` accepts (origin-form,
  ``Content-Length`` or no body, up to ``FAST_BODY_MAX`` read whole before it goes upstream) and
  a final response framed by ``Content-Length`` (or by its status or a ``HEAD``) are parsed from
  our own buffers, rendered as bytes and relayed in one write each way; a large response body is
  streamed with backpressure.
- **h11**: anything the fast path declines (chunked bodies, ``Expect: 100-continue``, upgrades and
  CONNECT, HTTP/1.0, larger request bodies, any head that is not plainly valid) is driven by two
  h11 state machines (``SERVER`` toward whoever connected, ``CLIENT`` toward the upstream), with
  the smuggling checks h11 does not make (``l7.check_raw_head``/``check_fields``); bodies stream
  both ways with backpressure, 1xx are relayed and, after a ``101`` (or a 2xx to CONNECT), the
  bytes h11 has not parsed go to ``relay.splice``. A response the fast path declines after it
  sent the request (1xx, chunked, read until close) gets machines caught up with the exchange.
  Once both machines are idle again, the connection returns to the fast path.

It must not parse HTTP beyond ``h1fast``'s shapes (h11 does), decide policy (request filters do)
nor know which listener it serves: ``HttpSession`` carries what differs between inbound and
outbound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Literal

import h11

from . import h1fast
from .h1fast import DECLINED
from .l7 import (
    XFCC_HEADER,
    Exchange,
    Header,
    HttpRejected,
    HttpSession,
    LazyHeaders,
    LocalResponse,
    RequestHead,
    Upstream,
    check_fields,
    check_raw_head,
    classify_h11_error,
    forward_headers,
    wants_close,
    wants_upgrade,
)
from .path import PathError, normalize_path
from .relay import CHUNK, Deadline, close_stream, drain, must_drain, splice

log = logging.getLogger(__name__)

MAX_RESPONSE_HEAD = 64 * 1024  # an app's response head may be larger than what we accept
# A request body up to this size is read whole before the request goes upstream on the fast
# path; a larger one is streamed by the h11 path.
FAST_BODY_MAX = 64 * 1024
# RFC 9110 §9.2.2: may be sent twice; only these are retried on a new upstream connection
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def reason_phrase(status: int) -> bytes:
    """The reason phrase of the proxy's own answers, the same on both paths (empty for a
    status without a registered one)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _ClientGone(Exception):
    """The downstream peer closed in the middle of a request."""


class _UpstreamFailed(Exception):
    """The upstream failed (refused, reset, closed early, or broke HTTP/1.1)."""


async def serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: HttpSession
) -> None:
    """Serve HTTP/1.1 requests on an accepted, authenticated connection until it ends."""
    await _Http1(reader, writer, session).run()


class _Http1:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: HttpSession
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.s = session
        self.conn = session.conn
        # Between exchanges both sides are in fast mode: no h11 machine, our own buffers
        # (``buf`` from the client, ``upbuf`` from the upstream). An exchange the fast path
        # declines gets fresh h11 machines, dropped again once both are idle.
        self.down: h11.Connection | None = None
        self.up: h11.Connection | None = None
        self.buf = bytearray(session.prefix)  # read by protocol detection: the first request
        self.upbuf = bytearray()
        self.conn.bytes_in += len(session.prefix)
        self.upstream: Upstream | None = None
        self.reused = False  # the upstream connection came from the pool
        self.up_received = 0  # bytes from the upstream during the current exchange
        self.up_clean = False  # fast mode: the upstream's last exchange completed, reusable
        self.answered = False  # fast mode: a byte of the current response went to the client
        self.begun = False  # a byte of the current request has arrived
        self.deadline = Deadline()  # bounds the reads and writes of this (the connection's) task
        # inbound: the identity headers a client may not set, never forwarded
        self.identity = (
            frozenset(h.lower().encode("latin-1") for h in session.settings.identity_headers)
            if session.xfcc is not None
            else frozenset()
        )
        self.drop = h1fast.dropped(self.identity)  # with the hop-by-hop fields
        xfcc = session.xfcc
        self.xfcc_line = b"" if xfcc is None else h1fast.field_line(XFCC_HEADER, xfcc)

    async def run(self) -> None:
        try:
            while await self._one():
                if self.down is None:
                    # After a fast exchange: pool the upstream connection, keep it, or drop it.
                    if self.upstream is not None and not self._checkin() and not self.up_clean:
                        await self._drop_upstream()
                else:
                    self._next_cycle_down()
                    await self._next_cycle_up()
                    await self._leave_h11()
        finally:
            self.deadline.close()
            self._checkin()  # the client is leaving; a complete upstream exchange is kept
            await self._drop_upstream()

    # -- one request ---------------------------------------------------------------------

    async def _one(self) -> bool:
        """Serve one request; True when the connection may carry the next one."""
        ex = Exchange(0.0)  # started at the first byte (_begin): no end is reported before
        self.begun = False
        self.answered = False
        try:
            if self.down is None:
                fast = await self._read_head_fast(ex)
                if fast is None:
                    return False
                if fast is not DECLINED:
                    return await self._handle_fast(fast, ex)
                self.down = self._h11_server(bytes(self.buf))
                self.buf.clear()
            request = await self._read_head(ex)
            if request is None:
                return False
            return await self._handle(request, ex)
        except HttpRejected as err:
            ex.result, ex.error, ex.detail = "rejected", err.reason, err.detail
            log.info(
                "request refused",
                extra={**self._fields(), "status": err.status, "reason": err.reason,
                       "detail": err.detail},
            )  # fmt: skip
            ex.status = await self._refuse(err.status)
            return False
        except _UpstreamFailed as err:
            ex.result, ex.error, ex.detail = "error", "upstream_failed", str(err)
            log.warning("upstream failed", extra={**self._fields(), "detail": str(err)})
            ex.status = await self._refuse(HTTPStatus.BAD_GATEWAY)
            return False
        except _ClientGone:
            ex.error = ex.error or "client_closed"
            return False
        except (OSError, ssl.SSLError, TimeoutError) as err:
            ex.error = ex.error or type(err).__name__
            raise
        finally:
            if self.begun:
                self.conn.requests += 1
                self.s.chain.on_request_end(self.conn, ex)

    async def _read_head_fast(self, ex: Exchange) -> h1fast.Request | h1fast.Declined | None:
        """The next request head with its whole body in ``buf``; None when the peer closed
        or went idle; ``DECLINED`` when the head is not a shape the fast path serves."""
        settings = self.s.settings
        buf = self.buf
        deadline = self._head_begun(ex) if buf else None
        while True:
            if buf:
                request = h1fast.parse_request(
                    buf,
                    max_bytes=settings.max_header_bytes,
                    max_headers=settings.max_headers,
                    max_body=FAST_BODY_MAX,
                    drop=self.drop,
                )
                if request is not None:
                    break
            received = await self._head_bytes(ex, deadline)
            if received is None:
                return None
            data, deadline = received
            buf += data
        if request is DECLINED:
            return DECLINED
        loop = asyncio.get_running_loop()
        while len(buf) < request.size + request.length:  # the rest of a small body
            data = await self._recv(self.reader, loop.time() + self.s.idle)
            if not data:
                raise _ClientGone
            buf += data
            self.conn.bytes_in += len(data)
        return request

    def _head_begun(self, ex: Exchange) -> float:
        """A head's first byte is here: its exchange begins, and its deadline (the header
        timeout from now) is returned."""
        self._begin(ex)
        return asyncio.get_running_loop().time() + self.s.settings.header_timeout

    async def _head_bytes(self, ex: Exchange, deadline: float | None) -> tuple[bytes, float] | None:
        """The next bytes of a request head and the head's deadline. Before its first byte
        the keep-alive timeout bounds the wait, and a peer that closes or stays idle ends the
        connection quietly (None, RFC 9112 §9.5); from it, the header timeout does (408)."""
        settings = self.s.settings
        loop = asyncio.get_running_loop()
        # ``_recv`` written out: this read is on every request, and a coroutine less counts
        self.deadline.arm(
            loop.time() + settings.keepalive_timeout if deadline is None else deadline
        )
        try:
            data = await self.reader.read(CHUNK)
        except asyncio.CancelledError:
            if not self.deadline.expired():
                raise
            if deadline is None:
                return None
            raise HttpRejected(
                408,
                "header_timeout",
                f"no complete request head within {settings.header_timeout} s",
            ) from None
        finally:
            self.deadline.disarm()
        if not data:
            if self.begun:
                raise _ClientGone
            return None
        self.conn.bytes_in += len(data)
        return data, self._head_begun(ex) if deadline is None else deadline

    def _h11_server(self, data: bytes) -> h11.Connection:
        """An h11 machine toward the client, fed ``data`` (what we hold of its bytes)."""
        down = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.s.settings.max_header_bytes
        )
        if data:  # h11 reads an empty chunk as the end of the stream
            down.receive_data(data)
        return down

    async def _read_head(self, ex: Exchange) -> h11.Request | None:
        """The next request head by h11, checked; None when the peer closed or went idle."""
        assert self.down is not None
        settings = self.s.settings
        head = bytearray(self.down.trailing_data[0])
        deadline = self._head_begun(ex) if head else None
        while True:
            try:
                event = self.down.next_event()
            except h11.RemoteProtocolError as err:
                self._begin(ex)
                status = 431 if err.error_status_hint == 431 else 400
                raise HttpRejected(status, classify_h11_error(str(err)), str(err)) from err
            if isinstance(event, h11.Request):
                check_raw_head(bytes(head))
                check_fields(event.headers.raw_items(), settings.max_headers)
                return event
            if event is not h11.NEED_DATA:
                return None  # ConnectionClosed
            received = await self._head_bytes(ex, deadline)
            if received is None:
                return None
            data, deadline = received
            head += data
            self.down.receive_data(data)

    def _begin(self, ex: Exchange) -> None:
        if not self.begun:
            self.begun = True
            ex.started = time.monotonic()

    async def _handle(self, request: h11.Request, ex: Exchange) -> bool:
        settings = self.s.settings
        method = request.method.decode("ascii")
        raw_target = request.target.decode("latin-1")
        headers: list[Header] = request.headers.raw_items()
        host = next((v.decode("latin-1") for n, v in headers if n.lower() == b"host"), None)
        ex.method, ex.host = method, host
        path: str | None
        if method == "CONNECT":
            target, path = raw_target, None  # authority-form: nothing to normalize
        else:
            try:
                target = normalize_path(raw_target, encoded_slashes=settings.encoded_slashes)
            except PathError as err:
                ex.path = raw_target[:200]
                raise HttpRejected(400, "invalid_path", str(err)) from err
            path = target.partition("?")[0]
        ex.path = path if path is not None else target
        upgrade = wants_upgrade(headers)
        forwarded = forward_headers(
            headers,
            upgrade=upgrade,
            strip=self.identity,
            add=((XFCC_HEADER, self.s.xfcc),) if self.s.xfcc is not None else (),
        )
        head = RequestHead(method, target, path, host, LazyHeaders(forwarded))
        answer = await self.s.chain.on_request(self.conn, head, ex)
        if answer is not None:
            ex.result = "denied"
            return await self._answer(answer, ex)
        upstream = await self._upstream()
        if upstream is None:
            raise _UpstreamFailed(self.conn.detail or "upstream unreachable")
        ex.result = "allowed"
        outgoing = h11.Request(
            method=request.method, target=target.encode("ascii"), headers=forwarded
        )
        return await self._forward(outgoing, ex, streaming=upgrade or method == "CONNECT")

    # -- the fast path --------------------------------------------------------------------

    async def _handle_fast(self, request: h1fast.Request, ex: Exchange) -> bool:
        """``_handle`` for a fast-path request (origin-form, no upgrade, its body in hand)."""
        raw_target = request.target.decode("ascii")
        ex.method = method = request.method.decode("ascii")
        ex.host = host = request.host.decode("latin-1")
        try:
            target = normalize_path(raw_target, encoded_slashes=self.s.settings.encoded_slashes)
        except PathError as err:
            ex.path = raw_target[:200]
            raise HttpRejected(400, "invalid_path", str(err)) from err
        ex.path = path = target.partition("?")[0]
        forwarded, kept = request.forward, request.kept
        if self.s.xfcc is not None:
            forwarded.append((XFCC_HEADER, self.s.xfcc))
            kept.append(self.xfcc_line)
        head = RequestHead(method, target, path, host, LazyHeaders(forwarded))
        answer = await self.s.chain.on_request(self.conn, head, ex)
        if answer is not None:
            ex.result = "denied"
            return await self._answer_fast(answer, ex, request)
        if await self._upstream() is None:
            raise _UpstreamFailed(self.conn.detail or "upstream unreachable")
        ex.result = "allowed"
        return await self._forward_fast(request, target.encode("ascii"), forwarded, ex)

    async def _forward_fast(
        self, request: h1fast.Request, target: bytes, forwarded: list[Header], ex: Exchange
    ) -> bool:
        """Send a fast-path request (its whole body is in ``buf``) and relay the answer; True
        when the connection may carry the next request."""
        end = request.size + request.length
        raw = bytes(self.buf[:end])  # kept whole: an h11 hand-over replays it
        del self.buf[:end]
        ex.bytes_in += request.length
        data = h1fast.request_head(request.method, target, request.kept) + raw[request.size :]
        try:
            if self._start_fast(data):
                await self._drain_up()
            return await self._response_fast(request, target, forwarded, raw, ex)
        except _UpstreamFailed as err:
            if not (
                self.reused
                and self.up_received == 0
                and not self.answered
                and self.down is None
                and request.method in IDEMPOTENT
            ):
                raise
            log.info("pooled upstream connection failed; retrying", extra={"detail": str(err)})
            await self._drop_upstream()
            if await self._upstream(pooled=False) is None:
                raise _UpstreamFailed(self.conn.detail or "upstream unreachable") from err
            if self._start_fast(data):
                await self._drain_up()
            return await self._response_fast(request, target, forwarded, raw, ex)

    def _start_fast(self, data: bytes) -> bool:
        """Send a fast-path request upstream; True when a drain must follow."""
        self.up_received = 0
        self.up_clean = False
        self.upbuf.clear()
        return self._put_up(data)

    async def _response_fast(
        self,
        request: h1fast.Request,
        target: bytes,
        forwarded: list[Header],
        raw: bytes,
        ex: Exchange,
    ) -> bool:
        """Relay the response to a fast-path request: a final response framed by its
        Content-Length (or without a body) is passed through here; any other shape (1xx,
        chunked, read until close) goes to h11, caught up with the exchange so far."""
        assert self.upstream is not None
        reader = self.upstream[0]
        upbuf = self.upbuf
        head_request = request.method == b"HEAD"
        if not upbuf:
            upbuf += await self._recv_up(reader)
        while True:
            response = h1fast.parse_response(
                upbuf, max_bytes=MAX_RESPONSE_HEAD, head_request=head_request
            )
            if response is not None:
                break
            upbuf += await self._recv_up(reader)
        if response is DECLINED:
            return await self._response_h11(request, target, forwarded, raw, ex)
        ex.status = response.status
        lines = response.kept
        if request.close:
            lines.append(b"connection: close")
        end = response.size + response.length
        body = upbuf[response.size : end]  # what has arrived of the body
        del upbuf[:end]
        remaining = response.length - len(body)
        self.answered = True
        out = h1fast.response_head(response.status_line, lines) + body
        if self._put_down(out):
            await drain(self.writer, self.s.idle)
        while remaining:
            data = await self._recv_up(reader)
            if len(data) > remaining:  # bytes after the body: the upstream broke framing
                upbuf += data[remaining:]
                data = data[:remaining]
            remaining -= len(data)
            await self._write_down(data)
        ex.bytes_out += response.length
        self.up_clean = not response.close and not upbuf
        return not request.close

    async def _recv_up(self, reader: asyncio.StreamReader) -> bytes:
        """The next bytes of the upstream's answer; an error, the idle timeout or an early
        end fails it."""
        try:
            data = await self._recv(reader, asyncio.get_running_loop().time() + self.s.idle)
        except (OSError, ssl.SSLError) as err:  # TimeoutError included
            raise _UpstreamFailed(f"{type(err).__name__}: {err}") from err
        if not data:
            raise _UpstreamFailed("the upstream closed before the response ended")
        self.up_received += len(data)
        return data

    async def _response_h11(
        self,
        request: h1fast.Request,
        target: bytes,
        forwarded: list[Header],
        raw: bytes,
        ex: Exchange,
    ) -> bool:
        """Hand a response the fast path does not serve to h11: both machines are brought to
        where this exchange stands (the request read and sent whole), then h11 relays it."""
        down = self._h11_server(raw + bytes(self.buf))  # the next request too, if pipelined
        self.buf.clear()
        while not isinstance(down.next_event(), h11.EndOfMessage):
            pass
        up = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        up.send(h11.Request(method=request.method, target=target, headers=forwarded))
        if request.length:
            up.send(h11.Data(data=raw[request.size :]))
        up.send(h11.EndOfMessage())
        if self.upbuf:
            up.receive_data(bytes(self.upbuf))
            self.upbuf.clear()
        self.down, self.up = down, up
        if await self._pump_response(ex, self._recv_idle) == "switch":
            await self._tunnel()
            return False
        return down.our_state is h11.DONE and down.their_state is h11.DONE

    async def _answer_fast(
        self, answer: LocalResponse, ex: Exchange, request: h1fast.Request
    ) -> bool:
        """Send a filter's answer to a fast-path request (whose body was read whole)."""
        del self.buf[: request.size + request.length]
        ex.status = answer.status
        lines = [
            b"content-type: text/plain",
            b"content-length: %d" % len(answer.body),
            *(h1fast.field_line(name, value) for name, value in answer.headers),
        ]
        if request.close:
            lines.append(b"connection: close")
        status = b"HTTP/1.1 %d %s" % (answer.status, reason_phrase(answer.status))
        self.answered = True
        await self._write_down(h1fast.response_head(status, lines) + answer.body)
        return not request.close

    async def _leave_h11(self) -> None:
        """Back to fast mode once h11 has served its exchange and both machines are idle."""
        down, up = self.down, self.up
        assert down is not None
        if down.our_state is not h11.IDLE or down.their_state is not h11.IDLE:
            return
        data, closed = down.trailing_data
        if closed:
            return
        if up is not None:
            rest, ended = up.trailing_data
            if up.our_state is h11.IDLE and up.their_state is h11.IDLE and not rest and not ended:
                self.up, self.up_clean = None, True
            else:
                await self._drop_upstream()
        self.down = None
        self.buf[:] = data

    # -- relaying ------------------------------------------------------------------------

    async def _forward(self, head: h11.Request, ex: Exchange, *, streaming: bool) -> bool:
        """Send the request upstream and relay the answer; True when the connection may
        carry the next request.

        The common case, a request whose body (often none) h11 already holds in full, goes
        upstream in one write and its response is relayed by this task alone. A body still
        arriving (or ``Expect: 100-continue``, an upgrade, CONNECT) needs both directions at
        once: ``_relay`` runs them as two tasks.
        """
        self._h11_client()
        body: list[bytes] = []
        complete = False if streaming else self._buffered_body(body, ex)
        self.up_received = 0
        if not complete:
            await self._write_up(self._encode_up(head, body, end=False))
            return await self._relay(ex)
        try:
            await self._write_up(self._encode_up(head, body, end=True))
            outcome = await self._pump_response(ex, self._recv_idle)
        except _UpstreamFailed as err:
            if not self._may_retry(head):
                raise
            # A pooled connection the app closed (or reset) while we picked it: nothing of
            # this request can have been answered, so it goes once more on a new connection.
            log.info("pooled upstream connection failed; retrying", extra={"detail": str(err)})
            await self._drop_upstream()
            if await self._upstream(pooled=False) is None:
                raise _UpstreamFailed(self.conn.detail or "upstream unreachable") from err
            self._h11_client()
            await self._write_up(self._encode_up(head, body, end=True))
            outcome = await self._pump_response(ex, self._recv_idle)
        if outcome == "switch":
            await self._tunnel()
            return False
        return self._down_done()

    def _down_done(self) -> bool:
        assert self.down is not None
        return self.down.our_state is h11.DONE and self.down.their_state is h11.DONE

    def _encode_up(self, head: h11.Request, body: list[bytes], *, end: bool) -> bytes:
        assert self.up is not None
        out = [self.up.send(head) or b""]
        out.extend(self.up.send(h11.Data(data=piece)) or b"" for piece in body)
        if end:
            out.append(self.up.send(h11.EndOfMessage()) or b"")
        return b"".join(out)

    def _may_retry(self, head: h11.Request) -> bool:
        """Whether a failed exchange may be sent again: on a reused connection that gave no
        byte back, and an idempotent method (RFC 9110 §9.2.2), as the app may have acted."""
        assert self.down is not None
        return (
            self.reused
            and self.up_received == 0
            and self.down.our_state is h11.SEND_RESPONSE
            and head.method in IDEMPOTENT
        )

    def _buffered_body(self, body: list[bytes], ex: Exchange) -> bool:
        """The request body h11 already holds, into ``body``; True once it is complete."""
        assert self.down is not None
        while True:
            try:
                event = self.down.next_event()
            except h11.RemoteProtocolError as err:
                raise HttpRejected(400, classify_h11_error(str(err)), str(err)) from err
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Data):
                ex.bytes_in += len(event.data)
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                raise _ClientGone

    async def _relay(self, ex: Exchange) -> bool:
        requests = asyncio.ensure_future(self._pump_request(ex))
        responses = asyncio.ensure_future(self._pump_response(ex, self._recv_timed))
        try:
            done, _ = await asyncio.wait({requests, responses}, return_when=asyncio.FIRST_COMPLETED)
            if requests in done and requests.exception() is not None:
                requests.result()  # raises: a bad body or a vanished client ends it all
            outcome = await responses
            if outcome == "switch":
                await requests
                await self._tunnel()
                return False
            if not requests.done():
                return False  # answered before the body was read: the rest cannot be framed
            requests.result()
        finally:
            for task in (requests, responses):
                if not task.done():
                    task.cancel()
            await asyncio.gather(requests, responses, return_exceptions=True)
        return self._down_done()

    async def _pump_request(self, ex: Exchange) -> None:
        """Request body: downstream → upstream until its end (flow control by ``drain``)."""
        assert self.down is not None
        while True:
            try:
                event = self.down.next_event()
            except h11.RemoteProtocolError as err:
                raise HttpRejected(400, classify_h11_error(str(err)), str(err)) from err
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(CHUNK), self.s.idle)
                if not data:
                    raise _ClientGone
                self.conn.bytes_in += len(data)
                self.down.receive_data(data)
            elif isinstance(event, h11.Data):
                ex.bytes_in += len(event.data)
                await self._send_up(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self._send_up(h11.EndOfMessage())
                return
            else:
                raise _ClientGone

    async def _pump_response(
        self, ex: Exchange, recv: Callable[[asyncio.StreamReader], Awaitable[bytes]]
    ) -> Literal["done", "switch"]:
        """Response: upstream → downstream, 1xx included; ``switch`` after a protocol switch.

        What h11 renders is written once per batch of parsed events (a head, its body and its
        end usually arrive together), not once per event; ``recv`` reads with the timeout.
        """
        assert self.down is not None
        assert self.up is not None and self.upstream is not None
        up, (up_reader, _) = self.up, self.upstream
        out: list[bytes] = []
        while True:
            try:
                event = up.next_event()
            except h11.RemoteProtocolError as err:
                raise _UpstreamFailed(f"invalid HTTP/1.1 from the upstream: {err}") from err
            if event is h11.NEED_DATA:
                await self._flush_down(out)
                try:
                    data = await recv(up_reader)
                except (OSError, ssl.SSLError) as err:
                    raise _UpstreamFailed(f"{type(err).__name__}: {err}") from err
                self.up_received += len(data)
                up.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                switching = event.status_code == 101
                out.append(
                    self._render_down(
                        h11.InformationalResponse(
                            status_code=event.status_code,
                            headers=forward_headers(event.headers.raw_items(), upgrade=switching),
                            reason=event.reason,
                        )
                    )
                )
                if switching:
                    await self._flush_down(out)
                    return "switch"
            elif isinstance(event, h11.Response):
                ex.status = event.status_code
                raw = event.headers.raw_items()
                headers = forward_headers(raw)
                if self.down.their_state is not h11.DONE and (
                    self.down.they_are_waiting_for_100_continue or wants_close(raw)
                ):
                    # A final answer before the body: the body will not be read, so the
                    # connection cannot carry another request (RFC 9110 §10.1.1).
                    headers.append((b"connection", b"close"))
                out.append(
                    self._render_down(
                        h11.Response(
                            status_code=event.status_code, headers=headers, reason=event.reason
                        )
                    )
                )
                if self.down.our_state is h11.SWITCHED_PROTOCOL:
                    await self._flush_down(out)
                    return "switch"  # a 2xx to CONNECT
            elif isinstance(event, h11.Data):
                ex.bytes_out += len(event.data)
                out.append(self._render_down(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                out.append(self._render_down(h11.EndOfMessage()))
                await self._flush_down(out)
                return "done"
            else:
                await self._flush_down(out)
                raise _UpstreamFailed("the upstream closed before the response ended")

    async def _tunnel(self) -> None:
        """After a switch: hand over what h11 buffered, then relay opaque bytes both ways."""
        assert self.down is not None
        assert self.up is not None and self.upstream is not None
        up_reader, up_writer = self.upstream
        rest_down, rest_up = self.down.trailing_data[0], self.up.trailing_data[0]
        if rest_down:
            up_writer.write(rest_down)
        if rest_up:
            self.writer.write(rest_up)
            self.conn.bytes_out += len(rest_up)
        await splice(self.reader, self.writer, up_reader, up_writer, self.conn, self.s.idle)

    # -- answers made here ----------------------------------------------------------------

    async def _answer(self, answer: LocalResponse, ex: Exchange) -> bool:
        """Send a filter's answer; keep the connection only if the request body was read."""
        assert self.down is not None
        self._discard_buffered_body()
        close = self.down.their_state is not h11.DONE
        ex.status = answer.status
        headers: list[Header] = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(answer.body)).encode()),
            *answer.headers,
        ]
        if close:
            headers.append((b"connection", b"close"))
        out = [
            self._render_down(
                h11.Response(
                    status_code=answer.status,
                    headers=headers,
                    reason=reason_phrase(answer.status),
                )
            ),
            self._render_down(h11.Data(data=answer.body)),
            self._render_down(h11.EndOfMessage()),
        ]
        await self._flush_down(out)
        return not close and self.down.our_state is h11.DONE

    def _discard_buffered_body(self) -> None:
        """Consume the request body h11 already holds, without waiting for more."""
        assert self.down is not None
        with contextlib.suppress(h11.RemoteProtocolError):
            while self.down.their_state is h11.SEND_BODY:
                event = self.down.next_event()
                if event is h11.NEED_DATA or not isinstance(event, h11.Data):
                    return

    async def _refuse(self, status: int) -> int | None:
        """A terse error answer and ``Connection: close``, unless a response has begun."""
        if self.down is None:
            if self.answered:
                return None
        elif self.down.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return None
        body = reason_phrase(status)
        fresh = h11.Connection(h11.SERVER)  # ours may be in ERROR: render with a clean one
        out = b"".join(
            fresh.send(event) or b""
            for event in (
                h11.Response(
                    status_code=status,
                    reason=body,
                    headers=[
                        (b"content-type", b"text/plain"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                ),
                h11.Data(data=body),
                h11.EndOfMessage(),
            )
        )
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            self.writer.write(out)
            self.conn.bytes_out += len(out)
            await drain(self.writer, self.s.idle)
        return status

    # -- plumbing -------------------------------------------------------------------------

    def _render_down(self, event: h11.Event) -> bytes:
        assert self.down is not None
        return self.down.send(event) or b""

    async def _flush_down(self, out: list[bytes]) -> None:
        """Write what ``out`` holds toward the client in one write, then empty it."""
        data = b"".join(out)
        out.clear()
        if data:
            self.writer.write(data)
            self.conn.bytes_out += len(data)
            await drain(self.writer, self.s.idle)

    async def _send_up(self, event: h11.Event) -> None:
        assert self.up is not None
        await self._write_up(self.up.send(event) or b"")

    # The fast path writes with ``_put_down``/``_put_up`` and awaits a drain only when one is
    # due: a coroutine call less per write, as the buffer is nearly always small.

    def _put_down(self, data: bytes | bytearray) -> bool:
        """Write toward the client; True when a drain must follow."""
        self.writer.write(data)
        self.conn.bytes_out += len(data)
        return must_drain(self.writer)

    async def _write_down(self, data: bytes | bytearray) -> None:
        """Write toward the client and wait for room."""
        if self._put_down(data):
            await drain(self.writer, self.s.idle)

    def _put_up(self, data: bytes) -> bool:
        """Write toward the upstream; True when a drain must follow."""
        assert self.upstream is not None
        if not data:
            return False
        writer = self.upstream[1]
        try:
            writer.write(data)
        except (OSError, ssl.SSLError) as err:
            raise _UpstreamFailed(f"{type(err).__name__}: {err}") from err
        return must_drain(writer)

    async def _drain_up(self) -> None:
        assert self.upstream is not None
        try:
            await drain(self.upstream[1], self.s.idle)
        except (OSError, ssl.SSLError) as err:
            raise _UpstreamFailed(f"{type(err).__name__}: {err}") from err

    async def _write_up(self, data: bytes) -> None:
        if self._put_up(data):
            await self._drain_up()

    async def _recv(self, reader: asyncio.StreamReader, at: float) -> bytes:
        """``reader.read`` by this connection's task, bounded by the loop time ``at``."""
        self.deadline.arm(at)
        try:
            return await reader.read(CHUNK)
        except asyncio.CancelledError:
            if self.deadline.expired():
                raise TimeoutError from None
            raise
        finally:
            self.deadline.disarm()

    async def _recv_idle(self, reader: asyncio.StreamReader) -> bytes:
        return await self._recv(reader, asyncio.get_running_loop().time() + self.s.idle)

    async def _recv_timed(self, reader: asyncio.StreamReader) -> bytes:
        """A read from a task of its own (``_relay``): the deadline bounds only ours."""
        return await asyncio.wait_for(reader.read(CHUNK), self.s.idle)

    async def _upstream(self, *, pooled: bool = True) -> Upstream | None:
        if self.upstream is None:
            idle = self.s.checkout() if pooled and self.s.checkout is not None else None
            self.reused = idle is not None
            self.upstream = idle or await self.s.open_upstream("http/1.1")
            self.up, self.up_clean = None, False
            self.upbuf.clear()
        return self.upstream

    def _h11_client(self) -> None:
        """An h11 machine for the upstream connection, unless it has one (in fast mode it
        has none between exchanges)."""
        if self.up is None:
            self.up = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)

    def _checkin(self) -> bool:
        """Give the upstream connection back to the pool if its last exchange completed both
        ways (never after an incomplete or ``close``-d response, a switch or an error)."""
        up, upstream, checkin = self.up, self.upstream, self.s.checkin
        if checkin is None or upstream is None:
            return False
        if up is None:
            if not self.up_clean or self.upbuf:
                return False
        elif up.our_state is not h11.DONE or up.their_state is not h11.DONE:
            return False
        self.upstream = self.up = None
        self.up_clean = False
        checkin(upstream)
        return True

    def _next_cycle_down(self) -> None:
        assert self.down is not None
        self.down.start_next_cycle()

    async def _next_cycle_up(self) -> None:
        up = self.up
        if up is None:
            return
        if self._checkin():
            return  # the next request takes a pooled connection, likely this one
        if up.our_state is h11.DONE and up.their_state is h11.DONE:
            up.start_next_cycle()
        else:
            await self._drop_upstream()  # the app closes or broke off: reopen on next use

    async def _drop_upstream(self) -> None:
        if self.upstream is not None:
            await close_stream(self.upstream[1])
        self.upstream = None
        self.up = None
        self.up_clean = False
        self.upbuf.clear()

    def _fields(self) -> dict[str, object]:
        return {
            "listener": self.conn.listener,
            "direction": self.conn.direction,
            "source": self.conn.source,
            "peer_id": self.conn.peer_id,
        }
