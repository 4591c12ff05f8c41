"""Running the server: sockets, the rotator job, the admin API process shell.

Owns process-level I/O: the admin Unix socket (created in a 0700 folder, mode 0600, never
world-writable even for an instant), the kernel peer credentials of each admin connection, the
APScheduler job that runs the rotation planner, and orderly shutdown on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain
from uvicorn.protocols.http.h11_impl import H11Protocol

from .admin_api import PEERCRED_SCOPE_KEY, create_admin_app
from .config import ServerConfig
from .datastore import Datastore
from .errors import CaError
from .keys import DiskKeyManager, load_private_key_pem, write_private_file
from .service import CaService, CaSettings, UpstreamCA

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_credentials(sock: socket.socket | None) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process on the other end of a Unix socket, from the kernel."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class PeerCredProtocol(H11Protocol):
    """uvicorn's h11 protocol, adding the peer's kernel credentials to every request scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cred = peer_credentials(transport.get_extra_info("socket"))
        inner = self.app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope[PEERCRED_SCOPE_KEY] = cred
            await inner(scope, receive, send)

        self.app = app


def bind_private_socket(path: Path) -> socket.socket:
    """A listening Unix socket of mode 0600 in a folder of mode 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # stale socket of a dead server
        else:
            raise CaError(f"admin socket {path} is in use by a running server")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server without its signal capture: uvicorn re-raises the captured signal after
    shutdown, which would make an orderly SIGTERM exit look like a crash (status -15)."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()

    def request_exit(self) -> None:
        self.should_exit = True


def _server_id(data_dir: Path) -> str:
    path = data_dir / "server_id"
    if path.exists():
        return path.read_text().strip()
    server_id = uuid.uuid4().hex
    write_private_file(path, server_id.encode())
    return server_id


def _load_upstream(config: ServerConfig) -> UpstreamCA | None:
    up = config.upstream
    if up is None:
        return None
    try:
        certs = tuple(x509.load_pem_x509_certificates(up.cert_file.read_bytes()))
        key = load_private_key_pem(up.key_file.read_bytes(), field="upstream.key_file")
    except OSError as err:
        raise CaError(f"upstream CA: cannot read {err.filename}: {err.strerror}") from err
    except ValueError as err:
        raise CaError(f"upstream CA: {up.cert_file} is not PEM certificates: {err}") from err
    if _spki(certs[0].public_key()) != _spki(key.public_key()):
        raise CaError("upstream CA: upstream.key_file does not match the first certificate")
    if certs[-1].subject != certs[-1].issuer:
        raise CaError("upstream CA: upstream.cert_file must end with its self-signed root")
    return UpstreamCA(certs, key)


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def build_service(config: ServerConfig) -> CaService:
    """Compose the service from configuration (no sockets yet)."""
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(config.data_dir, 0o700)
    settings = CaSettings(
        trust_domain=TrustDomain(config.trust_domain),
        server_id=_server_id(config.data_dir),
        key_type=config.key_type,
        jwt_key_type=config.jwt_key_type,
        ca_ttl=timedelta(seconds=config.ca_ttl),
        x509_svid_ttl=timedelta(seconds=config.default_x509_svid_ttl),
        jwt_svid_ttl=timedelta(seconds=config.default_jwt_svid_ttl),
        upstream=_load_upstream(config),
    )
    store = Datastore(config.database_url())
    return CaService(settings, store, DiskKeyManager(config.data_dir / "keys"))


async def serve(config: ServerConfig) -> None:
    """Run the server until SIGTERM/SIGINT."""
    service = build_service(config)
    service.start()
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(
        service.rotate,
        "interval",
        seconds=config.rotation_interval,
        max_instances=1,
        coalesce=True,
        id="rotate",
    )
    scheduler.start()
    sock = bind_private_socket(config.socket_path())
    allowed = frozenset({os.getuid(), 0, *config.admin_uids})
    app = create_admin_app(service, allowed_uids=allowed)
    uv_config = uvicorn.Config(
        app, http=PeerCredProtocol, lifespan="off", log_level="warning", access_log=False
    )
    server = _Server(uv_config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_exit)
    log.info(
        "server ready",
        extra={"trust_domain": config.trust_domain, "admin_socket": str(config.socket_path())},
    )
    # The demo and the tests wait for this line on stdout.
    print(f"meshid server ready: admin socket {config.socket_path()}", flush=True)
    try:
        await server.serve(sockets=[sock])
    finally:
        scheduler.shutdown(wait=True)
        sock.close()
        config.socket_path().unlink(missing_ok=True)
        service.store.close()
