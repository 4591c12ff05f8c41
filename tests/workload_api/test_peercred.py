"""Peer credentials from the kernel, and the one grpclib private attribute they depend on."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from grpclib.protocol import Peer

from workload_api.peercred import PeerUnknown, peer_credentials, transport_of


async def _connected_transports() -> tuple[asyncio.Transport, asyncio.Transport]:
    left, right = socket.socketpair(socket.AF_UNIX)
    loop = asyncio.get_running_loop()
    a, _ = await loop.connect_accepted_socket(asyncio.Protocol, left)
    b, _ = await loop.connect_accepted_socket(asyncio.Protocol, right)
    assert isinstance(a, asyncio.Transport) and isinstance(b, asyncio.Transport)
    return a, b


def test_grpclib_peer_still_wraps_the_transport() -> None:
    """grpclib's Peer keeps the transport in ``_transport``; the server reads SO_PEERCRED there.

    If a grpclib release renames it, this fails first (and the server would refuse every
    caller with PermissionDenied rather than misidentify one).
    """

    async def scenario() -> None:
        server_side, client_side = await _connected_transports()
        try:
            peer = Peer(server_side)  # what grpclib.server.Stream.peer holds
            assert transport_of(peer) is server_side
            credentials = peer_credentials(transport_of(peer))
            assert (credentials.pid, credentials.uid, credentials.gid) == (
                os.getpid(),
                os.geteuid(),
                os.getegid(),
            )
        finally:
            server_side.close()
            client_side.close()
            await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_peer_without_transport_fails_closed() -> None:
    with pytest.raises(PeerUnknown, match="_transport"):
        transport_of(object())


def test_a_tcp_peer_has_no_credentials() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            with pytest.raises(PeerUnknown, match="not connected over a Unix socket"):
                peer_credentials(writer.transport)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
