"""The proxy's streams: asyncio's, with the bytes handed straight to a waiting read.

Owns ``Reader``, an ``asyncio.StreamReader`` whose ``read(n)``, when nothing is buffered and it
has to wait, is handed what ``feed_data`` receives next (up to ``n`` bytes) instead of having it
copied into the buffer and out again: every request waits so once per direction, and the
hand-over is one copy and about twenty Python lines less each time. Everything else (EOF, errors,
flow control, ``StreamWriter``) is asyncio's own. ``open_connection`` and ``start_server`` are
asyncio's functions of the same names, making ``Reader``s.

It must not parse or decide anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Reader(asyncio.StreamReader):
    """``asyncio.StreamReader`` with a direct hand-over from ``feed_data`` to a waiting
    ``read(n)``.

    The hand-over is only taken when the buffer is empty, nothing ended or failed, reading is
    not paused and no other wait is on: then the bytes ``read`` returns are exactly those the
    plain path would return (the first ``n`` of what arrived; the rest is buffered as usual).
    """

    # asyncio.StreamReader's own fields, which typeshed does not declare
    _buffer: bytearray
    _eof: bool
    _exception: BaseException | None
    _loop: asyncio.AbstractEventLoop
    _paused: bool
    _waiter: asyncio.Future[Any] | None
    _wants = 0  # a read waiting for up to this many bytes, handed over by feed_data

    def feed_data(self, data: bytes) -> None:  # type: ignore[override]  # protocols feed bytes
        wants = self._wants
        if wants and data:
            waiter = self._waiter
            self._wants = 0
            self._waiter = None
            if waiter is not None and not waiter.done():
                if len(data) > wants:
                    super().feed_data(data[wants:])
                    data = data[:wants]
                waiter.set_result(data)
                return
        super().feed_data(data)

    async def read(self, n: int = -1) -> bytes:
        if (
            n <= 0
            or self._buffer
            or self._eof
            or self._exception is not None
            or self._waiter is not None
            or self._paused
        ):
            return await super().read(n)
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._wants = n
        try:
            data = await waiter  # an error set meanwhile (set_exception) is raised here
        finally:
            self._waiter = None
            self._wants = 0
        if data is None:  # woken without bytes: the end of the stream
            return await super().read(n)
        assert isinstance(data, bytes)
        return data


async def open_connection(
    host: str | None = None, port: int | None = None, **kwargs: Any
) -> tuple[Reader, asyncio.StreamWriter]:
    """``asyncio.open_connection``, reading with a ``Reader``."""
    loop = asyncio.get_running_loop()
    reader = Reader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    # host and port, or sock= in kwargs, as asyncio.open_connection takes them
    transport, _ = await loop.create_connection(
        lambda: protocol,
        host,  # type: ignore[arg-type]
        port,  # type: ignore[arg-type]
        **kwargs,
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_server(
    connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str | None,
    port: int,
    **kwargs: Any,
) -> asyncio.Server:
    """``asyncio.start_server``, each connection reading with a ``Reader``."""
    loop = asyncio.get_running_loop()

    def protocol() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(Reader(loop=loop), connected, loop=loop)

    return await loop.create_server(protocol, host, port, **kwargs)
