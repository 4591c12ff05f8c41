"""Trust bundles: the keys a trust domain's SVIDs are validated with, and their encodings.

Owns the ``TrustBundle`` value and its formats: the SPIFFE bundle (a JWK Set, SPIFFE Trust
Domain and Bundle §4, X509-SVID §6, JWT-SVID §6), PEM, and the two Workload API encodings
(concatenated DER for X.509 authorities, a JWKS of ``jwt-svid`` keys).

Rules of this module:
- Pure: bytes in, values out and back. No file or network I/O, no clock reads.
- A bundle belongs to one trust domain, recorded beside it, never inferred from its content;
  bundles of different trust domains are never merged (SPIFFE bundle §3).
- Parsing fails closed: a malformed bundle is rejected as a whole with ``InvalidArgument``
  naming the key index and field (``keys[2].x5c: ...``); only keys of an unknown ``kty`` or
  ``use`` are skipped, as SPIFFE bundle §4.1.3 requires.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from spiffe import TrustDomain

from .errors import InvalidArgument
from .keys import PublicKey

__all__ = [
    "DEFAULT_REFRESH_HINT",
    "TrustBundle",
    "from_pem",
    "from_spiffe_json",
    "jwt_jwks",
    "to_pem",
    "to_spiffe_json",
    "x509_authorities_der",
]

DEFAULT_REFRESH_HINT = timedelta(minutes=5)  # SPIRE's default bundle endpoint refresh hint
MAX_SEQUENCE = 2**63 - 1  # SPIFFE bundle §4.1.1 asks for 64 bits; it must fit a signed BIGINT
MAX_BUNDLE_BYTES = 1024 * 1024  # thousands of keys; a larger document is abuse, not a bundle
MIN_RSA_BITS = 2048  # NIST SP 800-131A: smaller RSA keys are no longer acceptable

USE_X509_SVID = "x509-svid"  # X509-SVID §6.1
USE_JWT_SVID = "jwt-svid"  # JWT-SVID §6.1

_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
_KNOWN_KTY = frozenset({"EC", "RSA"})
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class TrustBundle:
    """The authorities of one trust domain at one ``sequence`` number."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_authorities: Mapping[str, PublicKey] = field(hash=False)  # kid -> key, read-only
    sequence: int
    refresh_hint: timedelta

    def __post_init__(self) -> None:
        object.__setattr__(self, "x509_authorities", tuple(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", MappingProxyType(dict(self.jwt_authorities)))
        for index, cert in enumerate(self.x509_authorities):
            if not isinstance(cert, x509.Certificate):
                raise InvalidArgument(f"x509_authorities[{index}]", "must be a certificate")
            _check_key(cert.public_key(), f"x509_authorities[{index}]")
        for kid, key in self.jwt_authorities.items():
            if not isinstance(kid, str) or not kid:
                raise InvalidArgument("jwt_authorities", "every kid must be a non-empty string")
            _check_key(key, f"jwt_authorities[{kid!r}]")
        if isinstance(self.sequence, bool) or not isinstance(self.sequence, int):
            raise InvalidArgument("sequence", "must be an integer", self.sequence)
        if not 0 <= self.sequence <= MAX_SEQUENCE:
            raise InvalidArgument("sequence", f"must be in [0, {MAX_SEQUENCE}]", self.sequence)
        if not isinstance(self.refresh_hint, timedelta) or self.refresh_hint < timedelta(0):
            raise InvalidArgument("refresh_hint", "must be a non-negative timedelta")


# --- encoders --------------------------------------------------------------------------------


def to_spiffe_json(bundle: TrustBundle) -> bytes:
    """The bundle as a SPIFFE bundle document (a JWK Set, SPIFFE bundle §4)."""
    keys: list[dict[str, Any]] = [
        {
            "use": USE_X509_SVID,
            **_jwk_params(_public_key(cert)),
            # X509-SVID §6.1: exactly one base64 (not base64url) DER certificate, no kid.
            "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        for cert in bundle.x509_authorities
    ]
    keys.extend(_jwt_entries(bundle))
    document = {
        "keys": keys,
        "spiffe_sequence": bundle.sequence,
        "spiffe_refresh_hint": int(bundle.refresh_hint.total_seconds()),
    }
    return json.dumps(document, indent=2).encode()


def jwt_jwks(bundle: TrustBundle) -> bytes:
    """A JWK Set of the ``jwt-svid`` keys only, as the Workload API hands out JWT bundles."""
    return json.dumps({"keys": _jwt_entries(bundle)}, indent=2).encode()


def to_pem(bundle: TrustBundle) -> bytes:
    """The X.509 authorities as concatenated PEM certificates."""
    return b"".join(
        cert.public_bytes(serialization.Encoding.PEM) for cert in bundle.x509_authorities
    )


def x509_authorities_der(bundle: TrustBundle) -> bytes:
    """The X.509 authorities as concatenated DER, the Workload API's bundle encoding."""
    return b"".join(
        cert.public_bytes(serialization.Encoding.DER) for cert in bundle.x509_authorities
    )


# --- decoders --------------------------------------------------------------------------------


def from_pem(trust_domain: TrustDomain, data: bytes) -> TrustBundle:
    """A bundle of the PEM CA certificates in ``data`` (no JWT authorities, sequence 0)."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise InvalidArgument("bundle", f"must be at most {MAX_BUNDLE_BYTES} bytes", len(data))
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise InvalidArgument("bundle", "must hold one or more PEM certificates") from err
    for index, cert in enumerate(certs):
        if not _is_ca(cert):
            raise InvalidArgument(
                f"bundle[{index}]",
                "must be a CA certificate with cA=true (X509-SVID §3.2, §4.1)",
                f"serial 0x{cert.serial_number:x}",
            )
    return TrustBundle(
        trust_domain=trust_domain,
        x509_authorities=_unique(certs),
        jwt_authorities={},
        sequence=0,
        refresh_hint=DEFAULT_REFRESH_HINT,
    )


def from_spiffe_json(trust_domain: TrustDomain, data: bytes) -> TrustBundle:
    """Parse and validate a SPIFFE bundle document for ``trust_domain``.

    ``keys`` is required; an empty list trusts nothing. Keys of unknown ``kty`` or ``use`` are
    skipped (SPIFFE bundle §4.1.3); every other problem rejects the whole document.
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise InvalidArgument("bundle", f"must be at most {MAX_BUNDLE_BYTES} bytes", len(data))
    try:
        document = json.loads(data)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidArgument("bundle", "must be a JSON document (SPIFFE bundle §4)") from err
    if not isinstance(document, dict):
        raise InvalidArgument("bundle", "must be a JSON object (SPIFFE bundle §4.1)")
    if "keys" not in document:
        raise InvalidArgument("keys", "must be present (SPIFFE bundle §4.1.3)")
    entries = document["keys"]
    if not isinstance(entries, list):
        raise InvalidArgument("keys", "must be an array of JWKs (SPIFFE bundle §4.1.3)")

    sequence = _optional_int(document, "spiffe_sequence", "§4.1.1") or 0
    if sequence > MAX_SEQUENCE:
        raise InvalidArgument("spiffe_sequence", f"must be at most {MAX_SEQUENCE}", sequence)
    hint_seconds = _optional_int(document, "spiffe_refresh_hint", "§4.1.2")
    try:
        refresh_hint = (
            DEFAULT_REFRESH_HINT if hint_seconds is None else timedelta(seconds=hint_seconds)
        )
    except OverflowError as err:
        raise InvalidArgument(
            "spiffe_refresh_hint", "is too large to be a number of seconds", hint_seconds
        ) from err

    certs: list[x509.Certificate] = []
    jwt_keys: dict[str, PublicKey] = {}
    for index, entry in enumerate(entries):
        where = f"keys[{index}]"
        if not isinstance(entry, dict):
            raise InvalidArgument(where, "must be a JSON object (RFC 7517 §4)")
        kty = _required_str(entry, where, "kty", "SPIFFE bundle §4.2.1")
        use = _required_str(entry, where, "use", "SPIFFE bundle §4.2.2")
        if kty not in _KNOWN_KTY or use not in (USE_X509_SVID, USE_JWT_SVID):
            continue  # SPIFFE bundle §4.2.1, §4.2.2: ignore the entire element
        key = _key_from_jwk(entry, kty, where)
        if use == USE_X509_SVID:
            certs.append(_x509_entry(entry, key, where))
        else:
            kid = _jwt_kid(entry, where)
            if kid in jwt_keys:
                raise InvalidArgument(
                    f"{where}.kid", "must not repeat another key's kid (RFC 7517 §4.5)", kid
                )
            jwt_keys[kid] = key
    return TrustBundle(
        trust_domain=trust_domain,
        x509_authorities=_unique(certs),
        jwt_authorities=jwt_keys,
        sequence=sequence,
        refresh_hint=refresh_hint,
    )


# --- private helpers -------------------------------------------------------------------------


def _jwt_entries(bundle: TrustBundle) -> list[dict[str, Any]]:
    # JWT-SVID §6.1: use jwt-svid and kid set. Sorted for a stable document.
    return [
        {"use": USE_JWT_SVID, "kid": kid, **_jwk_params(key)}
        for kid, key in sorted(bundle.jwt_authorities.items())
    ]


def _jwk_params(key: PublicKey) -> dict[str, str]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = next(name for name, curve in _CURVES.items() if curve.name == key.curve.name)
        size = _coordinate_size(key.curve)
        numbers = key.public_numbers()
        # RFC 7518 §6.2.1.2-3: coordinates are full-size, base64url without padding.
        return {
            "kty": "EC",
            "crv": crv,
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
    numbers_rsa = key.public_numbers()
    # RFC 7518 §6.3.1: n and e are minimal big-endian octet strings.
    return {
        "kty": "RSA",
        "n": _b64url(_int_bytes(numbers_rsa.n)),
        "e": _b64url(_int_bytes(numbers_rsa.e)),
    }


def _key_from_jwk(entry: Mapping[str, Any], kty: str, where: str) -> PublicKey:
    if kty == "EC":
        crv = _required_str(entry, where, "crv", "RFC 7518 §6.2.1.1")
        curve = _CURVES.get(crv)
        if curve is None:
            raise InvalidArgument(f"{where}.crv", "must be P-256 or P-384", crv)
        size = _coordinate_size(curve)
        x = _b64url_param(entry, where, "x", size)
        y = _b64url_param(entry, where, "y", size)
        try:
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        except ValueError as err:
            raise InvalidArgument(where, f"x and y are not a point on {crv}") from err
    n = int.from_bytes(_b64url_param(entry, where, "n", None), "big")
    e = int.from_bytes(_b64url_param(entry, where, "e", None), "big")
    try:
        rsa_key = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as err:
        raise InvalidArgument(where, "n and e are not an RSA public key") from err
    _check_key(rsa_key, where)
    return rsa_key


def _x509_entry(entry: Mapping[str, Any], key: PublicKey, where: str) -> x509.Certificate:
    if "kid" in entry:
        raise InvalidArgument(
            f"{where}.kid", "must not be set on an x509-svid key (X509-SVID §6.1)"
        )
    x5c = entry.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1:
        count = len(x5c) if isinstance(x5c, list) else "none"
        raise InvalidArgument(
            f"{where}.x5c", "must hold exactly one certificate (X509-SVID §6.1)", count
        )
    encoded = x5c[0]
    try:
        if not isinstance(encoded, str):
            raise TypeError("not a string")
        der = base64.b64decode(encoded, validate=True)  # RFC 7517 §4.7: base64, not base64url
        cert = x509.load_der_x509_certificate(der)
    except (TypeError, ValueError, binascii.Error) as err:
        raise InvalidArgument(
            f"{where}.x5c", "must be a base64 DER certificate (RFC 7517 §4.7)"
        ) from err
    if not _is_ca(cert):
        raise InvalidArgument(
            f"{where}.x5c",
            "must be a CA certificate with cA=true (X509-SVID §6.1)",
            f"serial 0x{cert.serial_number:x}",
        )
    cert_key = cert.public_key()
    if not _same_key(cert_key, key):
        raise InvalidArgument(
            f"{where}.x5c", "certificate key does not match the JWK parameters (RFC 7517 §4.7)"
        )
    return cert


def _jwt_kid(entry: Mapping[str, Any], where: str) -> str:
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidArgument(f"{where}.kid", "must be set on a jwt-svid key (JWT-SVID §6.1)")
    return kid


def _required_str(entry: Mapping[str, Any], where: str, name: str, section: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{where}.{name}", f"must be a non-empty string ({section})")
    return value


def _optional_int(document: Mapping[str, Any], name: str, section: str) -> int | None:
    if name not in document:
        return None
    value = document[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(
            name, f"must be a non-negative integer (SPIFFE bundle {section})", value
        )
    return value


def _b64url_param(entry: Mapping[str, Any], where: str, name: str, size: int | None) -> bytes:
    value = entry.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(
            f"{where}.{name}", "must be a non-empty base64url string (RFC 7518 §6)"
        )
    if not _BASE64URL.fullmatch(value) or len(value) % 4 == 1:
        raise InvalidArgument(f"{where}.{name}", "must be base64url without padding (RFC 7515 §2)")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    if size is not None and len(raw) != size:
        raise InvalidArgument(
            f"{where}.{name}",
            f"must encode exactly {size} bytes for this curve (RFC 7518 §6.2.1.2)",
            len(raw),
        )
    return raw


def _check_key(key: object, where: str) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not any(curve.name == key.curve.name for curve in _CURVES.values()):
            raise InvalidArgument(where, "EC keys must be on P-256 or P-384", key.curve.name)
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidArgument(
                where, f"RSA keys must have at least {MIN_RSA_BITS} bits", key.key_size
            )
    else:
        raise InvalidArgument(where, "must be an ECDSA or RSA public key")


def _public_key(cert: x509.Certificate) -> PublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidArgument("x509_authorities", "must hold ECDSA or RSA certificates")
    return key


def _same_key(a: object, b: PublicKey) -> bool:
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    return False


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):  # absent, duplicated or undecodable
        return False


def _unique(certs: list[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    return tuple(dict.fromkeys(certs))


def _coordinate_size(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
