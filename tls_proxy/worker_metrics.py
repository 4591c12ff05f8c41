"""Metrics totals across worker processes (``runtime.workers``): every worker answers its own
registry's snapshot on a Unix socket in the parent's private directory, and its ``/metrics``
gathers the other workers' snapshots and merges them with its own (``metrics.merge``).

Owns those sockets and the gathering. Why gathering at scrape time rather than shared memory
(prometheus_client's multiprocess mode): counting stays the plain in-process dict update it is
with one worker, with no file per process to write on every increment and none to clean up
after a dead worker; a worker that is gone is simply not asked, so its gauges cannot linger.
The scrape pays instead (one local round trip per worker, concurrently). It must not know what
the metrics mean (``metrics`` does) nor speak HTTP (``admin`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .metrics import Registry, Snapshot, merge

log = logging.getLogger(__name__)

# Seconds the other workers get to answer one scrape: far inside Prometheus' default 10 s
# scrape timeout; a worker too busy for that is left out and counted as not reporting.
GATHER_TIMEOUT = 2.0
# One worker's snapshot as JSON. Label values come from the configuration (listeners, policy
# rules), so real snapshots are kilobytes; the cap only bounds a runaway.
MAX_SNAPSHOT_BYTES = 32 * 1024 * 1024
READ_CHUNK = 64 * 1024


def socket_path(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.sock"


class WorkerMetrics:
    """Worker ``index`` of ``count``: its snapshot server and the totals of every worker."""

    def __init__(
        self,
        directory: Path,
        index: int,
        count: int,
        registry: Registry,
        refresh: Callable[[], None] = lambda: None,
    ) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self._registry = registry
        self._refresh = refresh  # sets the gauges read at scrape time, before a snapshot
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        path = socket_path(self.directory, self.index)
        path.unlink(missing_ok=True)  # left by a killed worker of the same index
        self._server = await asyncio.start_unix_server(self._answer, path=str(path))
        os.chmod(path, 0o600)  # the directory (0700) already keeps other users out

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        socket_path(self.directory, self.index).unlink(missing_ok=True)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection is the request: answer the snapshot as JSON, then close."""
        try:
            self._refresh()
            writer.write(json.dumps(self._registry.snapshot()).encode())
            await writer.drain()
        except OSError as err:
            log.debug("worker metrics answer failed", extra={"error": str(err)})
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _ask(self, index: int) -> Snapshot | None:
        """Worker ``index``'s snapshot, or None (logged) when it does not answer in time."""
        path = socket_path(self.directory, index)
        try:
            async with asyncio.timeout(GATHER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    data = bytearray()
                    while chunk := await reader.read(READ_CHUNK):
                        data += chunk
                        if len(data) > MAX_SNAPSHOT_BYTES:
                            raise ValueError(f"more than {MAX_SNAPSHOT_BYTES} bytes")
                finally:
                    writer.close()
            snapshot = json.loads(data)
            if not isinstance(snapshot, list):
                raise ValueError(f"expected a JSON list, got {type(snapshot).__name__}")
        except (OSError, TimeoutError, ValueError) as err:
            log.warning(
                "worker metrics unavailable",
                extra={"worker": index, "error": str(err) or type(err).__name__},
            )
            return None
        return snapshot

    async def render(self) -> str:
        """The Prometheus text of every worker's totals, and how many workers they cover."""
        others = [i for i in range(self.count) if i != self.index]
        answers = await asyncio.gather(*(self._ask(i) for i in others))
        self._refresh()
        snapshots = [self._registry.snapshot(), *(a for a in answers if a is not None)]
        totals = merge(snapshots)
        totals.gauge("meshid_proxy_workers", "Worker processes (runtime.workers).").inc(self.count)
        totals.gauge(
            "meshid_proxy_workers_reporting",
            "Worker processes whose metrics these totals include; fewer than "
            "meshid_proxy_workers when some did not answer.",
        ).inc(len(snapshots))
        return totals.render()
