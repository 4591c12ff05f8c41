"""Admin endpoints, drain on stop, the CLI (``meshid proxy run|wait``) and Workload API identity."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from tests.support.processes import free_port, meshid
from tests.workload_api import _pki as wl_pki
from tests.workload_api._harness import LoopThread, self_attestor, socket_folder
from tls_proxy import Proxy, parse_config
from workload_api.server import WorkloadApiServer
from workload_api.static import StaticIdentityProvider

from ._harness import client_context, echo_app, proxy_config, running, tls_exchange
from ._pki import CLIENT, WEB, mint, new_authority


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def test_admin_endpoints_and_drain(tmp_path: Path) -> None:
    ca = new_authority()

    async def main() -> None:
        async with echo_app() as echo:
            config = proxy_config(
                tmp_path / "web",
                mint(ca, WEB),
                [ca],
                inbound=[
                    {"name": "web", "listen": "127.0.0.1:0", "forward": f"127.0.0.1:{echo.port}"}
                ],
            )
            async with running(config, tmp_path) as inbound:
                proxy = inbound.proxy
                assert proxy.admin is not None
                admin = proxy.admin.port
                assert await _get(admin, "/live") == (200, "live\n")
                assert await _get(admin, "/ready") == (200, "ready\n")
                context = client_context(mint(ca, CLIENT), ca, tmp_path)
                assert await tls_exchange(inbound.port("web"), context, b"hi") == b"hi"
                await asyncio.sleep(0.2)  # the close is counted once the proxy sees it
                status, metrics = await _get(admin, "/metrics")
                assert status == 200
                assert (
                    'meshid_proxy_connections_total{listener="web",direction="inbound",'
                    'result="allowed"} 1' in metrics
                )
                status, body = await _get(admin, "/config")
                shown = json.loads(body)
                assert shown["effective"]["spiffe_id"] == WEB
                assert "PRIVATE KEY" not in body
                assert (await _get(admin, "/nope"))[0] == 404

                # Drain: an open connection keeps working during the grace; new ones are refused.
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", inbound.port("web"), ssl=context
                )
                writer.write(b"one")
                assert await reader.readexactly(3) == b"one"
                stopping = asyncio.create_task(proxy.stop())
                await asyncio.sleep(0.2)
                assert not proxy.ready
                writer.write(b"two")
                assert await reader.readexactly(3) == b"two"
                with pytest.raises(OSError):
                    await asyncio.open_connection("127.0.0.1", inbound.port("web"))
                writer.close()
                await asyncio.wait_for(stopping, 5)

    asyncio.run(main())


def test_identity_from_the_workload_api(tmp_path: Path) -> None:
    """A real Workload API server on a Unix socket feeds the proxy through py-spiffe."""
    web = wl_pki.identity(WEB, ["unix:uid:" + str(os.getuid())])
    provider = StaticIdentityProvider(wl_pki.snapshot([web]))
    folder = socket_folder()
    loop = LoopThread()
    server = WorkloadApiServer(provider, self_attestor(), folder / "api.sock")
    loop.run(server.start())
    try:
        config = {
            "identity": {"workload_api": f"unix://{server.socket_path}", "timeout": 10},
            "admin": {"listen": "127.0.0.1:0"},
            "inbound": [{"name": "web", "listen": "127.0.0.1:0", "forward": "127.0.0.1:9"}],
        }

        async def main() -> None:
            proxy = Proxy(parse_config(config, "test.yaml"))
            await proxy.start()
            try:
                snapshot = proxy.identity.current()
                assert snapshot.spiffe_id == WEB
                assert "example.org" in snapshot.bundles
                rotated = wl_pki.identity(WEB, web.selectors)
                provider.replace(wl_pki.snapshot([rotated]))
                for _ in range(50):
                    await asyncio.sleep(0.1)
                    if proxy.identity.current().cert_chain == rotated.cert_chain:
                        break
                assert proxy.identity.current().cert_chain == rotated.cert_chain
                assert proxy.metrics.rotations.value() >= 1
            finally:
                await proxy.stop()

        asyncio.run(main())
    finally:
        loop.run(server.stop(timedelta(seconds=2)))
        loop.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_cli_run_wait_and_sigterm(tmp_path: Path) -> None:
    ca = new_authority()
    admin = f"127.0.0.1:{free_port()}"
    config = proxy_config(
        tmp_path,
        mint(ca, WEB),
        [ca],
        inbound=[{"name": "web", "listen": f"127.0.0.1:{free_port()}", "forward": "127.0.0.1:9"}],
    )
    config["admin"] = {"listen": admin}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshid", "proxy", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        waited = meshid("proxy", "wait", "--admin", admin, "--timeout", "20")
        assert waited.returncode == 0, waited.stderr
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://{admin}/config", timeout=5) as response:
            expected = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
            assert json.load(response)["effective"]["event_loop"] == expected  # runtime.uvloop

        # SIGHUP re-reads the file: a listener added there starts accepting.
        added = free_port()
        config["inbound"].append(
            {"name": "added", "listen": f"127.0.0.1:{added}", "forward": "127.0.0.1:9"}
        )
        path.write_text(yaml.safe_dump(config))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", added), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the added listener never accepted"
                time.sleep(0.05)  # another process's state: no event to await from here
        with urllib.request.urlopen(f"http://{admin}/config", timeout=5) as response:
            reload = json.load(response)["effective"]["config_reload"]
        assert reload["result"] == "applied"
        assert reload["changes"]["added"] == ["added"]

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out
        assert "meshid proxy ready" in out
        assert "proxy drained" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("inbound:\n  - {name: web, listen: nowhere, forward: '127.0.0.1:1'}\n")
    result = meshid("proxy", "run", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"meshid: {path}: inbound[0].listen: expected HOST:PORT with a port in 0..65535 "
        "(got 'nowhere')"
    )


def test_wait_times_out_when_nothing_answers() -> None:
    result = meshid("proxy", "wait", "--admin", f"127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert result.returncode == 1
    assert "not ready after 0.5s" in result.stderr
