"""``runtime.workers``: forked proxies sharing the listening ports with SO_REUSEPORT, and
their metrics totalled on every worker's ``/metrics``.

The real CLI in a subprocess (``meshid proxy run``), an echo app and TLS clients in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.processes import free_port, meshid

from ._harness import client_context, echo_app, proxy_config, tls_exchange
from ._pki import CLIENT, WEB, mint, new_authority

CONNECTIONS = 24  # all on one worker by chance: 2 * 2**-24
SERIES = {
    "allowed": "meshid_proxy_connections_total"
    '{listener="web",direction="inbound",result="allowed"}',
    "active": 'meshid_proxy_active_connections{listener="web",direction="inbound"}',
    "reporting": "meshid_proxy_workers_reporting",
}


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


def _metric(admin: str, name: str, path: str = "/metrics") -> int:
    """A sample of ``SERIES[name]`` from ``path`` (``/metrics``: every worker's totals;
    ``/metrics/worker``: that worker alone); 0 when absent."""
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(SERIES[name])} (\d+)$", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


def _allowed(admin: str) -> int:
    return _metric(admin, "allowed", "/metrics/worker")


async def _until(what: str, check: Any, expected: Any, tries: int = 100) -> Any:
    """Poll ``check()`` (in a thread) until it returns ``expected``: metrics live in other
    processes, so there is no event to await. Returns the last value for the assertion."""
    value = None
    for _ in range(tries):
        value = await asyncio.to_thread(check)
        if value == expected:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: expected {expected}, last {value}")


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
                # /metrics of either worker shows the totals of both
                assert [_metric(a, "allowed") for a in admins] == [CONNECTIONS] * 2
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


async def _hold(port: int, context: ssl.SSLContext, n: int) -> list[asyncio.StreamWriter]:
    """``n`` TLS connections to ``port``, each echoed once (so authenticated and counted as
    active by the worker that took it) and left open."""
    writers = []
    for i in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writers.append(writer)
        writer.write(f"held {i}".encode())
        await writer.drain()
        assert await asyncio.wait_for(reader.read(65536), 5) == f"held {i}".encode()
    return writers


async def _close(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.slow
def test_every_workers_metrics_show_the_totals_and_a_dead_worker_leaves_no_gauge(
    tmp_path: Path,
) -> None:
    """Connections spread over two workers: the totals on either admin port are the sums (the
    allowed counter equals the connections made, the active gauge the connections open). When
    worker 1 is killed with connections open, the totals worker 0 answers while it drains no
    longer include worker 1's gauge; at exit the workers' private directory is gone."""
    ca = new_authority()
    admin_port = _two_free_ports()
    admins = [f"127.0.0.1:{admin_port}", f"127.0.0.1:{admin_port + 1}"]
    listen = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="mw-"))  # TMPDIR of the proxy: short socket paths

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
                access_log={"path": None},
            )
            config["admin"] = {"listen": admins[0]}
            config["timeouts"]["drain"] = 60  # held connections keep a stopping worker up
            path = tmp_path / "proxy.yaml"
            path.write_text(yaml.safe_dump(config))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "meshid", "proxy", "run", "--config", str(path)),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "TMPDIR": str(tmp)},
            )
            held: list[asyncio.StreamWriter] = []
            try:
                assert proc.stdout is not None
                started = ""
                while "workers started" not in started:
                    started = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
                    assert started, "meshid proxy run ended before starting its workers"
                pids = [int(p) for p in re.findall(r"\d+", started.split("pids=")[1])]
                (workers_dir,) = tmp.iterdir()
                assert oct(workers_dir.stat().st_mode & 0o777) == "0o700"
                for admin in admins:
                    waited = await asyncio.to_thread(
                        meshid, "proxy", "wait", "--admin", admin, "--timeout", "30"
                    )
                    assert waited.returncode == 0, waited.stderr
                context = client_context(mint(ca, CLIENT), ca, tmp_path)

                held = await _hold(listen, context, CONNECTIONS)
                per_worker = [_metric(a, "active", "/metrics/worker") for a in admins]
                assert sum(per_worker) == CONNECTIONS
                assert min(per_worker) > 0, per_worker  # both workers hold some
                for admin in admins:
                    assert _metric(admin, "active") == CONNECTIONS
                    assert _metric(admin, "reporting") == 2
                await _close(held)
                for admin in admins:  # counted as each worker sees its connections close
                    await _until("allowed", lambda a=admin: _metric(a, "allowed"), CONNECTIONS)
                    assert _metric(admin, "active") == 0

                held = await _hold(listen, context, CONNECTIONS)
                on_zero = _metric(admins[0], "active", "/metrics/worker")
                assert 0 < on_zero < CONNECTIONS
                os.kill(pids[1], signal.SIGKILL)
                # The parent reaps worker 1, then tells worker 0 to drain: /ready goes 503
                # while the connections held on worker 0 keep it (and its admin) up.
                await _until("worker 0 draining", lambda: _refused_ready(admins[0]), True)
                assert _metric(admins[0], "reporting") == 1
                assert _metric(admins[0], "active") == on_zero  # worker 1's share is gone
                assert _metric(admins[0], "allowed") == _allowed(admins[0])
            finally:
                await _close(held)
                if proc.returncode is None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(proc.wait(), 60)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 1  # a worker died: the supervisor should restart all
            assert not any(tmp.iterdir())  # the workers' directory is removed at exit

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refused_ready(admin: str) -> bool:
    """True once ``/ready`` answers 503 (draining)."""
    try:
        urllib.request.urlopen(f"http://{admin}/ready", timeout=5).close()
    except urllib.error.HTTPError as err:
        return err.code == 503
    return False
