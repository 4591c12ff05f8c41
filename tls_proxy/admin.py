"""The admin server: plain HTTP/1.1 on loopback: ``/ready``, ``/live``, ``/metrics``,
``/metrics/worker``, ``/config``.

Owns the tiny HTTP shell (h11 parses, asyncio streams carry; one request per connection) and
routing to callables the composition root provides. ``/ready`` answers 200 only when the proxy
says so (identity loaded, listeners up, not draining). ``/metrics`` answers the whole proxy's
totals (with ``runtime.workers``, gathered from every worker), ``/metrics/worker`` this process
alone. It must not hold secrets: ``/config``
shows the effective configuration, which names files but never contains key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11

from .config import split_address

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 * 1024  # an admin request is one short GET line and a few headers
READ_TIMEOUT = 5.0  # seconds to send that request


@dataclass(frozen=True)
class AdminHooks:
    ready: Callable[[], bool]
    metrics: Callable[[], str]  # this process's own metrics
    config: Callable[[], dict[str, Any]]
    # Every worker process's totals; None: this process is the whole proxy (``metrics``).
    total_metrics: Callable[[], Awaitable[str]] | None = None


class AdminServer:
    def __init__(self, listen: str, hooks: AdminHooks) -> None:
        self.listen = listen
        self._hooks = hooks
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        host, port = split_address(self.listen)
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("admin server listening", extra={"port": self.port})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _route(self, method: str, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/live":
            return 200, "text/plain", b"live\n"
        if path == "/ready":
            if self._hooks.ready():
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready\n"
        if path in ("/metrics", "/metrics/worker"):
            total = self._hooks.total_metrics
            text = await total() if path == "/metrics" and total else self._hooks.metrics()
            return 200, "text/plain; version=0.0.4", text.encode()
        if path == "/config":
            body = json.dumps(self._hooks.config(), indent=2, sort_keys=True) + "\n"
            return 200, "application/json", body.encode()
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            request: h11.Request | None = None
            while request is None:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(4096), READ_TIMEOUT)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                    break
                return  # ConnectionClosed or anything else: nothing to answer
            status, ctype, body = await self._route(
                request.method.decode(), request.target.decode()
            )
            headers = [
                ("content-type", ctype),
                ("content-length", str(len(body))),
                ("connection", "close"),
            ]
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            if request.method != b"HEAD":
                writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        except (h11.RemoteProtocolError, TimeoutError, OSError) as err:
            log.debug("admin request failed", extra={"error": str(err)})
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
