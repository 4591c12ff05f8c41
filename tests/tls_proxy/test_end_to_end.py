"""Two proxies, real mTLS on 127.0.0.1, identities from files minted by our CA code.

client → outbound proxy (plain) → mTLS → inbound proxy → echo app (plain).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ._harness import (
    client_context,
    echo_app,
    exchange,
    proxy_config,
    running,
    tls_exchange,
)
from ._pki import CLIENT, WEB, Authority, mint, new_authority, write_identity

DENY_CLIENT = """\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {name: no-client}
spec:
  selector: {spiffe_ids: ["spiffe://example.org/web"]}
  action: DENY
  rules:
    - from: [{source: {principals: ["spiffe://example.org/client"]}}]
"""


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


def _configs(
    tmp: Path, ca: Authority, echo_port: int, *, expect: str = WEB, **inbound_sections: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    web = proxy_config(
        tmp / "web",
        mint(ca, WEB),
        [ca],
        inbound=[{"name": "web", "listen": "127.0.0.1:0", "forward": f"127.0.0.1:{echo_port}"}],
        **inbound_sections,
    )
    return web, {}


def _client_config(tmp: Path, ca: Authority, inbound_port: int, expect: str) -> dict[str, Any]:
    return proxy_config(
        tmp / "client",
        mint(ca, CLIENT),
        [ca],
        outbound=[
            {
                "name": "to-web",
                "listen": "127.0.0.1:0",
                "upstream": [f"127.0.0.1:{inbound_port}"],
                "expect_ids": [expect],
            }
        ],
    )


def test_bytes_cross_and_inbound_sees_verified_peer(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port)
            async with running(web, tmp_path) as inbound:
                client = _client_config(tmp_path, ca, inbound.port("web"), WEB)
                async with running(client, tmp_path) as outbound:
                    payload = b"hello through the mesh " * 1000
                    assert await exchange(outbound.port("to-web"), payload) == payload
                    await asyncio.sleep(0.2)  # let both sides log the close
                (record,) = [r for r in inbound.records() if r["listener"] == "web"]
                assert record["peer_id"] == CLIENT
                assert record["local_id"] == WEB
                assert record["result"] == "allowed"
                assert record["verdict"]["decision"] == "allow"
                assert record["bytes_in"] == len(payload) == record["bytes_out"]
                (out,) = outbound.records()
                assert out["peer_id"] == WEB
                metrics = inbound.proxy.metrics
                assert (
                    metrics.connections.value(listener="web", direction="inbound", result="allowed")
                    == 1
                )

    run(main)


def test_active_connections_count_what_is_open_now(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port)
            async with running(web, tmp_path) as inbound:
                client = _client_config(tmp_path, ca, inbound.port("web"), WEB)
                async with running(client, tmp_path) as outbound:
                    active = inbound.proxy.metrics.active
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", outbound.port("to-web")
                    )
                    writer.write(b"ping")
                    assert await reader.readexactly(4) == b"ping"  # authenticated, relaying
                    assert active.value(listener="web", direction="inbound") == 1
                    assert (
                        outbound.proxy.metrics.active.value(listener="to-web", direction="outbound")
                        == 1
                    )
                    writer.close()
                    await writer.wait_closed()
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 5
                    while active.value(listener="web", direction="inbound") != 0:
                        assert loop.time() < deadline, "the closed connection is still counted"
                        await asyncio.sleep(0.02)
                    # a refused handshake is never counted, so it cannot drive the gauge negative
                    assert await exchange(inbound.port("web"), b"plain, no TLS") == b""
                    assert active.value(listener="web", direction="inbound") == 0

    run(main)


def test_client_without_certificate_or_from_another_ca_is_refused(tmp_path: Path) -> None:
    ca = new_authority()
    stranger = new_authority()  # claims example.org too

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port)
            async with running(web, tmp_path) as inbound:
                port = inbound.port("web")
                good = client_context(mint(ca, CLIENT), ca, tmp_path)
                assert await tls_exchange(port, good, b"ping") == b"ping"
                bare = client_context(None, ca, tmp_path)
                assert await tls_exchange(port, bare, b"ping") == b""
                foreign = client_context(mint(stranger, CLIENT), ca, tmp_path)
                assert await tls_exchange(port, foreign, b"ping") == b""
                await asyncio.sleep(0.2)
                errors = sorted(r["error"] or "" for r in inbound.records())
                assert errors == ["", "no_client_certificate", "unknown_ca"]
                failures = inbound.proxy.metrics.tls_failures
                assert failures.value(listener="web", direction="inbound", reason="unknown_ca") == 1

    run(main)


def test_outbound_refuses_an_upstream_with_an_unexpected_id(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port)
            async with running(web, tmp_path) as inbound:
                client = _client_config(
                    tmp_path, ca, inbound.port("web"), "spiffe://example.org/db"
                )
                async with running(client, tmp_path) as outbound:
                    assert await exchange(outbound.port("to-web"), b"secret") == b""
                    await asyncio.sleep(0.1)
                (record,) = outbound.records()
                assert record["error"] == "unexpected_id"
                assert record["result"] == "rejected"
                assert echo.open_writers == set()

    run(main)


def test_outbound_fails_over_to_the_next_upstream(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port)
            async with running(web, tmp_path) as inbound:
                client = _client_config(tmp_path, ca, inbound.port("web"), WEB)
                dead = "127.0.0.1:1"  # nothing listens on port 1
                client["outbound"][0]["upstream"] = [dead, f"127.0.0.1:{inbound.port('web')}"]
                async with running(client, tmp_path) as outbound:
                    for _ in range(2):  # round robin starts on each upstream once
                        assert await exchange(outbound.port("to-web"), b"x") == b"x"

    run(main)


def test_l4_deny_policy_closes_the_connection(tmp_path: Path) -> None:
    ca = new_authority()
    (tmp_path / "policy.yaml").write_text(DENY_CLIENT)

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port, policy={"file": "policy.yaml"})
            async with running(web, tmp_path) as inbound:
                client = _client_config(tmp_path, ca, inbound.port("web"), WEB)
                async with running(client, tmp_path) as outbound:
                    assert await exchange(outbound.port("to-web"), b"ping") == b""
                    await asyncio.sleep(0.1)
                (record,) = inbound.records()
                assert record["result"] == "denied"
                assert record["verdict"]["policy"] == "no-client"

    run(main)


def test_unparsable_policy_fails_closed_and_a_bad_reload_keeps_the_last_good(
    tmp_path: Path,
) -> None:
    ca = new_authority()
    policy = tmp_path / "policy.yaml"
    policy.write_text("kind: [unclosed")

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port, policy={"file": str(policy)})
            async with running(web, tmp_path) as inbound:
                store = inbound.proxy.policies
                assert store is not None
                port = inbound.port("web")
                good = client_context(mint(ca, CLIENT), ca, tmp_path)
                assert await tls_exchange(port, good, b"ping") == b""  # fail closed
                policy.write_text(DENY_CLIENT.replace("DENY", "ALLOW"))
                assert store.reload()
                assert await tls_exchange(port, good, b"ping") == b"ping"
                policy.write_text("apiVersion: meshid/v1\nkind: Nope\n")
                assert not store.reload()
                assert store.last_error is not None
                assert await tls_exchange(port, good, b"ping") == b"ping"  # last good kept

    run(main)


def test_rotation_keeps_open_connections_and_new_ones_use_the_new_svid(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port)
            async with running(web, tmp_path) as inbound:
                client = _client_config(tmp_path, ca, inbound.port("web"), WEB)
                async with running(client, tmp_path) as outbound:
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", outbound.port("to-web")
                    )
                    writer.write(b"before")
                    assert await reader.readexactly(6) == b"before"
                    first = inbound.proxy.identity.current().cert_chain[0]
                    write_identity(tmp_path / "web", mint(ca, WEB), ca)
                    for _ in range(50):
                        await asyncio.sleep(0.1)
                        if inbound.proxy.identity.current().cert_chain[0] != first:
                            break
                    rotated = inbound.proxy.identity.current().cert_chain[0]
                    assert rotated != first
                    writer.write(b"after")  # the old connection carries on
                    assert await reader.readexactly(5) == b"after"
                    writer.close()
                    # A new handshake presents the new certificate.
                    context = client_context(mint(ca, CLIENT), ca, tmp_path)
                    _r2, w2 = await asyncio.open_connection(
                        "127.0.0.1", inbound.port("web"), ssl=context
                    )
                    presented = w2.get_extra_info("ssl_object").getpeercert(binary_form=True)
                    w2.close()
                    assert presented == rotated
                    assert inbound.proxy.metrics.rotations.value() == 1

    run(main)


def test_a_handshake_accepted_before_a_rotation_presents_the_new_svid(tmp_path: Path) -> None:
    """The certificate is picked at the ClientHello: a connection accepted before a rotation
    whose handshake starts after it (a backlog of handshakes) gets the current SVID, not the
    one of the moment it was accepted, which may have expired by then."""
    ca = new_authority()

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port)
            async with running(web, tmp_path) as inbound:
                loop = asyncio.get_running_loop()
                reader, writer = await asyncio.open_connection("127.0.0.1", inbound.port("web"))
                await asyncio.sleep(0)  # accepted: the proxy holds its TLS state from now
                first = inbound.proxy.identity.current().cert_chain[0]
                write_identity(tmp_path / "web", mint(ca, WEB), ca)
                inbound.proxy.reload()  # SIGHUP: re-read the identity files now
                rotated = inbound.proxy.identity.current().cert_chain[0]
                assert rotated != first
                context = client_context(mint(ca, CLIENT), ca, tmp_path)
                transport = await loop.start_tls(
                    writer.transport, writer.transport.get_protocol(), context
                )
                assert transport is not None
                presented = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
                transport.close()
                del reader
                assert presented == rotated

    run(main)


def test_an_idle_l4_connection_is_closed_and_a_busy_one_is_not(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with echo_app() as echo:
            web, _ = _configs(tmp_path, ca, echo.port)
            web["timeouts"] = {**web.get("timeouts", {}), "idle": 0.5}
            async with running(web, tmp_path) as inbound:
                client = _client_config(tmp_path, ca, inbound.port("web"), WEB)
                async with running(client, tmp_path) as outbound:
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", outbound.port("to-web")
                    )
                    for _ in range(4):  # traffic every 0.2 s keeps it alive past the 0.5 s limit
                        writer.write(b"ping")
                        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
                        await asyncio.sleep(0.2)
                    # Now silent: the inbound closes it after 0.5 s and the client sees EOF.
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                    writer.close()
                await asyncio.sleep(0.2)  # let the inbound write its access-log line
                closed = [r for r in inbound.records() if r["listener"] == "web"]
                assert closed and closed[-1]["error"] == "idle_timeout"

    run(main)
