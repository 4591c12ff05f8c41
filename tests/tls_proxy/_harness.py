"""Two real proxies in one event loop: identities from files, an echo app, real sockets."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tls_proxy import Proxy, parse_config

from ._pki import Authority, Svid, write_identity


@dataclass
class Echo:
    server: asyncio.base_events.Server
    port: int
    open_writers: set[asyncio.StreamWriter]


@asynccontextmanager
async def echo_app() -> AsyncIterator[Echo]:
    """A plain TCP echo app on 127.0.0.1 (what sits behind the inbound proxy)."""
    writers: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writers.discard(writer)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield Echo(server, server.sockets[0].getsockname()[1], writers)
    finally:
        server.close()
        for writer in list(writers):
            writer.close()
        await server.wait_closed()


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
