"""Configuration reload of a running proxy: listeners added, removed, moved and changed, filter
settings and policy taken live, what needs a restart refused, and no open connection dropped.

The inbound proxy runs with ``config_path`` (as ``meshid proxy run`` does) and is reloaded by
``reload_config_file`` (what SIGHUP and the file watch call); a client reaches it through an
outbound proxy that is not reloaded. Apps answer with their name, so a test can tell where a
connection went.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.processes import free_port
from tls_proxy import Proxy, load_config

from ._harness import Running, proxy_config, running, serving
from ._pki import CLIENT, WEB, Authority, mint, new_authority
from .test_policy_server import DENY_CLIENT, until

TIMEOUT = 5.0


@asynccontextmanager
async def named_app(name: bytes) -> AsyncIterator[int]:
    """An app that greets each connection with ``name`` and then echoes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name + b":")
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async with serving(handle) as app:
        yield app.port


class Line:
    """One client connection through the outbound proxy; ``say`` sends and reads the echo."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> tuple[Line, bytes]:
        """The connection and the name of the app it reached."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"?")
            greeting = await asyncio.wait_for(reader.readuntil(b":"), TIMEOUT)
            assert await asyncio.wait_for(reader.readexactly(1), TIMEOUT) == b"?"
        except BaseException:
            writer.close()
            await writer.wait_closed()
            raise
        return cls(reader, writer), greeting[:-1]

    async def say(self, payload: bytes) -> bytes:
        self.writer.write(payload)
        return await asyncio.wait_for(self.reader.readexactly(len(payload)), TIMEOUT)

    def close(self) -> None:
        self.writer.close()


class Reloadable:
    """The inbound proxy's config file and the proxy itself."""

    def __init__(self, path: Path, base: dict[str, Any], proxy: Running) -> None:
        self.path = path
        self.base = base
        self.running = proxy

    @property
    def proxy(self) -> Proxy:
        return self.running.proxy

    async def reload(self, **changes: Any) -> dict[str, object]:
        self.path.write_text(yaml.safe_dump({**self.base, **changes}))
        await self.proxy.reload_config_file()
        return self.proxy.reload_status


def inbound(name: str, forward: int, port: int = 0) -> dict[str, str]:
    return {"name": name, "listen": f"127.0.0.1:{port}", "forward": f"127.0.0.1:{forward}"}


@asynccontextmanager
async def started(
    tmp: Path, ca: Authority, listeners: list[dict[str, str]], **sections: Any
) -> AsyncIterator[Reloadable]:
    base = proxy_config(tmp / "web", mint(ca, WEB), [ca], inbound=listeners, **sections)
    path = tmp / "web.yaml"
    path.write_text(yaml.safe_dump(base))
    proxy = Proxy(load_config(path), config_path=path)
    await proxy.start()
    try:
        yield Reloadable(path, base, Running(proxy, None))  # type: ignore[arg-type]
    finally:
        await proxy.stop()


@asynccontextmanager
async def client_to(tmp: Path, ca: Authority, ports: dict[str, int]) -> AsyncIterator[Running]:
    """An outbound proxy (never reloaded) with one listener per inbound port."""
    config = proxy_config(
        tmp / "client",
        mint(ca, CLIENT),
        [ca],
        outbound=[
            {
                "name": f"to-{name}",
                "listen": "127.0.0.1:0",
                "upstream": [f"127.0.0.1:{port}"],
                "expect_ids": [WEB],
            }
            for name, port in ports.items()
        ],
    )
    async with running(config, tmp) as proxy:
        yield proxy


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


