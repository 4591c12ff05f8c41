"""``runtime.workers``: forked proxies sharing the listening ports with SO_REUSEPORT.

The real CLI in a subprocess (``meshid proxy run``), an echo app and TLS clients in the test.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.processes import free_port, meshid

from ._harness import client_context, echo_app, proxy_config, tls_exchange
from ._pki import CLIENT, WEB, mint, new_authority

CONNECTIONS = 24  # all on one worker by chance: 2 * 2**-24
ALLOWED = re.compile(
    r'^meshid_proxy_connections_total\{listener="web",direction="inbound",result="allowed"\} '
    r"(\d+)$",
    re.MULTILINE,
)


def _two_free_ports() -> int:
    """A port P on 127.0.0.1 such that P and P + 1 were free a moment ago."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def _allowed(admin: str) -> int:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as response:
        found = ALLOWED.search(response.read().decode())
    return int(found.group(1)) if found else 0


def _refused(admin: str) -> bool:
    try:
        urllib.request.urlopen(f"http://{admin}/live", timeout=5).close()
    except urllib.error.URLError:
        return True
    return False


def test_workers_need_fixed_ports(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "runtime: {workers: 2}\n"
        "inbound:\n  - {name: web, listen: '127.0.0.1:0', forward: '127.0.0.1:1'}\n"
    )
    result = meshid("proxy", "run", "--config", str(path))
    assert result.returncode == 1
    assert "expected fixed listen ports with runtime.workers > 1" in result.stderr


@pytest.mark.slow
def test_two_workers_both_serve_and_sigterm_stops_all(tmp_path: Path) -> None:
    ca = new_authority()
    admin_port = _two_free_ports()
    admins = [f"127.0.0.1:{admin_port}", f"127.0.0.1:{admin_port + 1}"]
    listen = free_port()

    async def main() -> None:
        async with echo_app() as echo:
            config = proxy_config(
                tmp_path,
                mint(ca, WEB),
                [ca],
                inbound=[
                    {
                        "name": "web",
                        "listen": f"127.0.0.1:{listen}",
                        "forward": f"127.0.0.1:{echo.port}",
                    }
                ],
                runtime={"workers": 2},
            )
            config["admin"] = {"listen": admins[0]}
            path = tmp_path / "proxy.yaml"
            path.write_text(yaml.safe_dump(config))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "meshid", "proxy", "run", "--config", str(path)),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                for admin in admins:  # each worker has its own admin server
                    waited = await asyncio.to_thread(
                        meshid, "proxy", "wait", "--admin", admin, "--timeout", "30"
                    )
                    assert waited.returncode == 0, waited.stderr
                context = client_context(mint(ca, CLIENT), ca, tmp_path)
                for i in range(CONNECTIONS):
                    payload = f"hello {i}".encode()
                    assert await tls_exchange(listen, context, payload) == payload
                # each worker counts a connection once it has seen it close
                counts = [0, 0]
                for _ in range(100):
                    counts = [await asyncio.to_thread(_allowed, a) for a in admins]
                    if sum(counts) == CONNECTIONS:
                        break
                    await asyncio.sleep(0.1)
                assert sum(counts) == CONNECTIONS
                assert min(counts) > 0, counts  # the kernel spread them over both workers
                proc.send_signal(signal.SIGTERM)
                out, _ = await asyncio.wait_for(proc.communicate(), 30)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            text = out.decode()
            assert proc.returncode == 0, text
            assert text.count("meshid proxy ready") == 2
            assert text.count("proxy drained") == 2
            pids = re.search(r"workers started pids=([\d,]+)", text)
            assert pids is not None, text
            for pid in map(int, pids.group(1).split(",")):
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
            assert all(_refused(a) for a in admins)

    asyncio.run(asyncio.wait_for(main(), 90))
