"""How the proxy process runs: which event loop (uvloop when available) and, with ``workers``,
how many processes share the listening ports.

Owns ``select_loop`` (the ``runtime.uvloop`` choice with a clean fallback to asyncio's own
loop when uvloop is not installed) and ``run`` (one proxy in the foreground: signals wired,
served until SIGTERM/SIGINT, SIGHUP reloads). It must not know listeners or codecs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)

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
