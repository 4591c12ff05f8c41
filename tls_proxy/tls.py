"""TLS contexts from the current identity, the peer's chain after a handshake, failure reasons.

Owns ``TlsContexts``: a server ``SSLContext`` (ALPN ``h2``, ``http/1.1``) and client ones (no
ALPN for TCP, ``http/1.1`` or ``h2``: each offers only what it will speak) built from one
``IdentitySnapshot`` and rebuilt whenever the identity source reports a change, so the next
handshake presents the new SVID and trusts the new bundles while open connections carry on with
the context they started with. Python's ``ssl`` cannot verify against per-trust-domain bundles
during the handshake, so the contexts demand a certificate (``CERT_REQUIRED``) and trust every
current anchor (ours and federated); SPIFFE authentication proper happens right after the
handshake in ``spiffe_verify.verify_peer`` over the chain the peer sent (see docs/proxy.md,
"SPIFFE verification"). Hostname checks are off: SPIFFE IDs, not DNS names, identify peers.

It must not decide authorization nor touch sockets beyond reading the handshake's results.
"""

from __future__ import annotations

import _ssl
import contextlib
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from .errors import IdentityError, RejectReason
from .identity import IdentitySnapshot, IdentitySource

log = logging.getLogger(__name__)

MINIMUM_TLS = ssl.TLSVersion.TLSv1_2  # issue 4: TLS 1.2 minimum; 1.3 is negotiated when both can
ALPN_H2 = "h2"  # RFC 9113 §3.2
ALPN_HTTP1 = "http/1.1"
# The server accepts both; a client offers only what it will speak on that connection, so an
# HTTP/1.1 app is never switched to h2 by the far side (RFC 7301 §3.2: the server picks).
SERVER_ALPN = (ALPN_H2, ALPN_HTTP1)

# OpenSSL X509_V_ERR_* codes seen in SSLCertVerificationError.verify_code.
_EXPIRED_CODES = frozenset({9, 10})  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
_UNKNOWN_CA_CODES = frozenset({2, 7, 18, 19, 20, 21})  # no issuer / bad signature / self-signed
# OpenSSL reason strings of the alerts and errors we classify.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": RejectReason.NO_CLIENT_CERTIFICATE,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": RejectReason.NO_CLIENT_CERTIFICATE,
    "TLSV1_ALERT_UNKNOWN_CA": RejectReason.UNKNOWN_CA,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": RejectReason.EXPIRED,
    "SSLV3_ALERT_BAD_CERTIFICATE": RejectReason.UNKNOWN_CA,
}


@dataclass(frozen=True)
class TlsState:
    """Contexts and the snapshot they were built from: taken together for one connection."""

    snapshot: IdentitySnapshot
    server: ssl.SSLContext  # ALPN: h2, http/1.1 (server's order wins)
    client: ssl.SSLContext  # no ALPN: opaque TCP
    client_http1: ssl.SSLContext  # ALPN offers http/1.1 only
    client_h2: ssl.SSLContext  # ALPN offers h2 only: used when the app spoke h2c

    def client_for(self, alpn: str | None) -> ssl.SSLContext:
        """The client context offering exactly ``alpn`` (None: no ALPN)."""
        if alpn == ALPN_H2:
            return self.client_h2
        if alpn == ALPN_HTTP1:
            return self.client_http1
        return self.client


@contextlib.contextmanager
def _private_files(snapshot: IdentitySnapshot) -> Iterator[tuple[str, str]]:
    """The chain and key as PEM files readable only by us, removed right after loading.

    ``SSLContext.load_cert_chain`` reads only files; the key never leaves a 0700 folder.
    """
    folder = tempfile.mkdtemp(prefix="meshid-proxy-")
    cert = Path(folder) / "svid.pem"
    key = Path(folder) / "svid.key"
    try:
        cert.write_bytes(snapshot.chain_pem())
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(snapshot.key_pem())
        yield str(cert), str(key)
    finally:
        for path in (cert, key):
            path.unlink(missing_ok=True)
        os.rmdir(folder)


