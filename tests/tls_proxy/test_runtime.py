"""The proxy's event loop: uvloop when configured and installed, asyncio's loop otherwise."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.processes import free_port
from tls_proxy.runtime import loop_name, select_loop

from ._harness import client_context, echo_app, exchange, proxy_config, running, tls_exchange
from ._pki import CLIENT, WEB, mint, new_authority

uvloop = pytest.importorskip("uvloop")


def test_uvloop_is_selected_when_configured_and_installed() -> None:
    factory, name = select_loop(True)
    assert name == "uvloop"
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop_name(loop) == "uvloop"
    finally:
        loop.close()


def test_asyncio_loop_when_turned_off() -> None:
    factory, name = select_loop(False)
    assert name == "asyncio"
    loop = factory()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert loop_name(loop) == "asyncio"
    finally:
        loop.close()


def test_falls_back_to_asyncio_when_uvloop_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    factory, name = select_loop(True)
    assert name == "asyncio"
    loop = factory()
    try:
        assert loop_name(loop) == "asyncio"
    finally:
        loop.close()


def test_both_proxies_serve_on_uvloop(tmp_path: Path) -> None:
    """Inbound TLS accepts, SPIFFE checks and the splice on uvloop; /config names the loop.

    uvloop reads an accepted socket before asyncio's server callback runs, which is why the
    inbound listener accepts by hand: the ClientHello must reach TLS, not a plain reader.
    """
    ca = new_authority()

    async def main() -> None:
        assert loop_name(asyncio.get_running_loop()) == "uvloop"
        async with echo_app() as echo:
            web = proxy_config(
                tmp_path / "web",
                mint(ca, WEB),
                [ca],
                inbound=[
                    {"name": "web", "listen": "127.0.0.1:0", "forward": f"127.0.0.1:{echo.port}"}
                ],
            )
            async with running(web, tmp_path) as inbound:
                client = proxy_config(
                    tmp_path / "client",
                    mint(ca, CLIENT),
                    [ca],
                    outbound=[
                        {
                            "name": "to-web",
                            "listen": "127.0.0.1:0",
                            "upstream": [f"127.0.0.1:{inbound.port('web')}"],
                            "expect_ids": [WEB],
                        }
                    ],
                )
                async with running(client, tmp_path) as outbound:
                    assert await exchange(outbound.port("to-web"), b"ping" * 1000) == b"ping" * 1000
                    bare = client_context(None, ca, tmp_path)
                    assert await tls_exchange(inbound.port("web"), bare, b"x") == b""
                    assert inbound.proxy._config()["effective"]["event_loop"] == "uvloop"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.strip()


# Top-level packages `meshid proxy run` must not load (docs/proxy.md, "Memory"): the CLI
# (typer, click, rich), pydantic (the CLI's and the server's configs), py-spiffe's Workload API
# client (grpc, google.protobuf) and X509Svid's parsers (pyasn1, pem), the admin client (httpx),
# PyJWT without a `jwt` block, and h2 (with hpack and hyperframe) until an HTTP/2 connection.
NOT_IN_THE_SIDECAR = (
    "click", "google", "grpc", "h2", "hpack", "httpx", "hyperframe", "jwt", "pem", "pyasn1",
    "pydantic", "rich", "typer",
)  # fmt: skip
_SIDECAR = """
import atexit, json, sys
atexit.register(lambda: print("MODULES", json.dumps(sorted(sys.modules)), flush=True))
sys.argv = ["meshid", "proxy", "run", "--config", sys.argv[1]]
from meshid.cli import main
main()
"""


def test_the_sidecar_process_imports_none_of_the_heavy_packages_it_does_not_need(
    tmp_path: Path,
) -> None:
    """A real ``meshid proxy run`` with file identity and HTTP listeners both ways, run until
    ready and stopped: its ``sys.modules`` at exit holds none of ``NOT_IN_THE_SIDECAR``."""
    ca = new_authority()
    admin = f"127.0.0.1:{free_port()}"
    config = proxy_config(
        tmp_path,
        mint(ca, WEB),
        [ca],
        inbound=[
            {"name": "in", "listen": "127.0.0.1:0", "forward": "127.0.0.1:9", "protocol": "http"}
        ],
        outbound=[
            {
                "name": "out",
                "listen": "127.0.0.1:0",
                "upstream": ["127.0.0.1:9"],
                "expect_ids": [WEB],
                "protocol": "auto",
            }
        ],
    )
    config["admin"] = {"listen": admin}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIDECAR, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _ready(admin):
            assert proc.poll() is None, "meshid proxy run ended before it was ready"
            assert time.monotonic() < deadline, "meshid proxy run was not ready after 30 s"
            time.sleep(0.05)  # another process's state: no event to await from here
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    modules = json.loads(out.partition("MODULES ")[2])
    assert "tls_proxy.proxy" in modules  # the proxy did run in this process
    assert [m for m in modules if m.partition(".")[0] in NOT_IN_THE_SIDECAR] == []


def _ready(admin: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_the_workload_api_client_loads_on_demand_in_a_slim_process() -> None:
    """After ``load_core`` the package completes in place: same classes, X509Source there."""
    out = _python(
        "from ca.spiffe_light import load_all, load_core; load_core();"
        "from spiffe import SpiffeId; load_all();"
        "import spiffe, grpc; from spiffe import X509Source;"
        "print(spiffe.SpiffeId is SpiffeId, SpiffeId('spiffe://example.org/a').path)"
    )
    assert out == "True /a"
