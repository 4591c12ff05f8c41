"""The kernel's credentials of a Workload API caller: SO_PEERCRED of the connection's socket.

The kernel records pid, uid and gid of the connecting process at ``connect()``; a caller cannot
forge them. The pid is what attestation starts from.

grpclib (0.4.x) gives each request a ``grpclib.protocol.Peer``, whose public methods (``addr``,
``cert``) do not reach the socket. ``Peer`` keeps the asyncio transport in its **private**
attribute ``_transport`` (``grpclib/protocol.py``); this module is the only place that reads it.
``tests/workload_api/test_peercred.py::test_grpclib_peer_still_wraps_the_transport`` fails if a
grpclib release renames it, before any caller is misidentified: without the transport the server
fails closed (``PeerUnknown``), it never guesses.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import Any

from .errors import AttestationFailed

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;} (socket(7))


class PeerUnknown(AttestationFailed):
    """The connection's peer credentials cannot be read (not a Unix socket, pid not visible)."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def transport_of(peer: Any) -> asyncio.BaseTransport:
    """The asyncio transport behind a grpclib ``Peer`` (private attribute, see module doc)."""
    transport = getattr(peer, "_transport", None)
    if not isinstance(transport, asyncio.BaseTransport):
        raise PeerUnknown(
            f"grpclib's Peer no longer exposes its transport as _transport (got {transport!r}); "
            "caller credentials cannot be read"
        )
    return transport


def peer_credentials(transport: asyncio.BaseTransport) -> PeerCredentials:
    """SO_PEERCRED of the transport's Unix socket."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        raise PeerUnknown("the caller is not connected over a Unix socket")
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError as err:
        raise PeerUnknown(f"SO_PEERCRED failed: {err}") from err
    if pid <= 0:
        # The caller lives in a pid namespace this process cannot see: there is nothing to
        # attest (socket(7): the pid is translated into the reader's namespace, 0 if absent).
        raise PeerUnknown(f"the caller's pid is not visible here (SO_PEERCRED pid={pid})")
    return PeerCredentials(pid=pid, uid=uid, gid=gid)
