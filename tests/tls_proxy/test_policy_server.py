"""Policies streamed from the server to a running proxy, in one event loop.

The real node API server (``tests/ca/nodeapi_support.running``: CA service, SQLite, TLS) and real
proxies with file identities minted by that server's CA; an echo app behind the inbound proxy.
client → outbound proxy → mTLS → inbound proxy (``policy: {server: ...}``) → echo.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId

from ca.bundle import to_pem
from ca.datastore import policies as stored
from ca.keys import KeyType, generate_key, private_key_pem
from ca.policies import PolicyStore
from ca.service import CaService, X509Request
from tests.ca.nodeapi_support import Harness, running
from tls_proxy.filters.authz import NO_POLICY_YET
from tls_proxy.policy_source import RETRY_FIRST, RETRY_MAX, retry_delay

from ._harness import Running, echo_app, exchange, inbound_listener
from ._harness import running as proxy_running
from ._pki import CLIENT, WEB

DEADLINE = 1.0  # seconds: a stored change must be enforced by a connected proxy within this

DENY_CLIENT = f"""\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: no-client}}
spec:
  selector: {{spiffe_ids: ["{WEB}"]}}
  action: DENY
  rules:
    - from: [{{source: {{principals: ["{CLIENT}"]}}}}]
"""


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def write_svid(ca: CaService, folder: Path, spiffe_id: str) -> dict[str, str]:
    """An SVID from ``ca`` and its bundle as the three identity files (atomically replaced)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = generate_key(KeyType.EC_P256)
    [svid] = ca.sign_x509_svids(
        [X509Request(SpiffeId(spiffe_id), key.public_key(), ttl=timedelta(hours=1))], "test"
    )
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)
    files = {"cert": chain, "key": private_key_pem(key), "bundle": to_pem(ca.bundle())}
    paths = {}
    for name, data in files.items():
        path = folder / f"{name}.pem"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        paths[name] = str(path)
    return paths


def _inbound(h: Harness, tmp: Path, echo_port: int, **policy: Any) -> dict[str, Any]:
    return {
        "identity": {**write_svid(h.ca, tmp / "web", WEB), "poll_interval": 0.1},
        "admin": {"listen": "127.0.0.1:0"},
        "timeouts": {"drain": 2, "handshake": 5},
        "default_posture": "allow",
        "inbound": [inbound_listener(echo_port)],
        "policy": {"server": h.address, **policy},
    }


def _outbound(h: Harness, tmp: Path, inbound_port: int) -> dict[str, Any]:
    return {
        "identity": {**write_svid(h.ca, tmp / "client", CLIENT), "poll_interval": 0.1},
        "admin": {"listen": "127.0.0.1:0"},
        "timeouts": {"drain": 2, "handshake": 5},
        "outbound": [
            {
                "name": "to-web",
                "listen": "127.0.0.1:0",
                "upstream": [f"127.0.0.1:{inbound_port}"],
                "expect_ids": [WEB],
            }
        ],
    }


