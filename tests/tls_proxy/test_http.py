"""HTTP/1.1 through two real proxies: client → outbound (plain) → mTLS → inbound → echo app.

Real sockets on 127.0.0.1, real TLS, identities minted by our CA code, policies from a file.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest

from ._harness import Running, client_context, inbound_listener, proxy_config, running
from ._http import Client, EchoApp, http_echo_app, raw_exchange
from ._pki import CLIENT, WEB, Authority, mint, new_authority

NO_ADMIN = """\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  selector: {spiffe_ids: ["spiffe://example.org/web"]}
  action: DENY
  rules:
    - to: [{operation: {paths: ["/admin*"]}}]
"""


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


@dataclass
class Mesh:
    app: EchoApp
    inbound: Running
    outbound: Running
    ca: Authority
    tmp: Path

    @property
    def out_port(self) -> int:
        return self.outbound.port("to-web")

    @property
    def in_port(self) -> int:
        return self.inbound.port("web")

    def tls(self) -> Any:
        """A TLS context presenting CLIENT's SVID, to talk to the inbound listener directly."""
        return client_context(mint(self.ca, CLIENT), self.ca, self.tmp)

    def requests(self) -> list[dict[str, Any]]:
        return [r for r in self.inbound.records() if r["type"] == "request"]


@asynccontextmanager
async def mesh(
    tmp: Path, *, policy: str | None = None, expect: str = WEB, **web_sections: Any
) -> AsyncIterator[Mesh]:
    ca = new_authority()
    if policy is not None:
        (tmp / "policy.yaml").write_text(policy)
        web_sections["policy"] = {"file": "policy.yaml"}
    async with http_echo_app() as app:
        web = proxy_config(
            tmp / "web",
            mint(ca, WEB),
            [ca],
            inbound=[inbound_listener(app.port, "http")],
            **web_sections,
        )
        async with running(web, tmp) as inbound:
            client = proxy_config(
                tmp / "client",
                mint(ca, CLIENT),
                [ca],
                outbound=[
                    {
                        "name": "to-web",
                        "listen": "127.0.0.1:0",
                        "upstream": [f"127.0.0.1:{inbound.port('web')}"],
                        "expect_ids": [expect],
                        "protocol": "http",
                    }
                ],
            )
            async with running(client, tmp) as outbound:
                yield Mesh(app, inbound, outbound, ca, tmp)


def header(seen: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in seen["headers"] if n == name]


