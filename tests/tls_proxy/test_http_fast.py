"""The HTTP/1.1 fast path through real proxies: exchanges it serves and exchanges it hands to
h11 share one client connection and one upstream connection, in any order; messages framed
across reads or pipelined in one read cross intact; and an upstream that closes, sends bytes
after a body or an interim response is read right."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import h11

from ._harness import inbound_in_front_of, serving
from ._http import Client
from .test_http import header, mesh, run


async def read_responses(reader: asyncio.StreamReader, count: int) -> list[tuple[int, bytes]]:
    """``count`` responses off a raw connection, as (status, body)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
    conn.send(h11.EndOfMessage())
    out: list[tuple[int, bytes]] = []
    status, body = 0, b""
    while len(out) < count:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await asyncio.wait_for(reader.read(65536), 5))
        elif isinstance(event, h11.Response):
            status, body = event.status_code, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, body))
            conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
            conn.send(h11.EndOfMessage())
    return out


def test_fast_and_h11_exchanges_alternate_on_one_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            client = await Client.open(m.out_port)
            plain = await client.request("GET", "/1")
            chunked_up = await client.request("POST", "/2", body=[b"ab", b"cd"])
            chunked_down = await client.request("GET", "/3", [("x-chunks", "3")])
            sized = await client.request("POST", "/4", body=b"x" * 60000)
            large = await client.request("POST", "/5", body=b"y" * 200000)
            last = await client.request("GET", "/6")
            assert m.app.connections == 1  # one upstream connection served every shape
            head = await client.request("HEAD", "/7")  # (the echo app closes after a HEAD)
            await client.close()
            replies = [plain, chunked_up, chunked_down, sized, large, last, head]
            assert [r.status for r in replies] == [200] * 7
            assert [s["target"] for s in m.app.seen] == ["/1", "/2", "/3", "/4", "/5", "/6", "/7"]
            assert chunked_up.json()["body"] == "abcd"
            assert chunked_down.headers.get("transfer-encoding") == "chunked"
            assert chunked_down.json()["target"] == "/3"
            assert head.body == b"" and int(head.headers["content-length"]) > 0
            assert sized.json()["body"] == "x" * 60000
            assert large.json()["body"] == "y" * 200000
            assert last.json()["target"] == "/6"
            for seen in m.app.seen:
                assert header(seen, "x-forwarded-client-cert") != []

    run(main)


def test_pipelined_and_split_requests_cross_intact(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            reader, writer = await asyncio.open_connection("127.0.0.1", m.out_port)
            two = b"GET /p1 HTTP/1.1\r\nHost: a\r\n\r\nGET /p2 HTTP/1.1\r\nHost: a\r\n\r\n"
            writer.write(two)
            split = [b"POST /s HTTP/1.1\r\nHo", b"st: a\r\nContent-Length: 5\r\n", b"\r\nhe"]
            for piece in split:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0)  # separate writes, so separate reads at the proxy
            writer.write(b"llo")
            replies = await read_responses(reader, 3)
            writer.close()
            assert [status for status, _ in replies] == [200, 200, 200]
            bodies = [json.loads(body) for _, body in replies]
            assert [b["target"] for b in bodies] == ["/p1", "/p2", "/s"]
            assert bodies[2]["body"] == "hello"

    run(main)


def test_connection_close_from_the_client_ends_the_connection_after_the_answer(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            reader, writer = await asyncio.open_connection("127.0.0.1", m.out_port)
            writer.write(b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            received = b""
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                received += chunk  # until the proxy closes
            writer.close()
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"\r\nconnection: close" in head.lower()
            seen = json.loads(body)
            assert seen["target"] == "/c"
            assert header(seen, "connection") == []  # hop-by-hop: not forwarded

    run(main)


@dataclass
class ScriptedApp:
    port: int
    connections: int = 0


@asynccontextmanager
async def scripted_app(script: list[tuple[bytes, bool]]) -> AsyncIterator[ScriptedApp]:
    """Answers each request head with the next scripted bytes, closing after it when told:
    responses no well-behaved app sends, for the proxy's reading of its upstream."""
    app = ScriptedApp(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app.connections += 1
        try:
            while script:
                await reader.readuntil(b"\r\n\r\n")
                response, close = script.pop(0)
                writer.write(response)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, OSError):
            pass

    async with serving(handle) as server:
        app.port = server.port
        yield app


@asynccontextmanager
async def inbound_to(
    tmp: Path, script: list[tuple[bytes, bool]]
) -> AsyncIterator[tuple[ScriptedApp, Client]]:
    """An inbound proxy in front of a scripted app, and a client connection to it over mTLS."""
    async with (
        scripted_app(script) as app,
        inbound_in_front_of(tmp, app.port) as (inbound, context),
    ):
        client = await Client.open(inbound.port("web"), context)
        try:
            yield app, client
        finally:
            await client.close()


def test_an_upstream_answer_with_connection_close_ends_only_that_upstream_connection(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        script = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\na", True),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb", False),
        ]
        async with inbound_to(tmp_path, script) as (app, client):
            first = await client.request("GET", "/1")
            second = await client.request("GET", "/2")  # same client connection
            assert (first.status, first.body, second.status, second.body) == (200, b"a", 200, b"b")
            assert "connection" not in first.headers  # hop-by-hop: the client's stays open
            assert app.connections == 2

    run(main)


def test_bytes_after_a_response_body_are_not_relayed_nor_read_as_the_next_answer(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
        script = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na" + smuggled, False),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb", False),
        ]
        async with inbound_to(tmp_path, script) as (app, client):
            first = await client.request("GET", "/1")
            second = await client.request("GET", "/2")
            assert (first.body, second.body) == (b"a", b"b")
            assert app.connections == 2  # the connection that broke framing was not reused

    run(main)


def test_an_interim_response_is_relayed_and_the_connection_goes_back_to_the_fast_path(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        script = [
            (
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                False,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb", False),
        ]
        async with inbound_to(tmp_path, script) as (app, client):
            first = await client.request("GET", "/1")
            second = await client.request("GET", "/2")
            assert (first.informational, first.status, first.body) == ([103], 200, b"ok")
            assert (second.status, second.body) == (200, b"b")
            assert app.connections == 1

    run(main)
