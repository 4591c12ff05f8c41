"""tls_proxy.streams.Reader: the hand-over to a waiting read gives what asyncio's path gives."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tls_proxy import streams


def _in_a_loop(case: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A test case run in an event loop of its own."""

    @functools.wraps(case)
    def test() -> None:
        asyncio.run(case())

    return test


async def _waiting(reader: streams.Reader, n: int) -> asyncio.Task[bytes]:
    """A read(n) that has started waiting (its waiter is set)."""
    task = asyncio.ensure_future(reader.read(n))
    while reader._waiter is None:
        await asyncio.sleep(0)  # one loop turn: the task runs up to its wait
    return task


@_in_a_loop
async def test_a_waiting_read_is_handed_the_bytes_and_the_rest_is_buffered() -> None:
    reader = streams.Reader()
    task = await _waiting(reader, 4)
    reader.feed_data(b"abcdef")
    assert await task == b"abcd"
    assert await reader.read(100) == b"ef"  # from the buffer, as asyncio's read gives it
    assert reader._wants == 0 and reader._waiter is None


@_in_a_loop
async def test_a_read_with_bytes_buffered_takes_them_first() -> None:
    reader = streams.Reader()
    reader.feed_data(b"first")
    assert await reader.read(3) == b"fir"
    assert bytes(reader._buffer) == b"st"  # kept: the next read takes it without waiting
    assert await reader.read(10) == b"st"
    assert reader._waiter is None


@_in_a_loop
async def test_eof_while_waiting_reads_empty() -> None:
    reader = streams.Reader()
    task = await _waiting(reader, 10)
    reader.feed_eof()
    assert await task == b""
    assert reader.at_eof()


@_in_a_loop
async def test_an_error_while_waiting_is_raised_by_the_read() -> None:
    reader = streams.Reader()
    task = await _waiting(reader, 10)
    reader.set_exception(ConnectionResetError("reset by peer"))
    with pytest.raises(ConnectionResetError, match="reset by peer"):
        await task


@_in_a_loop
async def test_a_cancelled_read_leaves_later_bytes_in_the_buffer() -> None:
    reader = streams.Reader()
    task = await _waiting(reader, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reader._wants == 0 and reader._waiter is None
    reader.feed_data(b"late")
    assert bytes(reader._buffer) == b"late"
    assert await reader.read(10) == b"late"


@_in_a_loop
async def test_read_all_and_zero_take_asyncio_path() -> None:
    reader = streams.Reader()
    assert await reader.read(0) == b""
    reader.feed_data(b"one ")
    reader.feed_data(b"two")
    reader.feed_eof()
    assert await reader.read() == b"one two"


@_in_a_loop
async def test_a_connection_through_open_connection_and_start_server() -> None:
    """Real sockets on loopback, both ends made by the module, bytes both ways."""
    received: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert isinstance(reader, streams.Reader)
        while data := await reader.read(3):
            received.append(data)
            writer.write(data.upper())
        writer.close()

    server = await streams.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await streams.open_connection("127.0.0.1", port)
    assert isinstance(reader, streams.Reader)
    writer.write(b"hello")
    answer = b""
    while len(answer) < 5:
        answer += await reader.read(100)
    assert answer == b"HELLO"
    assert all(len(chunk) <= 3 for chunk in received)
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
