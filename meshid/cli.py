"""The ``meshid`` entry point: ``meshid.cli:main`` (``pyproject.toml``) and ``python -m meshid``.

It must stay light. ``proxy run --config FILE``, the sidecar beside every workload, is served
by ``meshid._sidecar`` without importing the CLI (typer, click, pydantic and the other
commands' modules: ~10 MiB of every sidecar's memory); every other command line, ``meshid
proxy run --help`` included, goes to the typer app in ``meshid.commands``.
"""

from __future__ import annotations

import os
import sys

from . import _sidecar


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    config = _sidecar.proxy_run_config(sys.argv[1:])
    if config is not None:
        try:
            code = _sidecar.run(config)
        except KeyboardInterrupt:  # before the proxy handles SIGINT itself; as click says it
            print("\nAborted!", file=sys.stderr)
            code = 1
        sys.exit(code)
    if sys.argv[1:3] == ["proxy", "run"]:
        _sidecar.slim_imports()  # the app parses these arguments, then runs the same proxy
    from .commands import app

    app()
