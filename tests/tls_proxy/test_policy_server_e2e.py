"""End to end: ``meshid policy apply`` on a real server process, enforced by a running proxy.

A real ``meshid server run --bind`` process; SVIDs for both proxies minted from it with
``meshid x509 mint`` (so they chain to its bundle); the inbound proxy (``policy: {server: ...}``,
default posture ``allow``: no policy stored means traffic flows) and the outbound proxy run in
this test's event loop with file identities; an echo app behind the inbound proxy.

Cross-process state is awaited by polling new connections with a deadline, no fixed sleeps.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import ServerProcess, free_port

from ._harness import Running, echo_app, exchange, inbound_listener
from ._harness import running as proxy_running
from ._http import Client, http_echo_app
from ._pki import CLIENT, WEB
from .test_policy_server import DEADLINE, DENY_CLIENT, until

pytestmark = pytest.mark.slow

FIRST_SET_TIMEOUT = 10.0  # seconds for the proxy's first connection to a freshly started server


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer."""
    root = Path(tempfile.mkdtemp(prefix="mid-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _mint(server: ServerProcess, spiffe_id: str, out: Path) -> dict[str, str]:
    result = server.cli("x509", "mint", "--spiffe-id", spiffe_id, "--write", str(out))
    assert result.returncode == 0, result.stderr
    return {
        "cert": str(out / "svid.pem"),
        "key": str(out / "svid.key"),
        "bundle": str(out / "bundle.pem"),
    }


@dataclass
class Server:
    process: ServerProcess
    node_api: str  # HOST:PORT the proxies stream policies from
    policy_file: Path  # DENY_CLIENT, to `meshid policy apply`

    def cli(self, *args: str) -> None:
        result = self.process.cli(*args)
        assert result.returncode == 0, result.stderr


@contextmanager
def running_server(root: Path) -> Iterator[Server]:
    port = free_port()
    process = ServerProcess(
        root / "srv", root / "adm" / "s.sock", extra_args=["--bind", f"127.0.0.1:{port}"]
    ).start()
    policy_file = root / "deny.yaml"
    policy_file.write_text(DENY_CLIENT)
    try:
        yield Server(process, f"127.0.0.1:{port}", policy_file)
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.stop()


@asynccontextmanager
async def proxy_pair(
    server: Server, root: Path, app_port: int, protocol: str
) -> AsyncIterator[tuple[Running, int]]:
    """The web sidecar (policies from ``server``, default posture ``allow``) in front of the app
    once it holds the server's first set, and the client sidecar to it; yields the web sidecar
    and the client sidecar's listening port. SVIDs are minted by the server."""
    common: dict[str, Any] = {
        "admin": {"listen": "127.0.0.1:0"},
        "timeouts": {"drain": 2, "handshake": 5},
    }
    web = {
        **common,
        "identity": _mint(server.process, WEB, root / "web"),
        "default_posture": "allow",
        "inbound": [inbound_listener(app_port, protocol)],
        "policy": {"server": server.node_api},
    }
    async with proxy_running(web, root) as inbound:
        store = inbound.proxy.policies
        assert store is not None
        await until(
            lambda: asyncio.sleep(0, store.revision is not None),
            "the first policy set",
            FIRST_SET_TIMEOUT,
        )
        client = {
            **common,
            "identity": _mint(server.process, CLIENT, root / "client"),
            "outbound": [
                {
                    "name": "to-web",
                    "listen": "127.0.0.1:0",
                    "upstream": [f"127.0.0.1:{inbound.port('web')}"],
                    "expect_ids": [WEB],
                    "protocol": protocol,
                }
            ],
        }
        async with proxy_running(client, root) as outbound:
            yield inbound, outbound.port("to-web")


def test_apply_deny_delete_through_a_real_server(short_tmp: Path) -> None:
    async def scenario(server: Server) -> None:
        async with echo_app() as echo, proxy_pair(server, short_tmp, echo.port, "tcp") as pair:
            inbound, mesh = pair
            store = inbound.proxy.policies
            assert store is not None

            async def allowed() -> bool:
                return await exchange(mesh, b"ping") == b"ping"

            async def denied() -> bool:
                return await exchange(mesh, b"ping") == b""

            assert await allowed()
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh)
            writer.write(b"open")
            assert await reader.readexactly(4) == b"open"

            # The CLI returns once the policy is stored; from then on: < 1 s.
            await asyncio.to_thread(server.cli, "policy", "apply", "-f", str(server.policy_file))
            await until(denied, "the DENY policy enforced", DEADLINE)
            writer.write(b"still")  # L4 authz is decided at connection start
            assert await reader.readexactly(5) == b"still"

            await asyncio.to_thread(server.cli, "policy", "delete", "--name", "no-client")
            await until(allowed, "the deletion enforced", DEADLINE)

            await asyncio.to_thread(server.cli, "policy", "apply", "-f", str(server.policy_file))
            await until(denied, "the DENY policy enforced again", DEADLINE)
            kept = store.revision
            await asyncio.to_thread(server.process.stop)
            source = inbound.proxy.policy_source
            assert source is not None
            await until(
                lambda: asyncio.sleep(0, not source.status.connected),
                "the stream noticing the server is gone",
                5,
            )
            assert await denied()  # the last good set is kept
            assert store.revision == kept
            writer.write(b"end")
            assert await reader.readexactly(3) == b"end"
            writer.close()

    with running_server(short_tmp) as server:
        asyncio.run(asyncio.wait_for(scenario(server), 120))


def test_http_requests_on_one_keep_alive_connection_follow_apply_and_delete(
    short_tmp: Path,
) -> None:
    """L7: every request is decided on its own, so the same keep-alive connection is answered 403
    within 1 s of ``policy apply`` and 200 again within 1 s of ``policy delete``; the connection
    is never dropped, and the proxy never asks the app while the policy denies."""

    async def scenario(server: Server) -> None:
        async with (
            http_echo_app() as app,
            proxy_pair(server, short_tmp, app.port, "http") as (_, mesh),
        ):
            client = await Client.open(mesh)
            statuses: list[int] = []

            async def status() -> int:
                reply = await client.request("GET", "/api/items")
                statuses.append(reply.status)
                return reply.status

            async def allowed() -> bool:
                return await status() == 200

            async def denied() -> bool:
                return await status() == 403

            assert await allowed()
            await asyncio.to_thread(server.cli, "policy", "apply", "-f", str(server.policy_file))
            await until(denied, "the DENY policy enforced", DEADLINE)
            app_saw = len(app.seen)
            assert await denied()  # and it stays so
            assert len(app.seen) == app_saw  # a denied request never reaches the app

            await asyncio.to_thread(server.cli, "policy", "delete", "--name", "no-client")
            await until(allowed, "the deletion enforced", DEADLINE)
            assert await allowed()
            # one connection carried all of it: an error above would have raised
            assert set(statuses) == {200, 403}
            assert statuses[0] == 200 and statuses[-1] == 200
            await client.close()

    with running_server(short_tmp) as server:
        asyncio.run(asyncio.wait_for(scenario(server), 120))
