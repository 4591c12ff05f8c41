"""``meshid proxy run`` and ``meshid proxy wait``: run the mTLS sidecar, and hold an app until
its sidecar is ready."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .logs import setup_logging

proxy_app = typer.Typer(help="Run the mTLS sidecar proxy.", no_args_is_help=True)

WAIT_POLL = 0.2  # seconds between /ready probes: fast enough not to delay an app's start


def _fail(message: str) -> NoReturn:
    typer.echo(f"meshid: {message}", err=True)
    raise typer.Exit(1)


@proxy_app.command("run")
def proxy_run(
    config: Annotated[Path, typer.Option("--config", help="The proxy's YAML configuration.")],
) -> None:
    """Run the proxy in the foreground; SIGTERM drains, SIGHUP reloads identity files and policy."""
    from tls_proxy import ProxyError, load_config
    from tls_proxy.proxy import Proxy
    from tls_proxy.runtime import run_proxy, run_workers

    try:
        cfg = load_config(config)
        Proxy(cfg)  # refuses what cannot run before anything starts
    except ProxyError as err:
        _fail(str(err))
    setup_logging(cfg.log_level)
    if cfg.runtime.workers > 1:
        raise typer.Exit(run_workers(cfg, Proxy))
    try:
        run_proxy(cfg, Proxy)
    except ProxyError as err:
        _fail(str(err))


@proxy_app.command("wait")
def proxy_wait(
    admin: Annotated[str, typer.Option("--admin", help="HOST:PORT of the proxy's admin server.")],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 60.0,
) -> None:
    """Block until the proxy's /ready answers 200 (exit 1 after --timeout)."""
    url = f"http://{admin}/ready"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    typer.echo(f"Proxy at {admin} is ready.")
                    return
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        time.sleep(WAIT_POLL)
    _fail(f"proxy at {admin} not ready after {timeout:g}s ({last})")
