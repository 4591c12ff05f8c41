"""The server's own X509-SVID (``spiffe://<td>/meshid/server``) and the TLS contexts using it.

Owns issuing and renewing that SVID (at half its lifetime, and whenever the bundle changes) and
keeping every TLS context built from it current: new handshakes use the new certificate at once,
open connections carry on. The key and chain live in ``<data_dir>/private`` with mode 0600.
It also authenticates TLS peers (admin clients, agents on the node API) against the *current*
authorities, so a revoked authority stops opening doors even though OpenSSL's trust store can
only ever grow.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId

from .authority import AuthorityKind, Status
from .bundle import to_pem
from .errors import CaError, InvalidSvid
from .keys import KeyType, generate_key, private_key_pem, write_private_file
from .service import CaService, X509Request
from .validation import validate_x509_svid

log = logging.getLogger(__name__)

RENEW_DIVISOR = 2  # renew the server SVID at half its lifetime, like the agent does for workloads
# A DNS SAN of the server SVID besides its SPIFFE ID: gRPC clients (agents) check the server's
# certificate by host name, so they dial with this name (ssl_target_name_override). Entries may
# not carry it (ca.entries.RESERVED_DNS_NAMES).
SERVER_TLS_NAME = "meshid-server"


@dataclass(frozen=True)
class PeerSvid:
    """A TLS peer's X509-SVID, checked against the authorities in force."""

    spiffe_id: SpiffeId
    certificate: x509.Certificate


def verify_peer_svid(service: CaService, leaf_der: bytes | None) -> PeerSvid:
    """Check a TLS client's leaf: an X509-SVID of our trust domain, within its validity,
    signed by one of our current (prepared, active or old, unexpired) X.509 authorities.

    OpenSSL's trust store can only grow, so this runs in our code on every connection or call:
    a revoked authority stops opening doors at once.
    """
    if not leaf_der:
        raise InvalidSvid("no client certificate presented")
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
    except ValueError as err:
        raise InvalidSvid("the client certificate is not DER X.509") from err
    spiffe_id = validate_x509_svid([leaf], trust_domain=service.trust_domain)
    now = service.clock()
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise InvalidSvid(f"client SVID {spiffe_id} is outside its validity period")
    for record in service.list_authorities(AuthorityKind.X509):
        if record.status not in (Status.PREPARED, Status.ACTIVE, Status.OLD):
            continue
        if record.certificate is None or record.not_after <= now:
            continue
        issuer = x509.load_der_x509_certificate(record.certificate)
        if issuer.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return PeerSvid(spiffe_id, leaf)
    raise InvalidSvid(f"client SVID {spiffe_id} is not signed by a current authority")


class ServerIdentity:
    """Holds the server SVID and the SSL contexts that present it."""

    def __init__(self, service: CaService, directory: Path) -> None:
        self.service = service
        self.dir = directory
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cert_path = directory / "server-svid.pem"
        self.key_path = directory / "server-svid.key"
        self._contexts: list[ssl.SSLContext] = []
        self._lock = threading.Lock()
        self._renew_at: datetime | None = None
        self._bundle_sequence = -1
        self.spiffe_id: SpiffeId = service.server_spiffe_id

    def renew(self) -> None:
        """Issue a fresh SVID with a fresh key and load it into every context."""
        with self._lock:
            key = generate_key(KeyType.EC_P256)
            [svid] = self.service.sign_x509_svids(
                [X509Request(self.spiffe_id, key.public_key(), dns_names=(SERVER_TLS_NAME,))],
                actor="server",
            )
            chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)
            write_private_file(self.key_path, private_key_pem(key))
            write_private_file(self.cert_path, chain_pem)
            lifetime = svid.not_after - svid.chain[0].not_valid_before_utc
            self._renew_at = svid.chain[0].not_valid_before_utc + lifetime / RENEW_DIVISOR
            bundle = self.service.bundle()
            self._bundle_sequence = bundle.sequence
            roots_pem = to_pem(bundle).decode()
            for ctx in self._contexts:
                ctx.load_cert_chain(self.cert_path, self.key_path)
                if ctx.verify_mode != ssl.CERT_NONE:
                    ctx.load_verify_locations(cadata=roots_pem)
        log.info("server SVID renewed", extra={"serial": f"{svid.serial:#x}"})

    def renew_if_due(self, now: datetime | None = None) -> bool:
        now = now or self.service.clock()
        due = self._renew_at is None or now >= self._renew_at
        if not due and self.service.bundle().sequence != self._bundle_sequence:
            due = True  # a new or removed authority: re-sign so peers see the current chain
        if due:
            self.renew()
        return due

    def context(self, *, client_auth: bool) -> ssl.SSLContext:
        """A server-side context presenting the server SVID; TLS 1.2 minimum.

        With ``client_auth``, a client certificate chaining to our bundle is required; callers
        still check the peer with ``authenticate_peer`` (current authorities, SPIFFE rules).
        """
        if self._renew_at is None:
            self.renew()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        if client_auth:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=to_pem(self.service.bundle()).decode())
        with self._lock:
            self._contexts.append(ctx)
        return ctx

    def authenticate_peer(self, leaf_der: bytes | None) -> SpiffeId:
        """The SPIFFE ID of a TLS client, checked against the authorities in force now."""
        return verify_peer_svid(self.service, leaf_der).spiffe_id


def tls_peer_leaf(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    if ssl_object is None:
        return None
    try:
        return ssl_object.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError) as err:
        raise CaError("cannot read the TLS peer certificate") from err


SERVER_SVID_RENEW_CHECK = timedelta(seconds=30)  # how often the server checks its own SVID
