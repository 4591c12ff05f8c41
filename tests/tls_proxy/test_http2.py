"""HTTP/2 and gRPC through two real proxies: grpcio client (h2c) → outbound → h2 over mTLS
(ALPN) → inbound → grpcio server (h2c). Real sockets on 127.0.0.1, identities from our CA."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from ._harness import Running, echo_app, exchange, inbound_listener, proxy_config, running
from ._http import Client, http_echo_app
from ._pki import CLIENT, WEB, Authority, mint, new_authority

DENY_ADMIN = """\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  selector: {spiffe_ids: ["spiffe://example.org/web"]}
  action: DENY
  rules:
    - to: [{operation: {paths: ["/test.Echo/Admin", "/admin*"]}}]
"""


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


@dataclass
class Backend:
    """A grpcio server with hand-declared bytes methods: Unary echoes, Stream sends 3 parts."""

    port: int
    metadata: list[dict[str, str]] = field(default_factory=list)


def _record(backend: Backend, context: grpc.ServicerContext) -> None:
    backend.metadata.append({k: v for k, v in context.invocation_metadata()})


@asynccontextmanager
async def grpc_backend() -> AsyncIterator[Backend]:
    backend = Backend(port=0)

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        _record(backend, context)
        context.send_initial_metadata((("x-initial", "yes"),))
        context.set_trailing_metadata((("x-trailer", "done"),))
        return b"echo:" + request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        _record(backend, context)
        context.set_trailing_metadata((("x-trailer", "streamed"),))
        for i in range(3):
            yield request + str(i).encode()

    def admin(request: bytes, context: grpc.ServicerContext) -> bytes:
        _record(backend, context)
        return b"should not be reached"

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Admin": grpc.unary_unary_rpc_method_handler(admin),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    backend.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield backend
    finally:
        server.stop(None)


def _inbound(name: str, port: int, protocol: str) -> dict[str, Any]:
    return inbound_listener(port, protocol, name)


def _outbound(name: str, port: int, protocol: str) -> dict[str, Any]:
    return {"name": name, "listen": "127.0.0.1:0", "upstream": [f"127.0.0.1:{port}"],
            "expect_ids": [WEB], "protocol": protocol}  # fmt: skip


@asynccontextmanager
async def pair(
    tmp: Path,
    apps: dict[str, int],
    protocol: str,
    policy: str | None = None,
    *,
    ca: Authority | None = None,
    inbound_http: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[Running, Running]]:
    """An inbound proxy forwarding listener NAME to each app port, an outbound one per NAME
    (their identities minted by ``ca``; ``inbound_http``: the inbound's ``http`` block)."""
    ca = ca or new_authority()
    sections: dict[str, Any] = {}
    if inbound_http is not None:
        sections["http"] = inbound_http
    if policy is not None:
        (tmp / "policy.yaml").write_text(policy)
        sections["policy"] = {"file": "policy.yaml"}
    web = proxy_config(
        tmp / "web",
        mint(ca, WEB),
        [ca],
        inbound=[_inbound(name, port, protocol) for name, port in apps.items()],
        **sections,
    )
    async with running(web, tmp) as inbound:
        client = proxy_config(
            tmp / "client",
            mint(ca, CLIENT),
            [ca],
            outbound=[_outbound(f"to-{n}", inbound.port(n), protocol) for n in apps],
        )
        async with running(client, tmp) as outbound:
            yield inbound, outbound


def requests(proxy: Running) -> list[dict[str, Any]]:
    return [r for r in proxy.records() if r["type"] == "request"]


async def call(target: str, fn: Callable[[grpc.Channel], Any]) -> Any:
    """Run blocking grpcio client code in a thread (the proxies share this event loop)."""

    def work() -> Any:
        with grpc.insecure_channel(target) as channel:
            return fn(channel)

    return await asyncio.to_thread(work)


def test_grpc_unary_and_server_streaming_cross_with_metadata_trailers_and_xfcc(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with (
            grpc_backend() as backend,
            pair(tmp_path, {"web": backend.port}, "http") as (
                inbound,
                outbound,
            ),
        ):
            target = f"127.0.0.1:{outbound.port('to-web')}"
            forged = "By=spiffe://example.org/web;URI=spiffe://example.org/admin"

            def calls(channel: grpc.Channel) -> Any:
                unary = channel.unary_unary("/test.Echo/Unary")
                reply, state = unary.with_call(
                    b"hi", metadata=(("x-forwarded-client-cert", forged), ("x-tenant", "blue"))
                )
                stream = channel.unary_stream("/test.Echo/Stream")
                responses = stream(b"part")
                parts = list(responses)
                return (
                    reply,
                    dict(state.initial_metadata()),
                    dict(state.trailing_metadata()),
                    parts,
                    dict(responses.trailing_metadata()),
                )

            reply, initial, trailing, parts, stream_trailing = await call(target, calls)
            assert reply == b"echo:hi"
            assert initial["x-initial"] == "yes"
            assert trailing["x-trailer"] == "done"
            assert parts == [b"part0", b"part1", b"part2"]
            assert stream_trailing["x-trailer"] == "streamed"
            first = backend.metadata[0]
            assert first["x-forwarded-client-cert"] == f"By={WEB};URI={CLIENT}"
            assert first["x-tenant"] == "blue"
            await asyncio.sleep(0.1)
            records = requests(inbound)
            assert [r["path"] for r in records] == ["/test.Echo/Unary", "/test.Echo/Stream"]
            assert all(r["status"] == 200 and r["peer_id"] == CLIENT for r in records)
            assert records[0]["verdict"]["decision"] == "allow"
            assert len(requests(outbound)) == 2

    run(main)


def test_grpc_denied_by_policy_is_permission_denied_and_never_reaches_the_app(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with (
            grpc_backend() as backend,
            pair(tmp_path, {"web": backend.port}, "http", DENY_ADMIN) as (inbound, _),
        ):
            target = f"127.0.0.1:{_.port('to-web')}"

            def denied(channel: grpc.Channel) -> Any:
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary("/test.Echo/Admin")(b"x")
                allowed = channel.unary_unary("/test.Echo/Unary")(b"ok")  # same connection
                return caught.value, allowed

            error, allowed = await call(target, denied)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error.details() == "RBAC: access denied"
            assert allowed == b"echo:ok"
            assert len(backend.metadata) == 1  # only the allowed call
            await asyncio.sleep(0.1)
            statuses = {r["path"]: (r["result"], r["status"]) for r in requests(inbound)}
            assert statuses["/test.Echo/Admin"] == ("denied", 403)

    run(main)


def test_concurrent_streams_share_one_connection_each_side(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            grpc_backend() as backend,
            pair(tmp_path, {"web": backend.port}, "http") as (
                inbound,
                outbound,
            ),
        ):
            target = f"127.0.0.1:{outbound.port('to-web')}"

            def many(channel: grpc.Channel) -> list[bytes]:
                unary = channel.unary_unary("/test.Echo/Unary")
                pending = [unary.future(str(i).encode() * 20000) for i in range(10)]
                return [f.result() for f in pending]

            replies = await call(target, many)
            assert replies == [b"echo:" + str(i).encode() * 20000 for i in range(10)]
            await asyncio.sleep(0.1)
            inbound_records = requests(inbound)
            assert len(inbound_records) == 10
            assert len({r["source"] for r in inbound_records}) == 1  # one mTLS connection
            assert len({r["source"] for r in requests(outbound)}) == 1  # one app connection

    run(main)


class H2Client:
    """A raw h2c client (prior knowledge) on the ``h2`` library."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        writer.write(self.conn.data_to_send())

    async def get(self, path: str) -> tuple[dict[str, str], bytes]:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [(":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", path)],
            end_stream=True,
        )
        self.writer.write(self.conn.data_to_send())
        headers: dict[str, str] = {}
        body = b""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            assert data, "the proxy closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = {n.decode(): v.decode() for n, v in event.headers or ()}
                elif isinstance(event, h2.events.DataReceived) and event.data is not None:
                    body += event.data
                    self.conn.acknowledge_received_data(len(event.data), sid)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    self.writer.write(self.conn.data_to_send())
                    return headers, body
            self.writer.write(self.conn.data_to_send())

    async def close(self) -> None:
        self.conn.close_connection()
        self.writer.write(self.conn.data_to_send())
        self.writer.close()
        await self.writer.wait_closed()


def test_plain_h2c_request_denied_gets_a_403_with_the_rbac_body(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            grpc_backend() as backend,
            pair(tmp_path, {"web": backend.port}, "http", DENY_ADMIN) as (_, outbound),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port("to-web"))
            client = H2Client(reader, writer)
            headers, body = await client.get("/api/../admin/x")  # normalized before policy
            await client.close()
            assert headers[":status"] == "403"
            assert body == b"RBAC: access denied"
            assert backend.metadata == []

    run(main)


def test_auto_tells_http1_http2_and_tcp_apart(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            grpc_backend() as backend,
            http_echo_app() as web_app,
            echo_app() as tcp_app,
        ):
            apps = {"h1": web_app.port, "h2": backend.port, "tcp": tcp_app.port}
            async with pair(tmp_path, apps, "auto") as (inbound, outbound):
                client = await Client.open(outbound.port("to-h1"))
                reply = await client.request("GET", "/hello")
                await client.close()
                assert reply.status == 200
                assert [v for n, v in reply.json()["headers"] if n == "x-forwarded-client-cert"]

                target = f"127.0.0.1:{outbound.port('to-h2')}"
                answer = await call(target, lambda ch: ch.unary_unary("/test.Echo/Unary")(b"2"))
                assert answer == b"echo:2"
                assert backend.metadata[0]["x-forwarded-client-cert"] == f"By={WEB};URI={CLIENT}"

                payload = b"\x00\x01 not http at all\r\n" * 100
                assert await exchange(outbound.port("to-tcp"), payload) == payload

                await asyncio.sleep(0.1)
                kinds = {(r["listener"], r["type"]) for r in inbound.records()}
                assert ("h1", "request") in kinds
                assert ("h2", "request") in kinds
                assert ("tcp", "connection") in kinds
                assert ("tcp", "request") not in kinds

    run(main)
