"""Fetching a federated trust domain's bundle from its SPIFFE bundle endpoint.

Owns the client side of SPIFFE Federation: a plain HTTPS GET whose server is authenticated
either by the Web PKI (``https_web``) or as an X509-SVID with an expected SPIFFE ID, verified
against the bundle we already hold for that trust domain (``https_spiffe``). It returns the
raw document; parsing and storing are the service's job. I/O only, synchronous (it runs in the
refresh job's thread).
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId

from .errors import CaError, InvalidArgument
from .validation import validate_x509_svid

FETCH_TIMEOUT = 10.0  # seconds; a slow endpoint must not stall the refresh job
MAX_BUNDLE_BYTES = 1 << 20  # a bundle with thousands of keys is still far below this


class FederationError(CaError):
    """The bundle endpoint could not be reached or did not authenticate."""


Fetcher = Callable[[str, SpiffeId | None, Sequence[x509.Certificate]], bytes]


def check_endpoint_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidArgument("endpoint_url", "must be an https:// URL with a host", url)
    if parts.username or parts.password or parts.fragment:
        raise InvalidArgument("endpoint_url", "must not carry credentials or a fragment", url)
    return url


def fetch_bundle(
    url: str, endpoint_spiffe_id: SpiffeId | None, roots: Sequence[x509.Certificate]
) -> bytes:
    """GET the bundle document at ``url``.

    With ``endpoint_spiffe_id`` (https_spiffe), the server must present an X509-SVID for exactly
    that ID chaining to ``roots``; host names are not checked (SPIFFE Federation §5.2.2).
    Without it (https_web), the system's Web PKI trust and the host name decide.
    """
    check_endpoint_url(url)
    parts = urlsplit(url)
    if endpoint_spiffe_id is not None:
        if not roots:
            raise FederationError(
                f"no bundle held for {endpoint_spiffe_id.trust_domain}: set one first "
                "(https_spiffe needs it to authenticate the endpoint)"
            )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(
            cadata="".join(r.public_bytes(serialization.Encoding.PEM).decode() for r in roots)
        )
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection(
        parts.hostname or "", parts.port or 443, timeout=FETCH_TIMEOUT, context=ctx
    )
    try:
        conn.connect()
        if endpoint_spiffe_id is not None:
            _check_peer(conn, endpoint_spiffe_id)
        conn.request("GET", parts.path or "/", headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(MAX_BUNDLE_BYTES + 1)
    except (OSError, http.client.HTTPException) as err:
        raise FederationError(f"bundle endpoint {url}: {err}") from err
    finally:
        conn.close()
    if response.status != 200:
        raise FederationError(f"bundle endpoint {url} answered {response.status}")
    if len(body) > MAX_BUNDLE_BYTES:
        raise FederationError(f"bundle endpoint {url} sent more than {MAX_BUNDLE_BYTES} bytes")
    return body


def _check_peer(conn: http.client.HTTPSConnection, expected: SpiffeId) -> None:
    sock = conn.sock
    der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
    if not der:
        raise FederationError("bundle endpoint presented no certificate")
    leaf = x509.load_der_x509_certificate(der)
    try:
        got = validate_x509_svid([leaf])
    except CaError as err:
        raise FederationError(f"bundle endpoint certificate is not an X509-SVID: {err}") from err
    if got != expected:
        raise FederationError(
            f"bundle endpoint presented {got}, expected {expected} (https_spiffe profile)"
        )
