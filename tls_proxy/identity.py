"""Where the proxy's own SVID and its trust bundles come from, with rotation hidden behind a seam.

Owns ``IdentitySnapshot`` (the current SVID chain and key, the X.509 bundles per trust domain)
and the ``IdentitySource`` seam, in py-spiffe ``X509Source`` style: a snapshot getter, a
subscription for changes and ``close()``. Two sources:

- ``FileIdentitySource``: PEM files (``cert`` chain leaf first, ``key``, ``bundle``), reloaded when
  their mtime or size changes (``poll``, driven by ``watch``) or on demand (``reload``, SIGHUP).
  A half-written rotation (a cert that does not match the key) keeps the last good snapshot and
  is retried on the next poll.
- ``WorkloadApiIdentitySource``: py-spiffe's ``X509Source`` streaming from the Workload API.

Subscribers are called with the new snapshot, possibly from another thread (py-spiffe's watcher);
they must only swap references. This module must not build TLS contexts (``tls`` does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from spiffe.errors import PySpiffeError

from ca.errors import InvalidSvid
from ca.spiffe_light import load_all as _load_spiffe
from ca.validation import validate_x509_svid

if TYPE_CHECKING:
    from spiffe import X509Svid
    from spiffe.workloadapi.x509_context import X509Context

from .errors import IdentityError
from .watched import FileStamp, files_stamp

log = logging.getLogger(__name__)

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
Subscriber = Callable[["IdentitySnapshot"], None]


@dataclass(frozen=True)
class IdentitySnapshot:
    """One consistent view: our SVID (DER chain leaf first, PKCS#8 DER key) and the bundles."""

    spiffe_id: str
    cert_chain: tuple[bytes, ...]
    private_key: bytes = field(repr=False)
    bundles: Mapping[str, tuple[x509.Certificate, ...]]
    version: int = 1

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id.split("/", 3)[2]

    def chain_pem(self) -> bytes:
        return b"".join(
            x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
            for der in self.cert_chain
        )

    def key_pem(self) -> bytes:
        key = serialization.load_der_private_key(self.private_key, password=None)
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class IdentitySource(Protocol):
    """The seam the proxy consumes; ``current`` raises ``IdentityError`` before the first SVID."""

    def current(self) -> IdentitySnapshot: ...

    def subscribe(self, callback: Subscriber) -> None: ...

    def unsubscribe(self, callback: Subscriber) -> None: ...

    def close(self) -> None: ...


class _Subscribers:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Subscriber] = []

    def add(self, callback: Subscriber) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def remove(self, callback: Subscriber) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def clear(self) -> None:
        with self._lock:
            self._callbacks.clear()

    def notify(self, snapshot: IdentitySnapshot) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(snapshot)


def _snapshot_from_svid(
    svid: X509Svid, bundles: Mapping[str, tuple[x509.Certificate, ...]], version: int
) -> IdentitySnapshot:
    return _snapshot(str(svid.spiffe_id), svid.cert_chain, svid.private_key, bundles, version)


def _snapshot(
    spiffe_id: str,
    chain: Sequence[x509.Certificate],
    key: PrivateKeyTypes,
    bundles: Mapping[str, tuple[x509.Certificate, ...]],
    version: int,
) -> IdentitySnapshot:
    return IdentitySnapshot(
        spiffe_id=spiffe_id,
        cert_chain=tuple(c.public_bytes(serialization.Encoding.DER) for c in chain),
        private_key=key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        bundles=bundles,
        version=version,
    )


