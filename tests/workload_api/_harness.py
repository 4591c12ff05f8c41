"""A real Workload API server in a background event loop, for the synchronous py-spiffe client.

py-spiffe's client is blocking (grpcio threads), so the server runs on an asyncio loop in its own
thread and the test thread talks to it over a real Unix socket. Teardown stops the server and
checks that nothing was left behind: no task on the loop, no waiter on the provider, no call in
flight, no socket file.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc

from workload_api import _messages as pb
from workload_api.attestors import CompositeAttestor, UnixAttestor, WorkloadAttestor
from workload_api.server import SECURITY_HEADER, SECURITY_HEADER_VALUE, WorkloadApiServer
from workload_api.static import StaticIdentityProvider

T = TypeVar("T")
CALL_TIMEOUT = 10.0  # seconds; generous for a loaded CI machine, never reached when all is well
HEADER = ((SECURITY_HEADER, SECURITY_HEADER_VALUE),)


class LoopThread:
    """An event loop running in a daemon thread; ``run`` a coroutine on it and get the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def leftover_tasks(self) -> set[asyncio.Task[Any]]:
        async def others() -> set[asyncio.Task[Any]]:
            await asyncio.sleep(0)  # let just-cancelled tasks finish their last step
            return asyncio.all_tasks() - {asyncio.current_task()}

        return self.run(others())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self.loop.close()


def socket_folder() -> Path:
    """A short folder under /tmp (sun_path holds 107 bytes), traversable by other uids."""
    folder = Path(tempfile.mkdtemp(prefix="wl-", dir="/tmp"))
    folder.chmod(0o755)  # mkdtemp makes it 0700; forked setuid children must reach the socket
    return folder


def self_attestor() -> CompositeAttestor:
    """The real unix attestor on the real /proc, behind the pid-reuse guard."""
    return CompositeAttestor([UnixAttestor()])


@contextmanager
def served(
    provider: StaticIdentityProvider,
    attestor: WorkloadAttestor | None = None,
    **options: Any,
) -> Iterator[tuple[WorkloadApiServer, LoopThread]]:
    """A started server on a fresh socket; stopped and checked for leftovers afterwards."""
    folder = socket_folder()
    loop = LoopThread()
    server = loop.run(
        _started(provider, attestor or self_attestor(), folder / "agent" / "api.sock", options)
    )
    try:
        yield server, loop
    finally:
        try:
            loop.run(server.stop(timedelta(seconds=2)))
            assert loop.leftover_tasks() == set()
            assert provider.waiters == 0
            assert server.active_calls == 0
            assert not server.socket_path.exists()
        finally:
            loop.close()
            shutil.rmtree(folder, ignore_errors=True)


async def _started(
    provider: StaticIdentityProvider,
    attestor: WorkloadAttestor,
    path: Path,
    options: dict[str, Any],
) -> WorkloadApiServer:
    server = WorkloadApiServer(provider, attestor, path, **options)
    await server.start()
    return server


def endpoint(server: WorkloadApiServer) -> str:
    """The server's address as a ``SPIFFE_ENDPOINT_SOCKET`` value."""
    return f"unix://{server.socket_path}"


@contextmanager
def raw_channel(server: WorkloadApiServer) -> Iterator[grpc.Channel]:
    """A plain grpcio channel: no py-spiffe, no header unless the call adds it."""
    channel = grpc.insecure_channel(f"unix:{os.fspath(server.socket_path)}")
    try:
        yield channel
    finally:
        channel.close()


def x509_svid_stream(channel: grpc.Channel) -> Any:
    return channel.unary_stream(
        "/SpiffeWorkloadAPI/FetchX509SVID",
        request_serializer=pb.X509SVIDRequest.SerializeToString,
        response_deserializer=pb.X509SVIDResponse.FromString,
    )


def unary(channel: grpc.Channel, path: str, response: Any) -> Any:
    return channel.unary_unary(
        path,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response.FromString,
    )


def streaming(channel: grpc.Channel, path: str, response: Any) -> Any:
    return channel.unary_stream(
        path,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response.FromString,
    )
