"""Upstream HTTP/2 connections shared by the streams of many downstream connections.

h2c clients → outbound → h2 over mTLS → inbound → an h2c app written here on h2, all real
sockets on 127.0.0.1. The app counts its connections, says in each answer which connection
carried it, holds ``/hold/NAME`` until the test releases NAME, and can advertise a small
SETTINGS_MAX_CONCURRENT_STREAMS or answer a connection's second stream with a GOAWAY.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tls_proxy import parse_config
from tls_proxy.h2conn import client_connection, server_connection

from ._harness import Running
from ._pki import CLIENT, mint, new_authority, write_identity
from .test_http2 import pair, run

Answer = tuple[int | str, bytes]  # the status, or "reset:<ERROR_CODE>", and the body


@dataclass
class H2App:
    """An h2c app; every answer is ``<path> on <connection index>``."""

    max_streams: int | None = None
    goaway_on_second: bool = False  # connection 0 answers its 2nd stream with GOAWAY
    port: int = 0
    connections: int = 0
    closed: set[int] = field(default_factory=set)
    received: list[tuple[int, str]] = field(default_factory=list)
    resets: list[tuple[int, str]] = field(default_factory=list)
    _held: dict[str, asyncio.Event] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self, *names: str) -> None:
        for name in names:
            self._held.setdefault(name, asyncio.Event()).set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` holds; checked whenever the app saw something."""
        while not predicate():
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 10)

    def _notify(self) -> None:
        self._changed.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        settings = {}
        if self.max_streams is not None:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = self.max_streams
        conn = server_connection(settings)
        writer.write(conn.data_to_send())
        paths: dict[int, str] = {}
        answers: set[asyncio.Task[None]] = set()
        streams = 0

        async def answer(sid: int, path: str) -> None:
            if path.startswith("/hold/"):
                await self._held.setdefault(path[6:], asyncio.Event()).wait()
            with suppress(h2.exceptions.StreamClosedError):
                conn.send_headers(sid, [(b":status", b"200")])
                conn.send_data(sid, f"{path} on {index}".encode(), end_stream=True)
            writer.write(conn.data_to_send())

        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        assert event.stream_id is not None
                        streams += 1
                        if self.goaway_on_second and index == 0 and streams == 2:
                            conn.close_connection(last_stream_id=min(paths))  # not processed
                            continue
                        path = dict(event.headers or ())[b":path"].decode()
                        paths[event.stream_id] = path
                        self.received.append((index, path))
                    elif isinstance(event, h2.events.DataReceived):
                        assert event.stream_id is not None
                        conn.acknowledge_received_data(
                            event.flow_controlled_length or 0, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        sid = event.stream_id
                        if sid in paths:
                            task = asyncio.ensure_future(answer(sid, paths[sid]))
                            answers.add(task)
                            task.add_done_callback(answers.discard)
                    elif isinstance(event, h2.events.StreamReset) and event.stream_id in paths:
                        self.resets.append((index, paths[event.stream_id]))
                writer.write(conn.data_to_send())
                self._notify()
        except OSError:
            pass
        finally:
            for task in answers:
                task.cancel()
            await asyncio.gather(*answers, return_exceptions=True)
            self.closed.add(index)
            self._notify()
            writer.close()


@asynccontextmanager
async def h2_app(**options: Any) -> AsyncIterator[H2App]:
    app = H2App(**options)
    server = await asyncio.start_server(app.handle, "127.0.0.1", 0)
    app.port = server.sockets[0].getsockname()[1]
    try:
        yield app
    finally:
        server.close()
        await server.wait_closed()


class H2c:
    """A raw h2c client connection (prior knowledge) to the outbound listener; one that
    keeps reading its streams after a GOAWAY, as RFC 9113 §6.8 asks (plain h2 would not)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = client_connection()
        writer.write(self.conn.data_to_send())
        self.goaway = asyncio.Event()  # the proxy's GOAWAY arrived (while a request waited)

    @classmethod
    async def open(cls, port: int) -> H2c:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, path: str, body: bytes = b"") -> Answer:
        """One request at a time: its status (or reset) and body."""
        sid = self.conn.get_next_available_stream_id()
        method = "POST" if body else "GET"
        headers = [(":method", method), (":scheme", "http"), (":authority", "web"),
                   (":path", path)]  # fmt: skip
        self.conn.send_headers(sid, headers, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.writer.write(self.conn.data_to_send())
        status: int | str = 0
        received = b""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            assert data, "the proxy closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    self.goaway.set()
                if event_sid(event) != sid:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers or ())[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.data is not None:
                    received += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length or 0, sid)
                elif isinstance(event, h2.events.StreamEnded):
                    self.writer.write(self.conn.data_to_send())
                    return status, received
                elif isinstance(event, h2.events.StreamReset):
                    assert event.error_code is not None
                    return f"reset:{h2.errors.ErrorCodes(event.error_code).name}", received
            self.writer.write(self.conn.data_to_send())

    async def close(self) -> None:
        self.conn.close_connection()
        self.writer.write(self.conn.data_to_send())
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


def event_sid(event: h2.events.Event) -> int | None:
    return getattr(event, "stream_id", None)


async def requests(port: int, *paths: str) -> list[Answer]:
    """Each path on a client connection of its own, all at once."""
    clients = [await H2c.open(port) for _ in paths]
    try:
        return list(
            await asyncio.gather(*(c.request(p) for c, p in zip(clients, paths, strict=True)))
        )
    finally:
        for client in clients:
            await client.close()


def listener_of(proxy: Running) -> Any:
    (listener,) = proxy.proxy.listeners
    return listener


def sources(inbound: Running) -> set[int]:
    """The mTLS connections (client ports) that carried the inbound's requests."""
    return {r["source"] for r in inbound.records() if r["type"] == "request"}


async def metric(proxy: Running, name: str) -> str:
    """One sample line of ``/metrics`` from the admin server."""
    assert proxy.proxy.admin is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy.admin.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
    text = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    return next(line for line in text.splitlines() if line.startswith(name + "{"))


def test_streams_of_many_client_connections_share_one_connection_on_each_hop(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with h2_app() as app, pair(tmp_path, {"web": app.port}, "http") as (inbound, out):
            port = out.port("to-web")
            paths = [f"/hold/{i}" for i in range(4)]
            pending = asyncio.ensure_future(requests(port, *paths))
            await app.until(lambda: len(app.received) == 4)  # all four in flight at once
            line = await metric(out, "meshid_proxy_h2_upstream_streams")
            assert line.endswith(" 4")
            app.release(*(str(i) for i in range(4)))
            answers = await pending
            assert answers == [(200, f"{p} on 0".encode()) for p in paths]
            assert app.connections == 1  # one h2c connection from the inbound to the app
            assert len(sources(inbound)) == 1  # one mTLS connection between the sidecars
            assert listener_of(out).h2pool.opened == 1
            assert listener_of(inbound).h2pool.opened == 1
            line = await metric(out, "meshid_proxy_h2_upstream_connections")
            assert line == (
                'meshid_proxy_h2_upstream_connections{listener="to-web",direction="outbound"} 1'
            )

    run(main)


def test_a_peer_at_its_stream_limit_gets_a_second_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            h2_app(max_streams=2) as app,
            pair(tmp_path, {"web": app.port}, "http") as (
                inbound,
                out,
            ),
        ):
            paths = ["/hold/a", "/hold/b", "/hold/c"]
            pending = asyncio.ensure_future(requests(out.port("to-web"), *paths))
            await app.until(lambda: len(app.received) == 3)
            assert sorted(index for index, _ in app.received) == [0, 0, 1]
            app.release("a", "b", "c")
            answers = await pending
            assert [status for status, _ in answers] == [200, 200, 200]
            assert app.connections == 2
            assert listener_of(inbound).h2pool.opened == 2
            assert listener_of(out).h2pool.opened == 1  # the inbound allows 128 streams

    run(main)


def test_streams_beyond_the_connection_bound_are_refused_for_the_client_to_retry(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with (
            h2_app(max_streams=1) as app,
            pair(tmp_path, {"web": app.port}, "http", inbound_http={"h2_max_connections": 1}) as (
                _,
                out,
            ),
        ):
            first = await H2c.open(out.port("to-web"))
            held = asyncio.ensure_future(first.request("/hold/a"))
            await app.until(lambda: len(app.received) == 1)
            (refused,) = await requests(out.port("to-web"), "/b")
            assert refused == ("reset:REFUSED_STREAM", b"")
            app.release("a")
            assert await held == (200, b"/hold/a on 0")
            await first.close()
            assert app.connections == 1

    run(main)


def test_a_goaway_sends_unprocessed_streams_to_a_fresh_connection_and_in_flight_ones_finish(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with (
            h2_app(goaway_on_second=True) as app,
            pair(tmp_path, {"web": app.port}, "http") as (inbound, out),
        ):
            port = out.port("to-web")
            first = await H2c.open(port)
            held = asyncio.ensure_future(first.request("/hold/a"))
            await app.until(lambda: len(app.received) == 1)
            # Its stream reaches connection 0 second: GOAWAY, not processed; sent again.
            assert await requests(port, "/b") == [(200, b"/b on 1")]
            assert await requests(port, "/c") == [(200, b"/c on 1")]  # 0 takes no new ones
            app.release("a")
            assert await held == (200, b"/hold/a on 0")  # finished after the GOAWAY
            await first.close()
            await app.until(lambda: 0 in app.closed)  # closed once its last stream ended
            assert app.connections == 2
            results = [r["status"] for r in inbound.records() if r["type"] == "request"]
            assert sorted(results) == [200, 200, 200]

    run(main)


def test_a_goaway_after_the_body_left_answers_502(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            h2_app(goaway_on_second=True) as app,
            pair(tmp_path, {"web": app.port}, "http") as (_, out),
        ):
            port = out.port("to-web")
            first = await H2c.open(port)
            held = asyncio.ensure_future(first.request("/hold/a"))
            await app.until(lambda: len(app.received) == 1)
            second = await H2c.open(port)
            status, _ = await second.request("/b", body=b"x" * 1000)
            await second.close()
            assert status == 502  # its body may have been acted on: not sent twice
            app.release("a")
            assert await held == (200, b"/hold/a on 0")
            await first.close()

    run(main)


def test_a_client_that_vanishes_mid_stream_leaves_other_clients_streams_alone(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with h2_app() as app, pair(tmp_path, {"web": app.port}, "http") as (inbound, out):
            port = out.port("to-web")
            gone, stays = await H2c.open(port), await H2c.open(port)
            lost = asyncio.ensure_future(gone.request("/hold/gone"))
            kept = asyncio.ensure_future(stays.request("/hold/stays"))
            await app.until(lambda: len(app.received) == 2)
            gone.writer.transport.abort()  # no GOAWAY, no RST_STREAM: the socket just goes
            with pytest.raises((AssertionError, OSError)):
                await lost
            await app.until(lambda: (0, "/hold/gone") in app.resets)  # reset on both hops
            app.release("stays")
            assert await kept == (200, b"/hold/stays on 0")
            await stays.close()
            assert app.connections == 1 and not app.closed
            assert len(sources(inbound)) == 1

    run(main)


def test_after_a_rotation_new_streams_take_a_new_connection(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with (
            h2_app() as app,
            pair(tmp_path, {"web": app.port}, "http", ca=ca) as (
                inbound,
                out,
            ),
        ):
            port = out.port("to-web")
            assert await requests(port, "/before") == [(200, b"/before on 0")]
            (old,) = listener_of(out).h2pool.all()
            write_identity(tmp_path / "client", mint(ca, CLIENT), ca)
            out.proxy.reload()  # SIGHUP: the identity files are read again now
            assert await requests(port, "/after") == [(200, b"/after on 0")]
            assert listener_of(out).h2pool.opened == 2
            assert len(sources(inbound)) == 2  # a new mTLS connection, under the new SVID
            await asyncio.wait_for(old.task, 5)  # the idle old one was closed
            assert app.connections == 1  # the inbound's own, to the app, is untouched

    run(main)


def test_a_reload_closes_idle_shared_connections(tmp_path: Path) -> None:
    async def main() -> None:
        async with h2_app() as app, pair(tmp_path, {"web": app.port}, "http") as (inbound, out):
            port = out.port("to-web")
            assert await requests(port, "/one") == [(200, b"/one on 0")]
            (old,) = listener_of(inbound).h2pool.all()
            config = inbound.proxy.config.public_dict()
            config["http"]["keepalive_timeout"] = 30
            await inbound.proxy.apply_config(parse_config(config, "test.yaml", tmp_path))
            await asyncio.wait_for(old.task, 5)
            await app.until(lambda: 0 in app.closed)
            assert await requests(port, "/two") == [(200, b"/two on 1")]

    run(main)


def test_a_drain_lets_streams_in_flight_finish_after_its_goaway(tmp_path: Path) -> None:
    """RFC 9113 §6.8 (h2 itself would close the connection at its own GOAWAY)."""

    async def main() -> None:
        async with h2_app() as app, pair(tmp_path, {"web": app.port}, "http") as (_, out):
            client = await H2c.open(out.port("to-web"))
            held = asyncio.ensure_future(client.request("/hold/a"))
            await app.until(lambda: len(app.received) == 1)
            drained = asyncio.ensure_future(listener_of(out).drain(10))
            await asyncio.wait_for(client.goaway.wait(), 5)
            app.release("a")
            assert await held == (200, b"/hold/a on 0")
            assert await drained == 0  # nothing was left to cancel
            await client.close()

    run(main)
