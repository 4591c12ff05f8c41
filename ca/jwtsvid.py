"""JWT-SVID signing and validation.

Owns the JOSE header and claims of a JWT-SVID (JWT-SVID §2, §3) and their checks, on top of
PyJWT for the JWS mechanics.

Rules of this module:
- Pure: no I/O, no clock reads. ``issued_at``, ``expires_at`` and ``now`` are parameters; PyJWT's
  own clock-based checks are switched off and ``exp``/``nbf`` are checked against ``now`` here.
  ``new_kid`` is the one helper that draws randomness.
- The algorithm is chosen from the key, never from the token: a token's ``alg`` must be on the
  JWT-SVID list and must fit the key its ``kid`` names (no ``none``, no HMAC).
- Never log or echo a token; error messages describe it without quoting it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.types import Options
from spiffe import SpiffeId

from .errors import InvalidArgument, InvalidSvid
from .keys import KeyType, PrivateKey, PublicKey, key_type_of
from .validation import parse_spiffe_id

__all__ = [
    "ALLOWED_ALGORITHMS",
    "new_kid",
    "sign_jwt_svid",
    "validate_jwt_svid",
]

# JWT-SVID §2.1: RFC 7518 §3.3-3.5 only; "none" and HS* are refused.
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
ALLOWED_HEADERS = frozenset({"alg", "kid", "typ"})  # JWT-SVID §2: no other header may appear
ALLOWED_TYPES = frozenset({"JWT", "JOSE"})  # JWT-SVID §2.3
MAX_TOKEN_CHARS = 16 * 1024  # a JWT-SVID is well under 2 KiB; refuse to parse absurd input
KID_BYTES = 24  # 192 random bits: kids never collide across rotations; 32 URL-safe characters
SPIFFE_ID_MAX_BYTES = 2048  # SPIFFE-ID §2.3: implementations SHOULD NOT generate longer IDs

_SIGNING_ALGORITHM = {
    KeyType.EC_P256: "ES256",
    KeyType.EC_P384: "ES384",
    KeyType.RSA_2048: "RS256",
    KeyType.RSA_4096: "RS256",
}
# RFC 7518 §3.4: each ES* algorithm names its curve.
_EC_ALGORITHM_BITS = {"ES256": 256, "ES384": 384, "ES512": 521}
# PyJWT verifies, but the checks above are ours; keep its time and audience checks off.
_PYJWT_OPTIONS: Options = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "require": [],
}


def new_kid() -> str:
    """A fresh random key id, URL-safe."""
    return secrets.token_urlsafe(KID_BYTES)


def sign_jwt_svid(
    key: PrivateKey,
    kid: str,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    *,
    issued_at: datetime,
    expires_at: datetime,
) -> str:
    """Sign a JWT-SVID for ``spiffe_id``: header ``alg``, ``kid``, ``typ=JWT``; claims ``sub``,
    ``aud``, ``exp``, ``iat``. ES256 for P-256, ES384 for P-384, RS256 for RSA.
    """
    if not isinstance(kid, str) or not kid:
        raise InvalidArgument("kid", "must be a non-empty string (JWT-SVID §6.1)", kid)
    if isinstance(audience, str):
        raise InvalidArgument("audience", "must be a sequence of audiences, not one string")
    audiences = list(audience)
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise InvalidArgument(
            "audience", "must hold at least one value, each non-empty (JWT-SVID §3.2)", audiences
        )
    for name, moment in (("issued_at", issued_at), ("expires_at", expires_at)):
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise InvalidArgument(name, "must be a timezone-aware datetime")
    if expires_at <= issued_at:
        raise InvalidArgument(
            "expires_at", f"must be later than issued_at {issued_at.isoformat()}", expires_at
        )
    subject = str(spiffe_id)
    if len(subject.encode()) > SPIFFE_ID_MAX_BYTES:
        raise InvalidArgument(
            "spiffe_id", f"must be at most {SPIFFE_ID_MAX_BYTES} bytes (SPIFFE-ID §2.3)", subject
        )
    algorithm = _SIGNING_ALGORITHM[key_type_of(key)]
    claims: dict[str, Any] = {
        "sub": subject,
        "aud": audiences,
        # NumericDate is whole seconds (RFC 7519 §2); rounding down never extends the lifetime.
        "exp": int(expires_at.timestamp()),
        "iat": int(issued_at.timestamp()),
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid, "typ": "JWT"})


def validate_jwt_svid(
    token: str,
    audience: str,
    keys: Mapping[str, Mapping[str, PublicKey]],
    *,
    now: datetime,
) -> dict[str, object]:
    """Validate a JWT-SVID presented to ``audience`` and return its claims.

    ``keys`` maps a trust domain name to its JWT authorities (kid -> public key); the token is
    checked against the authorities of its subject's trust domain only.
    """
    if not isinstance(audience, str) or not audience:
        raise InvalidArgument("audience", "must be a non-empty string (JWT-SVID §3.2)")
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvalidArgument("now", "must be a timezone-aware datetime")
    if not isinstance(token, str) or not token:
        raise InvalidSvid("JWT-SVID is empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidSvid(f"JWT-SVID is {len(token)} characters, above {MAX_TOKEN_CHARS}")
    if token.count(".") != 2:
        raise InvalidSvid("JWT-SVID is not a JWS in compact serialization; JWT-SVID §5.1")

    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as err:
        raise InvalidSvid(f"JWT-SVID cannot be decoded: {err}") from err

    alg, kid = _check_header(header)
    spiffe_id = _subject(unverified)
    td_keys = keys.get(spiffe_id.trust_domain.name)
    if td_keys is None:
        raise InvalidSvid(
            f"JWT-SVID subject {spiffe_id} is in trust domain {spiffe_id.trust_domain}, for "
            "which there is no JWT bundle; SPIFFE bundle §3"
        )
    public_key = td_keys.get(kid)
    if public_key is None:
        raise InvalidSvid(
            f"JWT-SVID kid {kid!r} is not in the JWT bundle of trust domain "
            f"{spiffe_id.trust_domain}; JWT-SVID §6.2"
        )
    _check_alg_fits_key(alg, kid, public_key)

    try:
        claims: dict[str, object] = jwt.decode(
            token, key=public_key, algorithms=[alg], options=_PYJWT_OPTIONS
        )
    except jwt.InvalidSignatureError as err:
        raise InvalidSvid(
            f"JWT-SVID signature does not verify with kid {kid!r}; JWT-SVID §4"
        ) from err
    except jwt.PyJWTError as err:
        raise InvalidSvid(f"JWT-SVID cannot be verified with kid {kid!r}: {err}") from err

    _check_exp(claims, now)
    _check_nbf(claims, now)
    _check_aud(claims, audience)
    return claims


# --- private helpers -------------------------------------------------------------------------


def _check_header(header: Mapping[str, Any]) -> tuple[str, str]:
    extra = sorted(set(header) - ALLOWED_HEADERS)
    if extra:
        raise InvalidSvid(
            f"JWT-SVID header carries {', '.join(extra)}; JWT-SVID §2 allows only alg, kid, typ"
        )
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise InvalidSvid(
            f"JWT-SVID alg {alg!r} is not allowed; JWT-SVID §2.1 accepts only "
            f"{', '.join(sorted(ALLOWED_ALGORITHMS))}"
        )
    if "typ" in header and header["typ"] not in ALLOWED_TYPES:
        raise InvalidSvid(f"JWT-SVID typ {header['typ']!r} is not JWT or JOSE; JWT-SVID §2.3")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        # §2.2 makes kid optional, but a bundle holds several keys (rotation) and names them by
        # kid (§6.1); without it the signing key cannot be chosen, so it is required (as SPIRE).
        raise InvalidSvid("JWT-SVID header has no kid; it is needed to pick the bundle key")
    assert isinstance(alg, str)
    return alg, kid


def _check_alg_fits_key(alg: str, kid: str, key: PublicKey) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        fits = _EC_ALGORITHM_BITS.get(alg) == key.curve.key_size
        kind = f"EC {key.curve.name}"
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        fits = alg[:2] in ("RS", "PS")
        kind = f"RSA-{key.key_size}"
    if not fits:
        raise InvalidSvid(
            f"JWT-SVID alg {alg} does not fit kid {kid!r} ({kind} key); RFC 7518 §3.1"
        )


def _subject(claims: Mapping[str, Any]) -> SpiffeId:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidSvid("JWT-SVID has no sub claim; JWT-SVID §3.1 requires the SPIFFE ID")
    return parse_spiffe_id(sub, what="JWT-SVID sub")


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSvid(f"JWT-SVID {name} claim is not a NumericDate; RFC 7519 §4.1")
    return float(value)


def _check_exp(claims: Mapping[str, Any], now: datetime) -> None:
    exp = _numeric(claims, "exp")
    if exp is None:
        raise InvalidSvid("JWT-SVID has no exp claim; JWT-SVID §3.3 requires it")
    if now.timestamp() >= exp:
        raise InvalidSvid(f"JWT-SVID expired at {_iso(exp)} (now {now.isoformat()}); JWT-SVID §3.3")


def _check_nbf(claims: Mapping[str, Any], now: datetime) -> None:
    nbf = _numeric(claims, "nbf")
    if nbf is not None and now.timestamp() < nbf:
        raise InvalidSvid(
            f"JWT-SVID is not valid before {_iso(nbf)} (now {now.isoformat()}); RFC 7519 §4.1.5"
        )


def _check_aud(claims: Mapping[str, Any], audience: str) -> None:
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not values or not all(isinstance(a, str) for a in values):
        raise InvalidSvid("JWT-SVID has no aud claim; JWT-SVID §3.2 requires one or more values")
    if audience not in values:
        raise InvalidSvid(
            f"JWT-SVID audience {values!r} does not include {audience!r}; JWT-SVID §3.2"
        )


def _iso(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, tz=UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return repr(timestamp)
