"""``meshid proxy run``: the sidecar process, served without the rest of the CLI.

The sidecar runs beside every workload, so its memory counts (docs/proxy.md, "Memory").
``meshid.cli.main`` hands a command line of exactly ``proxy run --config FILE`` to ``run``
before typer, click, pydantic or the other commands' modules are imported; any other shape
(``--help``, a misspelt option) goes to the typer app, whose ``proxy run`` calls the same
``run``. ``slim_imports`` registers py-spiffe with its pure types only (``ca.spiffe_light``)
before anything imports it: the Workload API client (grpc and protobuf, ~20 MiB) is loaded
later only if the configuration asks for the Workload API.

It must not import typer or pydantic, and imports ``tls_proxy`` only inside ``run``: every
``meshid`` command imports this module. ``tests/tls_proxy/test_runtime.py`` checks what a
running sidecar has imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

_CONFIG = "--config"


def proxy_run_config(args: Sequence[str]) -> Path | None:
    """The FILE of ``args`` when they are exactly ``proxy run --config FILE`` (or
    ``--config=FILE``); None for anything else, which the typer app parses."""
    match list(args):
        case ["proxy", "run", "--config", str(value)] if value and not value.startswith("-"):
            return Path(value)
        case ["proxy", "run", str(option)] if option.startswith(f"{_CONFIG}="):
            value = option.removeprefix(f"{_CONFIG}=")
            return Path(value) if value else None
    return None


def slim_imports() -> None:
    """Register py-spiffe without its Workload API client (see ``ca.spiffe_light``)."""
    from ca.spiffe_light import load_core

    load_core()


def run(config: Path) -> int:
    """Run the proxy of the YAML file ``config`` in the foreground; returns the exit status.

    A configuration that cannot run is refused with one line on stderr (status 1) before
    anything starts; SIGTERM drains (status 0); SIGHUP or a change of the file reloads.
    """
    slim_imports()
    from tls_proxy import ProxyConfig, ProxyError, load_config
    from tls_proxy.proxy import Proxy
    from tls_proxy.runtime import Worker, run_proxy, run_workers

    from .logs import setup_logging

    try:
        cfg = load_config(config)
        Proxy(cfg)  # refuses what cannot run before anything starts
    except ProxyError as err:
        return _fail(str(err))
    setup_logging(cfg.log_level)

    def make(cfg: ProxyConfig, worker: Worker | None) -> Proxy:
        return Proxy(cfg, config_path=config, worker=worker)  # reloads re-read the file

    if cfg.runtime.workers > 1:
        return run_workers(cfg, make)
    try:
        run_proxy(cfg, make)
    except ProxyError as err:
        return _fail(str(err))
    return 0


def _fail(message: str) -> int:
    print(f"meshid: {message}", file=sys.stderr)
    return 1