def _root_trust_domain(cert: x509.Certificate) -> str | None:
    """The trust domain an authority names in its ``spiffe://td`` URI SAN, if it names one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").split("/", 1)[0]
    return None


def load_identity_files(cert: Path, key: Path, bundle: Path, version: int = 1) -> IdentitySnapshot:
    """Read and check the three PEM files; raises ``IdentityError`` naming the file and problem.

    Bundle certificates that carry a ``spiffe://<td>`` URI SAN (as our CA's authorities do)
    belong to that trust domain; the others to the SVID's own trust domain.
    """
    texts: dict[str, bytes] = {}
    for name, path in (("cert", cert), ("key", key), ("bundle", bundle)):
        try:
            texts[name] = path.read_bytes()
        except OSError as err:
            raise IdentityError(f"identity.{name}: cannot read {path}: {err.strerror}") from err
    # cryptography alone, not py-spiffe's X509Svid.parse: that pulls pyasn1 and pem into every
    # sidecar (~3.5 MiB) and checks less than ``validate_x509_svid``, the rules peers apply.
    try:
        chain = x509.load_pem_x509_certificates(texts["cert"])
    except ValueError as err:
        raise IdentityError(f"identity.cert: {cert}: not PEM certificates ({err})") from err
    try:
        private_key = serialization.load_pem_private_key(texts["key"], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise IdentityError(
            f"identity.key: {key}: not an unencrypted PEM private key ({err})"
        ) from err
    try:
        spiffe_id = validate_x509_svid(chain)
    except InvalidSvid as err:
        raise IdentityError(f"identity.cert: {cert}: not an X509-SVID: {err}") from err
    if chain[0].public_key() != private_key.public_key():
        raise IdentityError(
            f"identity.key: {key} does not match the certificate in {cert} "
            "(a rotation half-written?)"
        )
    try:
        roots = x509.load_pem_x509_certificates(texts["bundle"])
    except ValueError as err:
        raise IdentityError(f"identity.bundle: {bundle}: not PEM certificates ({err})") from err
    own = spiffe_id.trust_domain.name
    bundles: dict[str, list[x509.Certificate]] = {}
    for root in roots:
        bundles.setdefault(_root_trust_domain(root) or own, []).append(root)
    if own not in bundles:
        raise IdentityError(
            f"identity.bundle: {bundle} holds no authority of our trust domain {own!r}"
        )
    by_domain = {k: tuple(v) for k, v in bundles.items()}
    return _snapshot(str(spiffe_id), chain, private_key, by_domain, version)


class FileIdentitySource:
    """Identity from PEM files, reloaded when they change (poll) or on request (SIGHUP)."""

    def __init__(self, cert: Path, key: Path, bundle: Path) -> None:
        self._paths = (cert, key, bundle)
        self._stamp = self._file_stamp()
        self._snapshot = load_identity_files(cert, key, bundle)
        self._subscribers = _Subscribers()
        self._lock = threading.Lock()

    def current(self) -> IdentitySnapshot:
        return self._snapshot

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.add(callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        self._subscribers.remove(callback)

    def close(self) -> None:
        self._subscribers.clear()

    def _file_stamp(self) -> tuple[FileStamp | None, ...]:
        return files_stamp(self._paths)

    def poll(self) -> bool:
        """Reload if any file changed since the last good load; True when a new one took."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        return self.reload(stamp)

    def reload(self, stamp: tuple[FileStamp | None, ...] | None = None) -> bool:
        """Read the files now; on failure keep the last good snapshot and log why."""
        stamp = stamp or self._file_stamp()
        with self._lock:
            try:
                snapshot = load_identity_files(*self._paths, version=self._snapshot.version + 1)
            except IdentityError as err:
                log.warning("identity files not reloaded", extra={"error": str(err)})
                return False
            self._stamp = stamp
            if (snapshot.cert_chain, snapshot.bundles) == (
                self._snapshot.cert_chain,
                self._snapshot.bundles,
            ):
                return False
            self._snapshot = snapshot
        log.info(
            "identity reloaded from files",
            extra={"spiffe_id": snapshot.spiffe_id, "version": snapshot.version},
        )
        self._subscribers.notify(snapshot)
        return True

    async def watch(self, interval: float) -> None:
        """Poll the files every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.poll()


def workload_api_endpoint(endpoint: str | None, what: str) -> str:
    """``endpoint``, or ``SPIFFE_ENDPOINT_SOCKET`` when it is None; ``IdentityError`` (prefixed
    with ``what``, the config block asking) when neither is set."""
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        raise IdentityError(
            f"{what}: no Workload API address: set identity.workload_api or {ENDPOINT_ENV}"
        )
    return endpoint


class WorkloadApiIdentitySource:
    """Identity streamed from the Workload API through py-spiffe's ``X509Source``."""

    def __init__(self, endpoint: str | None, *, timeout: float) -> None:
        """Blocks until the first X509-SVID arrives (call it in a thread from async code).

        ``endpoint`` is ``unix:///path`` or ``tcp://IP:PORT``; ``None`` uses
        ``SPIFFE_ENDPOINT_SOCKET``.
        """
        self.endpoint = endpoint = workload_api_endpoint(endpoint, "identity")
        self._subscribers = _Subscribers()
        self._lock = threading.Lock()
        self._version = 0
        self._snapshot: IdentitySnapshot | None = None
        _load_spiffe()  # the Workload API client (grpc) is loaded only for this source
        from spiffe import X509Source  # noqa: PLC0415

        try:
            self._source = X509Source(socket_path=endpoint, timeout_in_seconds=timeout)
        except PySpiffeError as err:
            raise IdentityError(f"identity: Workload API at {endpoint}: {err}") from err
        self._refresh()
        self._source.subscribe_for_updates(self._on_update)

    def _refresh(self) -> IdentitySnapshot:
        try:
            context: X509Context = self._source.get_x509_context()
        except PySpiffeError as err:
            raise IdentityError(f"identity: Workload API at {self.endpoint}: {err}") from err
        bundles = {
            b.trust_domain.name: tuple(b.x509_authorities) for b in context.x509_bundle_set.bundles
        }
        with self._lock:
            self._version += 1
            snapshot = _snapshot_from_svid(context.default_svid, bundles, self._version)
            self._snapshot = snapshot
        return snapshot

    def _on_update(self) -> None:
        try:
            snapshot = self._refresh()
        except IdentityError as err:
            log.error("identity update from the Workload API failed", extra={"error": str(err)})
            return
        log.info(
            "identity updated from the Workload API",
            extra={"spiffe_id": snapshot.spiffe_id, "version": snapshot.version},
        )
        self._subscribers.notify(snapshot)

    def current(self) -> IdentitySnapshot:
        with self._lock:
            snapshot = self._snapshot
        if snapshot is None:
            raise IdentityError("identity: no X509-SVID received yet")
        return snapshot

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.add(callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        self._subscribers.remove(callback)

    def close(self) -> None:
        self._source.unsubscribe_for_updates(self._on_update)
        self._subscribers.clear()
        self._source.close()