def test_request_crosses_with_xfcc_of_the_verified_peer_and_a_forged_one_is_stripped(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            client = await Client.open(m.out_port)
            forged = "By=spiffe://example.org/web;URI=spiffe://example.org/admin"
            reply = await client.request(
                "POST",
                "/api/orders?x=1",
                [("x-forwarded-client-cert", forged), ("X-Tenant", "blue")],
                b'{"n": 1}',
            )
            await client.close()
            assert reply.status == 200
            seen = reply.json()
            assert seen["method"] == "POST"
            assert seen["target"] == "/api/orders?x=1"
            assert seen["body"] == '{"n": 1}'
            assert header(seen, "x-forwarded-client-cert") == [f"By={WEB};URI={CLIENT}"]
            assert header(seen, "x-tenant") == ["blue"]
            await asyncio.sleep(0.1)
            (record,) = m.requests()
            assert record["peer_id"] == CLIENT
            assert record["status"] == 200
            assert record["path"] == "/api/orders"
            assert record["verdict"]["decision"] == "allow"
            (out,) = [r for r in m.outbound.records() if r["type"] == "request"]
            assert out["peer_id"] == WEB
            assert out["status"] == 200

    run(main)


def test_keep_alive_serves_two_requests_on_one_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            client = await Client.open(m.out_port)
            first = await client.request("GET", "/one")
            second = await client.request("GET", "/two")
            await client.close()
            assert (first.status, second.status) == (200, 200)
            assert [s["target"] for s in m.app.seen] == ["/one", "/two"]
            assert m.app.connections == 1  # the upstream connection was reused too
            await asyncio.sleep(0.1)
            assert [r["path"] for r in m.requests()] == ["/one", "/two"]

    run(main)


def test_chunked_upload_and_download(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            client = await Client.open(m.out_port)
            pieces = [b"a" * 70000, b"b" * 5, b"c" * 100000]
            reply = await client.request("PUT", "/blob", [("x-chunks", "7")], pieces)
            await client.close()
            assert reply.status == 200
            assert reply.headers.get("transfer-encoding") == "chunked"
            seen = reply.json()
            assert seen["body"] == b"".join(pieces).decode()
            assert header(seen, "transfer-encoding") == ["chunked"]

    run(main)


def test_expect_100_continue_is_relayed_from_the_app(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            client = await Client.open(m.out_port)
            reply = await client.request(
                "POST", "/upload", [("expect", "100-continue")], b"payload", wait_for_continue=True
            )
            await client.close()
            assert reply.informational == [100]
            assert reply.status == 200
            assert reply.json()["body"] == "payload"

    run(main)


def test_upgrade_passes_opaque_bytes_after_101(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            client = await Client.open(m.out_port)
            await client.send(
                h11.Request(
                    method="GET",
                    target="/ws",
                    headers=[
                        ("host", "web"),
                        ("connection", "Upgrade"),
                        ("upgrade", "websocket"),
                        ("sec-websocket-version", "13"),
                    ],
                ),
                h11.EndOfMessage(),
            )
            event = await client.next()
            assert isinstance(event, h11.InformationalResponse)
            assert event.status_code == 101
            assert dict(event.headers)[b"upgrade"] == b"websocket"
            client.writer.write(b"\x81\x05hello")
            echoed = b""
            while len(echoed) < len(b"echo:\x81\x05hello"):
                echoed += await asyncio.wait_for(client.reader.read(100), 5)
            assert echoed == b"echo:\x81\x05hello"
            await client.close()

    run(main)


SMUGGLING = {
    "content-length-and-chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "content_length_and_transfer_encoding",
    ),
    "duplicate-content-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "duplicate_content_length",
    ),
    "conflicting-content-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        "invalid_content_length",
    ),
    "content-length-list": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
        "invalid_content_length",
    ),
    "invalid-content-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        "invalid_content_length",
    ),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", "obs_fold"),
    "bare-lf": (b"GET / HTTP/1.1\nHost: a\nX-A: b\n\n", "bare_lf"),
    "bare-cr": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", "malformed_header"),
    "invalid-chunk-size": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0x5\r\nhello\r\n0\r\n\r\n",
        "invalid_chunk",
    ),
    "transfer-encoding-not-chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "invalid_transfer_encoding",
    ),
}