def build_contexts(snapshot: IdentitySnapshot) -> TlsState:
    """A server context and client contexts (one per ALPN offer) presenting ``snapshot``'s SVID
    and trusting its bundles."""
    anchors = "".join(
        root.public_bytes(serialization.Encoding.PEM).decode()
        for roots in snapshot.bundles.values()
        for root in roots
    )
    contexts = []
    purposes = (ssl.PROTOCOL_TLS_SERVER, *[ssl.PROTOCOL_TLS_CLIENT] * 3)
    alpns: tuple[tuple[str, ...], ...] = (SERVER_ALPN, (), (ALPN_HTTP1,), (ALPN_H2,))
    for purpose, alpn in zip(purposes, alpns, strict=True):
        context = ssl.SSLContext(purpose)
        context.minimum_version = MINIMUM_TLS
        context.check_hostname = False  # SPIFFE authentication replaces hostname checks
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            with _private_files(snapshot) as (cert, key):
                context.load_cert_chain(cert, key)
            context.load_verify_locations(cadata=anchors)
        except (ssl.SSLError, OSError) as err:
            raise IdentityError(f"identity: cannot load the SVID into TLS: {err}") from err
        if alpn:
            context.set_alpn_protocols(list(alpn))
        contexts.append(context)
    return TlsState(snapshot, *contexts)


class TlsContexts:
    """The current ``TlsState``, swapped whenever the identity source changes."""

    def __init__(self, source: IdentitySource) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._state = self._build(source.current())
        self.rotations = 0
        source.subscribe(self._on_change)

    def current(self) -> TlsState:
        # Read on every handshake and pooled checkout: reading one reference is atomic, and
        # the state is swapped whole (the lock orders the writers).
        return self._state

    def _build(self, snapshot: IdentitySnapshot) -> TlsState:
        state = build_contexts(snapshot)
        state.server.sni_callback = self._at_client_hello
        return state

    def _at_client_hello(
        self, ssl_object: ssl.SSLObject, _server_name: str | None, context: ssl.SSLContext
    ) -> None:
        """The server side picks its certificate when the ClientHello arrives, not when the
        connection was accepted: a handshake that waited in a backlog across a rotation still
        presents the current SVID (and trusts the current bundles)."""
        current = self.current().server
        if context is not current:
            ssl_object.context = current

    def _on_change(self, snapshot: IdentitySnapshot) -> None:
        try:
            state = self._build(snapshot)
        except IdentityError as err:
            log.error("new identity not usable for TLS; keeping the old", extra={"error": str(err)})
            return
        with self._lock:
            self._state = state
            self.rotations += 1
        log.info(
            "TLS contexts rebuilt",
            extra={"spiffe_id": snapshot.spiffe_id, "version": snapshot.version},
        )

    def close(self) -> None:
        self._source.unsubscribe(self._on_change)


def peer_chain_der(ssl_object: ssl.SSLObject | None) -> list[bytes]:
    """The certificates the peer sent, leaf first, as DER.

    CPython 3.10-3.12 expose OpenSSL's ``SSL_get_peer_cert_chain`` only on the private
    ``_sslobj.get_unverified_chain()`` (public from 3.13 as ``SSLObject.get_unverified_chain``).
    Without it, only the leaf is known, and ``verify_peer`` can anchor only leaves signed
    directly by a bundle root (docs/proxy.md, "SPIFFE verification").
    """
    if ssl_object is None:
        return []
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return [cert.public_bytes(_ssl.ENCODING_DER) for cert in chain]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def classify_ssl_error(err: BaseException) -> RejectReason:
    """The ``RejectReason`` of a failed handshake, from OpenSSL's verify code or reason."""
    if isinstance(err, ssl.SSLCertVerificationError):
        if err.verify_code in _EXPIRED_CODES:
            return RejectReason.EXPIRED
        if err.verify_code in _UNKNOWN_CA_CODES:
            return RejectReason.UNKNOWN_CA
    if isinstance(err, ssl.SSLError):
        reason = getattr(err, "reason", None)
        if reason in _REASONS:
            return _REASONS[reason]
    return RejectReason.HANDSHAKE_FAILED
