"""Where the Workload API listens: ``SPIFFE_ENDPOINT_SOCKET`` values and the Unix socket itself.

Owns the endpoint rules of SPIFFE Workload Endpoint §4 as this server applies them, and the
socket's life on disk: its folder is created when missing (0755), a stale socket left by a dead
server is removed (a live one is refused), and the socket is bound with mode 0777 before it
listens, as SPIRE does for its public Workload API socket: who may *connect* is not the question,
attestation decides what a caller gets.

Only Unix sockets are served: the server identifies callers by the kernel's peer credentials
(SO_PEERCRED), which a TCP connection does not carry. It must not decide anything about callers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import InvalidEndpoint

ENV_VAR = "SPIFFE_ENDPOINT_SOCKET"
DEFAULT_SOCKET_MODE = 0o777  # SPIRE's public socket: anyone may connect, attestation decides
SOCKET_DIR_MODE = 0o755  # SPIRE's practice for the socket's folder: readable, not writable
MAX_SOCKET_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes on Linux, NUL included
LISTEN_BACKLOG = 128  # pending connections; a node's workloads reconnecting at once after a restart
_RULE = "must be unix:///absolute/path (SPIFFE Workload Endpoint §4)"


def parse_endpoint_socket(value: str) -> Path:
    """The socket path of a ``SPIFFE_ENDPOINT_SOCKET`` value.

    Accepted: ``unix:///abs/path`` (and ``unix:/abs/path``, the same URI without the empty
    authority). Refused with ``InvalidEndpoint`` naming the rule: relative paths
    (``unix:relative``), an authority (``unix://host/path``), query, fragment or user info, other
    schemes, and ``tcp://`` (valid SPIFFE, but this server only serves Unix sockets).
    """
    if not value:
        raise InvalidEndpoint(f"{ENV_VAR} is empty: it {_RULE}")
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme == "tcp":
        raise InvalidEndpoint(
            f"{ENV_VAR}={value!r}: tcp is not supported by this server; the Workload API "
            "identifies callers by the kernel's peer credentials, which only Unix sockets carry "
            f"(the value {_RULE})"
        )
    if scheme != "unix":
        shown = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise InvalidEndpoint(f"{ENV_VAR}={value!r} has {shown}: it {_RULE}")
    if parts.netloc:
        raise InvalidEndpoint(
            f"{ENV_VAR}={value!r} has an authority ({parts.netloc!r}): a unix URI has none; it "
            f"{_RULE}"
        )
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise InvalidEndpoint(f"{ENV_VAR}={value!r} has a query or fragment: it {_RULE}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidEndpoint(f"{ENV_VAR}={value!r} has a relative or empty path: it {_RULE}")
    check_socket_path(Path(path))
    return Path(path)


def check_socket_path(path: Path) -> None:
    """Refuse a path the kernel cannot bind: relative, or longer than ``sun_path``."""
    if not path.is_absolute():
        raise InvalidEndpoint(f"socket path {str(path)!r} must be absolute")
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise InvalidEndpoint(
            f"socket path {str(path)!r} is {size} bytes; a Unix socket path holds at most "
            f"{MAX_SOCKET_PATH_BYTES} (sockaddr_un.sun_path)"
        )


def bind_socket(path: Path, *, mode: int = DEFAULT_SOCKET_MODE) -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode``, its folder created if missing.

    The mode is set between ``bind`` and ``listen``: nobody can connect before it is final.
    """
    check_socket_path(path)
    _make_folder(path.parent)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise InvalidEndpoint(f"cannot listen on {str(path)!r}: {err}") from err
    return sock


def remove_socket(path: Path) -> None:
    """Remove our socket file on shutdown (a missing one is fine)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


def _make_folder(folder: Path) -> None:
    missing: list[Path] = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        with contextlib.suppress(FileExistsError):
            candidate.mkdir()
            os.chmod(candidate, SOCKET_DIR_MODE)  # mkdir's mode is cut by the umask
    if not folder.is_dir():
        raise InvalidEndpoint(f"socket folder {str(folder)!r} is not a directory")


def _remove_stale(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise InvalidEndpoint(f"{str(path)!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise InvalidEndpoint(f"cannot probe the old socket {str(path)!r}: {err}") from err
    else:
        raise InvalidEndpoint(f"{str(path)!r} is in use by a live server; refusing to replace it")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # stale: its server died without cleaning up
