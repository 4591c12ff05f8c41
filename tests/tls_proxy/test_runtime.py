"""The proxy's event loop: uvloop when configured and installed, asyncio's loop otherwise."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_proxy_run_does_not_import_the_workload_api_client_nor_httpx() -> None:
    """``meshid proxy run`` with file identity: no grpc, protobuf or httpx in the process."""
    loaded = _python(
        "import sys; sys.argv = ['meshid', 'proxy', 'run', '--config', 'x'];"
        "import meshid.cli, tls_proxy.proxy, tls_proxy.runtime;"
        "print(sorted(m for m in ('grpc', 'google.protobuf', 'httpx') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_the_workload_api_client_loads_on_demand_in_a_slim_process() -> None:
    """After ``load_core`` the package completes in place: same classes, X509Source there."""
    out = _python(
        "from ca.spiffe_light import load_all, load_core; load_core();"
        "from spiffe import SpiffeId; load_all();"
        "import spiffe, grpc; from spiffe import X509Source;"
        "print(spiffe.SpiffeId is SpiffeId, SpiffeId('spiffe://example.org/a').path)"
    )
    assert out == "True /a"
