"""Upstream keep-alive pools: HTTP/1.1 upstream connections reused across downstream ones.

client → outbound (plain) → mTLS → inbound → app, real sockets; the app counts the
connections it accepts, the inbound proxy's access log shows which mTLS connection (source
port) carried each request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tls_proxy.pool import Pooled, UpstreamPool

from ._harness import inbound_in_front_of, serving
from ._http import Client
from .test_http import mesh, run

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass
class CountingApp:
    port: int
    connections: int = 0
    requests: int = 0


@asynccontextmanager
async def app_answering(answers: int) -> AsyncIterator[CountingApp]:
    """An app that answers ``answers`` requests per connection (keep-alive, no
    ``Connection: close``), then reads one more request and closes without answering it: an
    app whose idle timeout fires just as the proxy reuses the connection."""
    app = CountingApp(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app.connections += 1
        try:
            for _ in range(answers):
                await reader.readuntil(b"\r\n\r\n")
                app.requests += 1
                writer.write(RESPONSE)
                await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError):
            pass

    async with serving(handle) as server:
        app.port = server.port
        yield app


def test_upstream_connections_are_reused_across_downstream_connections(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            for i in range(4):
                client = await Client.open(m.out_port)
                reply = await client.request("GET", f"/n/{i}")
                await client.close()
                assert reply.status == 200
                assert reply.json()["target"] == f"/n/{i}"
            # four client connections; one connection to the app, one mTLS connection
            assert m.app.connections == 1
            assert len({r["source"] for r in m.requests()}) == 1
            assert [r["status"] for r in m.requests()] == [200] * 4
            (outbound,) = m.outbound.proxy.listeners
            assert outbound.pool is not None and outbound.pool.reused == 3

    run(main)


def test_without_a_pool_every_downstream_connection_opens_its_own(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, http={"pool_max_idle": 0}) as m:
            context = m.tls()  # straight to the inbound proxy: one mTLS connection each
            for i in range(3):
                client = await Client.open(m.in_port, context)
                assert (await client.request("GET", f"/n/{i}")).status == 200
                await client.close()
            assert m.app.connections == 3
            assert m.inbound.proxy.listeners[0].pool is None

    run(main)


def test_a_pooled_connection_the_app_closed_does_not_fail_the_next_request(
    tmp_path: Path,
) -> None:
    """The app answers once per connection, then closes on the next request without an
    answer: the proxy sends that (idempotent) request again on a new connection."""

    async def main() -> None:
        async with (
            app_answering(1) as app,
            inbound_in_front_of(tmp_path, app.port) as (inbound, context),
        ):
            for _ in range(3):
                client = await Client.open(inbound.port("web"), context)
                reply = await client.request("GET", "/")
                await client.close()
                assert (reply.status, reply.body) == (200, b"ok")
            assert app.requests == 3
            assert app.connections == 3  # each pooled one was closed under a request
            # A POST is not sent twice: the app might have acted on it.
            client = await Client.open(inbound.port("web"), context)
            reply = await client.request("POST", "/", body=b"x")
            await client.close()
            assert reply.status == 502

    run(main)


def test_a_pool_asked_for_an_address_hands_out_only_connections_going_there() -> None:
    """Transparent listeners reach a different original destination per connection: a pooled
    connection to one must never carry a request meant for another (the regression: a request
    to a sidecar's own port was sent down a connection to the app behind it)."""

    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # open and silent until the test ends

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(max_idle=4, idle_timeout=60)
        tag = object()
        opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        to_app, to_other = (
            Pooled(reader, writer, address, None, tag)
            for (reader, writer), address in zip(
                opened, ["10.0.0.2:8080", "10.0.0.2:9090"], strict=True
            )
        )
        pool.put(to_app)
        pool.put(to_other)
        assert pool.take(tag, "10.0.0.2:8080") is to_app  # skips the newer one to 9090
        assert pool.take(tag, "10.0.0.2:8080") is None
        assert len(pool) == 1  # the 9090 connection was kept, not closed
        assert pool.take(tag, "10.0.0.2:9090") is to_other
        assert pool.take(object()) is None  # another tag: nothing
        pool.close()
        for writer in [w for _, w in opened] + accepted:
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
