"""How the proxy process runs: which event loop (uvloop when available) and, with ``workers``,
how many processes share the listening ports.

Owns ``select_loop`` (the ``runtime.uvloop`` choice with a clean fallback to asyncio's own
loop when uvloop is not installed), ``run_proxy`` (one proxy in the foreground: served until
SIGTERM/SIGINT, SIGHUP reloads) and ``run_workers`` (``runtime.workers`` forked processes,
each a complete proxy whose listeners bind the same ports with SO_REUSEPORT, so the kernel
spreads connections over them; the parent only forwards SIGTERM/SIGINT/SIGHUP and waits, and
owns the private directory where the workers meet to total their metrics, ``Worker``).
It must not know listeners or codecs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .errors import ProxyError

if TYPE_CHECKING:
    from .config import ProxyConfig
    from .proxy import Proxy

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def select_loop(prefer_uvloop: bool) -> tuple[LoopFactory, str]:
    """The event loop factory to run the proxy on and its name (``uvloop`` or ``asyncio``).

    uvloop (libuv, its TLS in Cython) costs less CPU per request than asyncio's loop and its
    pure-Python TLS transport; without it installed the proxy runs on asyncio's loop.
    """
    if prefer_uvloop:
        try:
            import uvloop  # noqa: PLC0415  optional: only the proxy process wants it
        except ImportError:
            log.info("uvloop not installed; running on asyncio's event loop")
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what ``/config`` reports as the running loop."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def install_signals(stop: Callable[[], None], reload: Callable[[], None]) -> None:
    """SIGTERM/SIGINT call ``stop`` (drain), SIGHUP calls ``reload``, on the running loop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)


@dataclass(frozen=True)
class Worker:
    """Worker ``index`` of ``count``; ``directory`` is the parent's private (0700) directory
    where each worker answers its metrics on a Unix socket (``worker_metrics``)."""

    index: int
    count: int
    directory: Path


MakeProxy = Callable[["ProxyConfig", "Worker | None"], "Proxy"]  # None: the only process


def run_proxy(config: ProxyConfig, make: MakeProxy, worker: Worker | None = None) -> None:
    """Run one proxy (``worker``, or the whole proxy) in this process until SIGTERM/SIGINT
    (drain); SIGHUP reloads."""
    loop_factory, _ = select_loop(config.runtime.uvloop)
    proxy = make(config, worker)

    async def main() -> None:
        install_signals(proxy.request_stop, proxy.reload)
        await proxy.run()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def run_workers(config: ProxyConfig, make: MakeProxy) -> int:
    """Fork ``runtime.workers`` proxies and wait for them; the exit status of the whole.

    Each worker is a complete proxy (identity, policy, listeners, its own admin server on
    the admin port + its index: ``ProxyConfig.for_worker``). The parent forwards SIGTERM,
    SIGINT and SIGHUP to every worker. A worker that exits on its own (a crash, a failed
    start) takes the others down and the parent exits 1, for the supervisor to restart it.
    The workers' metrics directory is created first (mkdtemp: 0700, ours alone) and removed
    once every worker has exited.
    """
    directory = Path(tempfile.mkdtemp(prefix="meshid-proxy-workers-"))
    try:
        return _fork_and_wait(config, make, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _fork_and_wait(config: ProxyConfig, make: MakeProxy, directory: Path) -> int:
    workers: dict[int, int] = {}  # pid -> index
    count = config.runtime.workers
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # the worker: run, then leave without running the parent's cleanup
            status = 0
            try:
                run_proxy(config.for_worker(index), make, Worker(index, count, directory))
            except ProxyError as err:
                print(f"meshid: worker {index}: {err}", file=sys.stderr)
                status = 1
            except BaseException:
                log.exception("worker failed", extra={"worker": index})
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)
        workers[pid] = index
    log.info("workers started", extra={"pids": ",".join(map(str, workers))})
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for pid in workers:
            _signal(pid, signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    status = 0
    while workers:
        pid, wait_status = os.wait()  # retried after our signal handler runs (PEP 475)
        if pid not in workers:
            continue
        index = workers.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 or not stopping:
            log.error("worker exited", extra={"worker": index, "pid": pid, "status": code})
            status = 1
            if not stopping:
                stopping = True
                for other in workers:
                    _signal(other, signal.SIGTERM)
    return status


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just exited: os.wait reports it
        os.kill(pid, signum)
