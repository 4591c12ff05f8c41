"""Two real proxies in one event loop: identities from files, an echo app, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tls_proxy import Proxy, parse_config

from ._pki import CLIENT, WEB, Authority, Svid, mint, new_authority, write_identity

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Serving:
    port: int
    open_writers: set[asyncio.StreamWriter]  # the connections not closed yet


@asynccontextmanager
async def serving(handle: Handler) -> AsyncIterator[Serving]:
    """A test app: a TCP server on 127.0.0.1 running ``handle`` per connection, which it
    closes when ``handle`` returns; on exit the server and every open connection close."""
    writers: set[asyncio.StreamWriter] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handle(reader, writer)
        finally:
            writers.discard(writer)
            writer.close()

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield Serving(server.sockets[0].getsockname()[1], writers)
    finally:
        server.close()
        for writer in list(writers):
            writer.close()
        await server.wait_closed()


@asynccontextmanager
async def echo_app() -> AsyncIterator[Serving]:
    """A plain TCP echo app on 127.0.0.1 (what sits behind the inbound proxy)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async with serving(handle) as app:
        yield app


def proxy_config(
    folder: Path, svid: Svid, authorities: list[Authority], **sections: Any
) -> dict[str, Any]:
    return {
        "identity": {**write_identity(folder, svid, *authorities), "poll_interval": 0.1},
        "admin": {"listen": "127.0.0.1:0"},
        "timeouts": {"drain": 2, "handshake": 5},
        **sections,
    }


@dataclass
class Running:
    proxy: Proxy
    log: io.StringIO

    def port(self, name: str) -> int:
        return next(x.port for x in self.proxy.listeners if x.name == name)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


@asynccontextmanager
async def running(config: dict[str, Any], base: Path) -> AsyncIterator[Running]:
    log = io.StringIO()
    proxy = Proxy(parse_config(config, "test.yaml", base), access_log_stream=log)
    await proxy.start()
    try:
        yield Running(proxy, log)
    finally:
        await proxy.stop()


def inbound_listener(port: int, protocol: str | None = None, name: str = "web") -> dict[str, Any]:
    """An inbound listener on a free loopback port forwarding to the app on ``port``
    (``protocol`` left to the config's default when None)."""
    listener = {"name": name, "listen": "127.0.0.1:0", "forward": f"127.0.0.1:{port}"}
    if protocol is not None:
        listener["protocol"] = protocol
    return listener


@asynccontextmanager
async def inbound_in_front_of(
    tmp: Path, app_port: int, **sections: Any
) -> AsyncIterator[tuple[Running, ssl.SSLContext]]:
    """An inbound HTTP proxy (listener ``web``, identity ``WEB``) forwarding to the app on
    ``app_port``, and a TLS context presenting ``CLIENT``'s SVID of the same CA, to talk to it
    directly."""
    ca = new_authority()
    config = proxy_config(
        tmp / "web",
        mint(ca, WEB),
        [ca],
        inbound=[inbound_listener(app_port, "http")],
        **sections,
    )
    async with running(config, tmp / "web") as inbound:
        yield inbound, client_context(mint(ca, CLIENT), ca, tmp)


async def exchange(port: int, payload: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``payload`` to 127.0.0.1:port and read the same number of bytes back (or EOF)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        received = b""
        while len(received) < len(payload):
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            received += chunk
        return received
    finally:
        writer.close()


def client_context(svid: Svid | None, authority: Authority, tmp: Path) -> ssl.SSLContext:
    """A plain TLS client context (not a proxy), with or without a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=authority.pem().decode())
    if svid is not None:
        (tmp / "c.pem").write_bytes(svid.chain_pem())
        (tmp / "c.key").write_bytes(svid.key_pem())
        context.load_cert_chain(tmp / "c.pem", tmp / "c.key")
    return context


async def tls_exchange(port: int, context: ssl.SSLContext, payload: bytes) -> bytes:
    """Talk TLS straight to an inbound listener; the bytes echoed, b"" when refused."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()
