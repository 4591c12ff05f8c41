"""``MESHID_TEST_LOOP=uvloop`` runs the proxy tests on uvloop (as ``meshid proxy run`` does by
default) instead of asyncio's own loop: every ``asyncio.run`` of a test then gets a uvloop
loop. Servers a test runs in threads of their own (the Workload API server's ``LoopThread``)
keep asyncio's loop, as they do in production."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

LOOP_ENV = "MESHID_TEST_LOOP"
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(LOOP_ENV) != "uvloop":
        return
    import uvloop

    def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
        with asyncio.Runner(debug=debug, loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)

    asyncio.run = run
