"""Running the server: sockets, the rotator job, the admin API process shell.

Owns process-level I/O: the admin Unix socket (created in a 0700 folder, mode 0600, never
world-writable even for an instant), the kernel peer credentials of each admin connection, the
APScheduler job that runs the rotation planner, and orderly shutdown on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import struct
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from fastapi.responses import Response
from spiffe import TrustDomain
from uvicorn.protocols.http.h11_impl import H11Protocol

from .admin_api import PEER_SCOPE_KEY, Peer, create_admin_app
from .bundle import to_spiffe_json
from .config import ServerConfig, parse_host_port
from .datastore import Datastore
from .errors import CaError
from .keys import DiskKeyManager, load_private_key_pem, write_private_file
from .nodeapi.attestation import load_provisioning_cas
from .nodeapi.server import NodeApiServer
from .server_identity import SERVER_SVID_RENEW_CHECK, ServerIdentity, tls_peer_leaf
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


def admin_protocol(identity: ServerIdentity | None) -> type[H11Protocol]:
    """uvicorn's h11 protocol that puts the authenticated ``Peer`` into every request scope.

    asyncio calls ``connection_made`` after the TLS handshake, so the client certificate is
    there to check once per connection.
    """

    class AdminProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = _identify(transport, identity)
            inner = self.app

            async def app(scope: Any, receive: Any, send: Any) -> None:
                scope[PEER_SCOPE_KEY] = peer
                await inner(scope, receive, send)

            self.app = app

    return AdminProtocol


def _identify(transport: asyncio.Transport, identity: ServerIdentity | None) -> Peer:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        cred = peer_credentials(transport.get_extra_info("socket"))
        if cred is None:
            return Peer(via="unix", error="no peer credentials")
        return Peer(via="unix", pid=cred[0], uid=cred[1])
    if identity is None:
        return Peer(via="mtls", error="TLS is not configured")
    try:
        spiffe_id = identity.authenticate_peer(tls_peer_leaf(ssl_object))
    except CaError as err:
        return Peer(via="mtls", error=str(err))
    return Peer(via="mtls", spiffe_id=str(spiffe_id))


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


def _load_x509pop_cas(config: ServerConfig) -> tuple[x509.Certificate, ...]:
    path = config.x509pop_ca_bundle
    if path is None:
        return ()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CaError(f"x509pop_ca_bundle: cannot read {path}: {err.strerror}") from err
    return load_provisioning_cas(data, str(path))


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


def bundle_endpoint_app(service: CaService) -> FastAPI:
    """The SPIFFE bundle endpoint: GET / returns our bundle, no client authentication."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/")
    def bundle() -> Response:
        return Response(to_spiffe_json(service.bundle()), media_type="application/json")

    return app


def _tcp_socket(address: str) -> socket.socket:
    host, port = parse_host_port(address, "address")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio and grpclib set TCP_NODELAY on accepted connections only
    # when the listening socket says so; without it small replies wait ~40 ms for delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _uvicorn(app: Any, protocol: type[H11Protocol] | None, ctx: ssl.SSLContext | None) -> _Server:
    config = uvicorn.Config(
        app,
        http=protocol or "h11",
        lifespan="off",
        log_level="warning",
        access_log=False,
        # Our own context object, so certificate renewal reaches the live listener.
        ssl_context_factory=(lambda _config, _default: ctx) if ctx is not None else None,
    )
    return _Server(config)


async def serve(config: ServerConfig) -> None:
    """Run the server until SIGTERM/SIGINT."""
    service = build_service(config)
    x509pop_cas = _load_x509pop_cas(config)
    service.start()
    identity = ServerIdentity(service, config.data_dir / "private")
    scheduler = BackgroundScheduler(timezone="UTC")
    jobs: list[tuple[str, Callable[[], object], float]] = [
        ("rotate", service.rotate, config.rotation_interval),
        ("federation", service.refresh_due_federated_bundles, config.federation_refresh_interval),
    ]
    if config.admin_listen or config.bundle_endpoint or config.bind:
        identity.renew()
        jobs.append(("server-svid", identity.renew_if_due, SERVER_SVID_RENEW_CHECK.total_seconds()))
    for job_id, func, seconds in jobs:
        scheduler.add_job(
            func, "interval", seconds=seconds, max_instances=1, coalesce=True, id=job_id
        )
    scheduler.start()
    allowed = frozenset({os.getuid(), 0, *config.admin_uids})
    admin_app = create_admin_app(service, allowed_uids=allowed)
    servers: list[tuple[_Server, socket.socket]] = [
        (_uvicorn(admin_app, admin_protocol(None), None), bind_private_socket(config.socket_path()))
    ]
    if config.admin_listen:
        ctx = identity.context(client_auth=True)
        servers.append(
            (_uvicorn(admin_app, admin_protocol(identity), ctx), _tcp_socket(config.admin_listen))
        )
    if config.bundle_endpoint:
        ctx = identity.context(client_auth=False)
        servers.append(
            (_uvicorn(bundle_endpoint_app(service), None, ctx), _tcp_socket(config.bundle_endpoint))
        )
    node_api: NodeApiServer | None = None
    if config.bind:
        node_api = NodeApiServer(service, identity, provisioning_cas=x509pop_cas)
        await node_api.start(_tcp_socket(config.bind))
    loop = asyncio.get_running_loop()

    def request_exit() -> None:
        for server, _ in servers:
            server.request_exit()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_exit)
    # What startup built (modules, tables, the service, the apps) lives as long as the process.
    # Frozen, it is no longer walked by every full collection, which otherwise stalls signing
    # for tens of milliseconds at a time (bench/ca_sign.py does the same).
    gc.collect()
    gc.freeze()
    log.info(
        "server ready",
        extra={
            "trust_domain": config.trust_domain,
            "admin_socket": str(config.socket_path()),
            "admin_listen": config.admin_listen,
            "bundle_endpoint": config.bundle_endpoint,
            "bind": config.bind,
        },
    )
    # The demo and the tests wait for this line on stdout.
    print(f"meshid server ready: admin socket {config.socket_path()}", flush=True)
    try:
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in servers))
    finally:
        if node_api is not None:
            await node_api.stop()
        scheduler.shutdown(wait=True)
        for _, sock in servers:
            sock.close()
        config.socket_path().unlink(missing_ok=True)
        service.store.close()