def test_a_changed_forward_takes_new_connections_and_open_ones_carry_on(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with (
            named_app(b"one") as one,
            named_app(b"two") as two,
            started(tmp_path, ca, [inbound("web", one)]) as web,
        ):
            port = web.proxy.listeners[0].port
            async with client_to(tmp_path, ca, {"web": port}) as client:
                mesh = client.port("to-web")
                old, reached = await Line.open(mesh)
                assert reached == b"one"

                status = await web.reload(inbound=[inbound("web", two, port)])
                assert status["result"] == "applied", status
                assert status["changes"]["updated"] == ["web"]  # type: ignore[index]
                assert web.proxy.listeners[0].port == port  # the same socket

                new, reached = await Line.open(mesh)
                assert reached == b"two"
                assert await old.say(b"still here") == b"still here"  # not dropped
                old.close()
                new.close()
                assert web.proxy.metrics.config_reloads.value(result="applied") == 1

    run(main)


def test_listeners_added_moved_and_removed_drain_instead_of_dropping(tmp_path: Path) -> None:
    ca = new_authority()

    async def refused(port: int) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        writer.close()
        return False

    async def main() -> None:
        async with (
            named_app(b"one") as one,
            named_app(b"two") as two,
            started(tmp_path, ca, [inbound("web", one), inbound("gone", two)]) as web,
        ):
            ports = {x.name: x.port for x in web.proxy.listeners}
            async with client_to(tmp_path, ca, ports) as client:
                on_web, reached = await Line.open(client.port("to-web"))
                assert reached == b"one"
                on_gone, reached = await Line.open(client.port("to-gone"))
                assert reached == b"two"

                moved_to = free_port()
                status = await web.reload(
                    inbound=[inbound("web", one, moved_to), inbound("new", two)],
                    timeouts={"drain": 30, "handshake": 5},
                )
                assert status["result"] == "applied", status
                assert status["changes"] == {
                    "restart_keys": [],
                    "added": ["new"],
                    "removed": ["gone"],
                    "moved": ["web"],
                    "updated": [],
                    "changed": ["timeouts"],
                }
                now = {x.name: x.port for x in web.proxy.listeners}
                assert now["web"] == moved_to and set(now) == {"web", "new"}
                # Connections on the listeners that went away carry on while they drain ...
                assert await on_gone.say(b"draining") == b"draining"
                assert await on_web.say(b"moved") == b"moved"
                # ... and their old addresses no longer accept.
                assert await refused(ports["gone"])
                assert await refused(ports["web"])
                assert not await refused(moved_to)
                on_gone.close()
                on_web.close()

    run(main)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"admin": {"listen": "127.0.0.1:1"}}, "admin changed, which takes a restart"),
        ({"trust_domain": "example.com"}, "trust_domain changed, which takes a restart"),
        ({"policy": {"file": "missing.yaml"}}, "missing.yaml: cannot read"),
        ({"inbound": [{"name": "web", "listen": "127.0.0.1:0"}]}, "inbound[0].forward"),
    ],
)
def test_a_refused_reload_changes_nothing(
    tmp_path: Path, change: dict[str, Any], reason: str
) -> None:
    ca = new_authority()

    async def main() -> None:
        async with (
            named_app(b"one") as one,
            started(tmp_path, ca, [inbound("web", one)]) as web,
        ):
            before = web.proxy.config
            listener = web.proxy.listeners[0]
            status = await web.reload(**change)
            assert status["result"] == "refused"
            assert reason in str(status["error"]), status
            assert web.proxy.config is before
            assert web.proxy.listeners == [listener]
            assert web.proxy.metrics.config_reloads.value(result="refused") == 1
            async with client_to(tmp_path, ca, {"web": listener.port}) as client:
                line, reached = await Line.open(client.port("to-web"))
                assert reached == b"one"
                line.close()

    run(main)


def test_an_address_in_use_refuses_the_whole_reload(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with (
            named_app(b"one") as one,
            started(tmp_path, ca, [inbound("web", one)]) as web,
        ):
            taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            port = taken.sockets[0].getsockname()[1]
            try:
                status = await web.reload(
                    inbound=[inbound("web", one), inbound("new", one), inbound("x", one, port)]
                )
            finally:
                taken.close()
                await taken.wait_closed()
            assert status["result"] == "refused"
            assert "address already in use" in str(status["error"]).lower(), status
            assert [x.name for x in web.proxy.listeners] == ["web"]  # "new" was undone

    run(main)


def test_a_new_policy_file_applies_to_connections_already_open(tmp_path: Path) -> None:
    """Policy is read per decision from the one store, so a reload that names another policy
    file is enforced at once: here on the next TCP connection, while the open one (decided at
    its start, L4) carries on."""
    ca = new_authority()
    (tmp_path / "deny.yaml").write_text(DENY_CLIENT)

    async def main() -> None:
        async with (
            named_app(b"one") as one,
            started(tmp_path, ca, [inbound("web", one)]) as web,
            client_to(tmp_path, ca, {"web": web.proxy.listeners[0].port}) as c,
        ):
            line, _ = await Line.open(c.port("to-web"))
            status = await web.reload(policy={"file": "deny.yaml"})
            assert status["result"] == "applied", status
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await Line.open(c.port("to-web"))
            assert await line.say(b"open") == b"open"
            line.close()
            # and back
            status = await web.reload()
            assert status["result"] == "applied", status
            again, reached = await Line.open(c.port("to-web"))
            assert reached == b"one"
            again.close()

    run(main)


def test_the_file_is_watched(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with (
            named_app(b"one") as one,
            named_app(b"two") as two,
            started(tmp_path, ca, [inbound("web", one)]) as web,
        ):
            port = web.proxy.listeners[0].port
            config = {**web.base, "inbound": [inbound("web", two, port)]}
            web.path.write_text(yaml.safe_dump(config))
            await until(
                lambda: asyncio.sleep(0, web.proxy.reload_status["result"] == "applied"),
                "the file change applied",
                10,
            )
            assert web.proxy.config.inbound[0].forward == f"127.0.0.1:{two}"
            effective = web.proxy._config()["effective"]
            assert json.loads(json.dumps(effective))["config_reload"]["result"] == "applied"

    run(main)
