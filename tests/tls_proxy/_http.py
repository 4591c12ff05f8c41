"""HTTP helpers for the proxy tests: an h11 echo app, a small h11 client, raw exchanges."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import h11

from ._harness import serving

Headers = Sequence[tuple[str, str]]


@dataclass
class EchoApp:
    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)  # every request, in order
    connections: int = 0


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, *events: h11.Event) -> None:
    for event in events:
        data = conn.send(event)
        if data:
            writer.write(data)
    await writer.drain()


@asynccontextmanager
async def http_echo_app() -> AsyncIterator[EchoApp]:
    """Answers every request with JSON: method, target, headers, body. ``x-chunks: N`` makes
    it answer chunked in N pieces; ``Upgrade`` gets a 101 and the raw bytes echoed after it."""
    app = EchoApp(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await _next(conn, reader)
                if not isinstance(request, h11.Request):
                    return
                if conn.they_are_waiting_for_100_continue:
                    await _send(
                        conn, writer, h11.InformationalResponse(status_code=100, headers=[])
                    )
                body = b""
                while not isinstance(event := await _next(conn, reader), h11.EndOfMessage):
                    assert isinstance(event, h11.Data)
                    body += event.data
                seen = {
                    "method": request.method.decode(),
                    "target": request.target.decode(),
                    "headers": [[n.decode(), v.decode()] for n, v in request.headers],
                    "body": body.decode(),
                }
                app.seen.append(seen)
                names = dict(request.headers)
                if b"upgrade" in names:
                    await _send(
                        conn,
                        writer,
                        h11.InformationalResponse(
                            status_code=101,
                            headers=[("upgrade", names[b"upgrade"]), ("connection", "upgrade")],
                        ),
                    )
                    rest = conn.trailing_data[0]
                    if rest:
                        writer.write(b"echo:" + rest)
                    while data := await reader.read(65536):
                        writer.write(b"echo:" + data)
                        await writer.drain()
                    return
                payload = json.dumps(seen).encode()
                chunks = int(names.get(b"x-chunks", b"0"))
                if chunks:
                    await _send(conn, writer, h11.Response(status_code=200, headers=[]))
                    step = len(payload) // chunks + 1
                    for i in range(0, len(payload), step):
                        await _send(conn, writer, h11.Data(data=payload[i : i + step]))
                else:
                    await _send(
                        conn,
                        writer,
                        h11.Response(
                            status_code=200,
                            headers=[
                                ("content-type", "application/json"),
                                ("content-length", str(len(payload))),
                            ],
                        ),
                        h11.Data(data=payload),
                    )
                await _send(conn, writer, h11.EndOfMessage())
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass

    async with serving(handle) as server:
        app.port = server.port
        yield app


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    informational: list[int] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One HTTP/1.1 client connection (plain or TLS) driven by h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext | None = None) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()

    async def next(self) -> h11.Event:
        return await asyncio.wait_for(_next(self.conn, self.reader), 5)

    async def send(self, *events: h11.Event) -> None:
        await _send(self.conn, self.writer, *events)

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers = (),
        body: bytes | list[bytes] = b"",
        *,
        wait_for_continue: bool = False,
    ) -> Reply:
        all_headers = [("host", "web.example.org"), *headers]
        if isinstance(body, list):
            all_headers.append(("transfer-encoding", "chunked"))
        elif body:
            all_headers.append(("content-length", str(len(body))))
        await self.send(h11.Request(method=method, target=target, headers=all_headers))
        informational: list[int] = []
        if wait_for_continue:
            event = await self.next()
            assert isinstance(event, h11.InformationalResponse), event
            informational.append(event.status_code)
        for piece in body if isinstance(body, list) else [body]:
            if piece:
                await self.send(h11.Data(data=piece))
        await self.send(h11.EndOfMessage())
        return await self.response(informational)

    async def response(self, informational: list[int] | None = None) -> Reply:
        informational = informational or []
        while isinstance(event := await self.next(), h11.InformationalResponse):
            informational.append(event.status_code)
        assert isinstance(event, h11.Response), event
        reply = Reply(
            event.status_code,
            {n.decode(): v.decode() for n, v in event.headers},
            b"",
            informational,
        )
        while not isinstance(part := await self.next(), h11.EndOfMessage):
            assert isinstance(part, h11.Data)
            reply.body += part.data
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return reply


async def raw_exchange(
    port: int, payload: bytes, context: ssl.SSLContext | None = None, *, timeout: float = 5
) -> bytes:
    """Send raw bytes and read everything until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(payload)
        await writer.drain()
        received = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout)
            except (ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            received += chunk
        return received
    finally:
        writer.close()
        with suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
