"""Change detection for streams: one poller per server and kind of mark, many waiting streams.

Owns *when* streams look again. The CaService's change listener kicks the poller at once (a
change made through this replica); otherwise it polls the database's cheap marks (newest entry
revision, bundle sequence, nodes revision, federated bundles) every ``POLL_INTERVAL``, so changes
made by other replicas arrive too. Streams wait for the generation to move; each then works out
for itself what changed. It must not read entries itself or know what an agent is authorized for.
The node API runs two: entry sync's marks, and the policies revision for ``WatchPolicies``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ..errors import CaError

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2  # seconds: a change on another replica reaches agents well within 1 s


class ChangeWatch:
    """A generation counter that moves whenever the marks change (asyncio, one loop)."""

    def __init__(
        self, read_marks: Callable[[], object], *, interval: float = POLL_INTERVAL
    ) -> None:
        """``read_marks`` returns a value comparable with ``==`` that moves on every change."""
        self._read_marks = read_marks
        self._interval = interval
        self._marks: object = None
        self._kicked = asyncio.Event()
        self._moved = asyncio.Event()
        self.generation = 0
        self.closed = False

    def kick(self) -> None:
        """Look now (call on the loop's thread)."""
        self._kicked.set()

    def close(self) -> None:
        """Wake every waiter for good (server stopping)."""
        self.closed = True
        self._advance()

    def _advance(self) -> None:
        self.generation += 1
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def run(self) -> None:
        """Poll until cancelled."""
        while not self.closed:
            self._kicked.clear()
            try:
                marks = await asyncio.to_thread(self._read_marks)
            except CaError as err:
                log.warning("change poll failed", extra={"error": str(err)})
            else:
                if marks != self._marks:
                    self._marks = marks
                    self._advance()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kicked.wait(), self._interval)

    async def wait(self, seen: int, timeout: float | None = None) -> int:
        """The generation once it is past ``seen`` (or after ``timeout`` seconds)."""
        if self.generation != seen or self.closed:
            return self.generation
        moved = self._moved
        if timeout is None:
            await moved.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), timeout)
        return self.generation