async def until(check: Callable[[], Awaitable[bool]], what: str, deadline: float) -> float:
    """Seconds until ``check`` holds, polled; fails after ``deadline`` seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        assert loop.time() - started < deadline, f"not within {deadline} s: {what}"
        await asyncio.sleep(0.02)
    return loop.time() - started


def _revision(proxy: Running) -> int | None:
    assert proxy.proxy.policies is not None
    return proxy.proxy.policies.revision


async def _allowed(port: int) -> bool:
    return await exchange(port, b"ping") == b"ping"


async def _denied(port: int) -> bool:
    return await exchange(port, b"ping") == b""


def test_apply_denies_new_connections_delete_allows_them_open_ones_carry_on(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h, echo_app() as echo:
            policies = PolicyStore(h.ca)
            async with proxy_running(_inbound(h, tmp_path, echo.port), tmp_path) as inbound:
                await until(
                    lambda: asyncio.sleep(0, _revision(inbound) is not None), "first set", 5
                )
                async with proxy_running(
                    _outbound(h, tmp_path, inbound.port("web")), tmp_path
                ) as outbound:
                    port = outbound.port("to-web")
                    assert await _allowed(port)  # no policy stored: posture allow
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"before")
                    assert await reader.readexactly(6) == b"before"

                    await asyncio.to_thread(policies.apply, DENY_CLIENT, "p.yaml", "uid:0")
                    await until(lambda: _denied(port), "deny enforced", DEADLINE)
                    writer.write(b"during")  # decided at its start: it carries on
                    assert await reader.readexactly(6) == b"during"
                    config = inbound.proxy._config()["effective"]
                    assert isinstance(config, dict)
                    assert config["policy_revision"] == await asyncio.to_thread(policies.revision)
                    assert config["policy_server"]["connected"] is True
                    rendered = inbound.proxy.metrics.registry.render()
                    assert f"meshid_proxy_policy_revision {config['policy_revision']}" in rendered

                    await asyncio.to_thread(policies.delete, "no-client", "uid:0")
                    await until(lambda: _allowed(port), "delete enforced", DEADLINE)
                    writer.write(b"after")
                    assert await reader.readexactly(5) == b"after"
                    writer.close()
                    await asyncio.sleep(0.1)
                denied = [r for r in inbound.records() if r["result"] == "denied"]
                assert denied and denied[0]["verdict"]["policy"] == "no-client"

    run(scenario)


def test_fail_closed_until_the_first_set_unless_a_fallback_file(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    allow_all = tmp_path / "fallback.yaml"
    allow_all.write_text(
        "apiVersion: meshid/v1\nkind: AuthorizationPolicy\nmetadata: {name: fallback}\n"
        "spec: {action: ALLOW, rules: [{}]}\n"
    )

    async def scenario() -> None:
        async with running(tmp_path) as h, echo_app() as echo:
            for fallback in (None, allow_all):
                config = _inbound(h, tmp_path, echo.port)
                config["policy"] = {"server": dead}
                if fallback is not None:
                    config["policy"]["fallback_file"] = str(fallback)
                async with proxy_running(config, tmp_path) as inbound:
                    outbound_config = _outbound(h, tmp_path, inbound.port("web"))
                    async with proxy_running(outbound_config, tmp_path) as outbound:
                        reply = await exchange(outbound.port("to-web"), b"ping")
                        await asyncio.sleep(0.1)
                    assert _revision(inbound) is None
                    source = inbound.proxy.policy_source
                    assert source is not None and source.status.last_error is not None
                if fallback is None:
                    assert reply == b""
                    [record] = inbound.records()
                    assert record["verdict"]["reason"].endswith(NO_POLICY_YET)
                else:
                    assert reply == b"ping"
                    [record] = inbound.records()
                    assert record["verdict"]["policy"] == "fallback"

    run(scenario)


def test_a_set_that_fails_to_parse_keeps_the_last_good_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h, echo_app() as echo:
            policies = PolicyStore(h.ca)
            await asyncio.to_thread(policies.apply, DENY_CLIENT, "p.yaml", "uid:0")
            async with proxy_running(_inbound(h, tmp_path, echo.port), tmp_path) as inbound:
                await until(
                    lambda: asyncio.sleep(0, _revision(inbound) is not None), "first set", 5
                )
                good = _revision(inbound)

                def store_broken() -> None:  # as a newer server version might have written it
                    with h.ca.store.write() as tx:
                        stored.upsert(tx, "broken", {"kind": "Nope"}, h.ca.clock())
                    h.ca.notify_changed()

                await asyncio.to_thread(store_broken)
                store = inbound.proxy.policies
                assert store is not None
                await until(
                    lambda: asyncio.sleep(0, store.last_error is not None), "refused", DEADLINE
                )
                assert "server policy broken" in (store.last_error or "")
                assert store.revision == good
                async with proxy_running(
                    _outbound(h, tmp_path, inbound.port("web")), tmp_path
                ) as outbound:
                    assert await _denied(outbound.port("to-web"))  # the DENY still holds

    run(scenario)


def test_stopped_server_keeps_the_set_and_rotation_reconnects(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h, echo_app() as echo:
            await asyncio.to_thread(PolicyStore(h.ca).apply, DENY_CLIENT, "p.yaml", "uid:0")
            async with proxy_running(_inbound(h, tmp_path, echo.port), tmp_path) as inbound:
                source = inbound.proxy.policy_source
                assert source is not None
                await until(lambda: asyncio.sleep(0, source.status.connected), "connected", 5)
                received = source.status.sets_received
                write_svid(h.ca, tmp_path / "web", WEB)  # rotation: a new SVID on disk
                await until(
                    lambda: asyncio.sleep(0, source.status.sets_received > received),
                    "a new stream with the rotated SVID",
                    5,
                )
                await h.server.stop(grace=2.0)
                await until(lambda: asyncio.sleep(0, not source.status.connected), "cut off", 5)
                async with proxy_running(
                    _outbound(h, tmp_path, inbound.port("web")), tmp_path
                ) as outbound:
                    assert await _denied(outbound.port("to-web"))  # last good set kept
                assert _revision(inbound) is not None

    run(scenario)


def test_retry_delay_is_jittered_and_capped() -> None:
    import random

    rng = random.Random(7)
    delays = [retry_delay(attempt, rng) for attempt in range(40)]
    assert all(RETRY_FIRST / 2 <= d <= RETRY_MAX for d in delays)
    assert len({round(d, 6) for d in delays}) == len(delays)  # jitter: no two alike
    assert max(delays[:3]) <= RETRY_FIRST * 4
    assert json.dumps(delays)  # plain floats