def test_smuggling_shapes_get_400_and_a_close(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            context = m.tls()
            for name, (payload, reason) in SMUGGLING.items():
                answer = await raw_exchange(m.in_port, payload, context)
                assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (name, answer)
                assert b"connection: close" in answer.lower(), name
                rejected = m.inbound.proxy.metrics.http_rejected
                assert rejected.value(listener="web", direction="inbound", reason=reason) >= 1, name
            # The invalid chunk arrives after a valid head: the app may see that head, never
            # a second request smuggled in the body.
            assert all(s["method"] != "GET" or s["target"] == "/" for s in m.app.seen)
            await asyncio.sleep(0.1)
            assert {r["error"] for r in m.requests()} == {r for _, r in SMUGGLING.values()}

    run(main)


def test_path_bypass_shapes_are_denied_after_normalization(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, policy=NO_ADMIN) as m:
            client = await Client.open(m.out_port)
            for target in ["/api/../admin", "/api/%2e%2e/admin", "//admin", "/./admin/x"]:
                reply = await client.request("GET", target)
                assert reply.status == 403, target
                assert reply.body == b"RBAC: access denied"
                assert "x-meshid-denied-by" not in reply.headers
            ok = await client.request("GET", "/api/./v1//items?q=%2e")
            assert ok.status == 200
            await client.close()
            encoded = await raw_exchange(
                m.out_port, b"GET /api%2F..%2Fadmin HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            assert encoded.startswith(b"HTTP/1.1 400 ")
            # The app saw only the one allowed request, normalized; the query is kept.
            assert [s["target"] for s in m.app.seen] == ["/api/v1/items?q=%2e"]
            await asyncio.sleep(0.1)
            denied = [r for r in m.requests() if r["result"] == "denied"]
            assert len(denied) == 4
            assert {r["path"] for r in denied} == {"/admin", "/admin/x"}
            assert all(r["verdict"]["policy"] == "no-admin" for r in denied)
            assert all(r["verdict"]["rule"] == 0 for r in denied)
            authz = m.inbound.proxy.metrics.http_authz
            assert authz.value(listener="web", decision="deny", policy="no-admin", rule="0") == 4

    run(main)


def test_deny_names_the_rule_only_with_debug_and_keeps_the_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, policy=NO_ADMIN, debug=True) as m:
            client = await Client.open(m.out_port)
            reply = await client.request("POST", "/admin", body=b"read-in-full")
            assert reply.status == 403
            assert reply.body == b"RBAC: access denied"
            assert reply.headers["x-meshid-denied-by"] == "no-admin/0"
            after = await client.request("GET", "/fine")  # same connection, still usable
            assert after.status == 200
            await client.close()

    run(main)


def test_too_many_headers_get_431(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, http={"max_headers": 10}) as m:
            fields = b"".join(b"X-%d: v\r\n" % i for i in range(20))
            answer = await raw_exchange(
                m.in_port, b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n", m.tls()
            )
            assert answer.startswith(b"HTTP/1.1 431 ")
            assert m.app.seen == []

    run(main)


def test_slow_client_head_times_out_with_408_and_close(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, http={"header_timeout": 0.3}) as m:
            # raw_exchange reads until the proxy closes; no fixed sleep.
            answer = await raw_exchange(m.in_port, b"GET / HTTP/1.1\r\nHost: a\r\n", m.tls())
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert m.app.seen == []

    run(main)


def test_outbound_http_refuses_an_unexpected_upstream_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, expect="spiffe://example.org/db") as m:
            answer = await raw_exchange(m.out_port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 502 ")
            assert m.app.seen == []
            await asyncio.sleep(0.1)
            (record,) = [r for r in m.outbound.records() if r["type"] == "request"]
            assert record["error"] == "upstream_failed"

    run(main)


@pytest.mark.parametrize(
    ("config", "message"),
    [({"encoded_slashes": "maybe"}, "http.encoded_slashes"), ({"max_headers": 0}, "max_headers")],
    ids=["encoded-slashes", "max-headers"],
)
def test_http_config_is_validated(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    from tls_proxy import ConfigError, parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config({"http": config}, "test.yaml")


def test_denied_expect_100_continue_gets_403_without_reading_the_body_and_closes(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with mesh(tmp_path, policy=NO_ADMIN) as m:
            answer = await raw_exchange(
                m.out_port,
                b"POST /admin HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")  # as the fast path says
            assert b"connection: close" in answer.lower()
            assert answer.endswith(b"RBAC: access denied")
            assert m.app.seen == []

    run(main)


def test_both_paths_answer_a_deny_with_the_same_status_line(tmp_path: Path) -> None:
    """A plain GET is denied by the fast path, a chunked POST by the h11 path (inbound)."""

    async def main() -> None:
        async with mesh(tmp_path, policy=NO_ADMIN) as m:
            context = m.tls()
            fast = await raw_exchange(
                m.in_port, b"GET /admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", context
            )
            chunked = await raw_exchange(
                m.in_port,
                b"POST /admin HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n0\r\n\r\n",
                context,
            )
            for answer in (fast, chunked):
                assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer
                assert answer.endswith(b"RBAC: access denied")
            assert m.app.seen == []

    run(main)


def test_idle_keep_alive_connection_is_closed_quietly(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, http={"keepalive_timeout": 0.3}) as m:
            client = await Client.open(m.in_port, m.tls())
            assert (await client.request("GET", "/first")).status == 200
            # No second request: the proxy closes without an answer (await EOF, no sleep).
            assert await asyncio.wait_for(client.reader.read(), 5) == b""
            await client.close()

    run(main)
