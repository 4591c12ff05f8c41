"""JWT-SVID signing and validation (ca.jwtsvid), cross-checked with py-spiffe."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
import spiffe
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe import SpiffeId

from ca.bundle import TrustBundle, jwt_jwks
from ca.errors import InvalidArgument, InvalidSvid
from ca.jwtsvid import new_kid, sign_jwt_svid, validate_jwt_svid
from ca.keys import KeyType, PrivateKey, PublicKey
from tests.ca.conftest_crypto import NOW, TD, WORKLOAD_ID, cached_key

WORKLOAD = SpiffeId(WORKLOAD_ID)
FIVE_MINUTES = timedelta(minutes=5)
KID = "kid-1"
AUDIENCE = "spiffe://example.org/reports"
ALGORITHMS = {
    KeyType.EC_P256: "ES256",
    KeyType.EC_P384: "ES384",
    KeyType.RSA_2048: "RS256",
    KeyType.RSA_4096: "RS256",
}


@pytest.fixture(scope="module")
def keys() -> dict[KeyType, PrivateKey]:
    """One real key per type for the module (RSA-4096 is generated once per session)."""
    return {key_type: cached_key(key_type) for key_type in KeyType}


def _bundle_keys(key: PrivateKey, kid: str = KID) -> dict[str, Mapping[str, PublicKey]]:
    return {TD.name: {kid: key.public_key()}}


def _token(key: PrivateKey | None = None, **overrides: Any) -> str:
    return sign_jwt_svid(
        key or cached_key(),
        overrides.pop("kid", KID),
        overrides.pop("spiffe_id", WORKLOAD),
        overrides.pop("audience", [AUDIENCE]),
        issued_at=overrides.pop("issued_at", NOW),
        expires_at=overrides.pop("expires_at", NOW + FIVE_MINUTES),
    )


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": WORKLOAD_ID,
        "aud": [AUDIENCE],
        "exp": int((NOW + FIVE_MINUTES).timestamp()),
        "iat": int(NOW.timestamp()),
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _raw_token(
    claims: dict[str, Any],
    headers: dict[str, Any],
    key: PrivateKey | None = None,
    alg: str = "ES256",
) -> str:
    """A token crafted with PyJWT directly, to break one JWT-SVID rule at a time."""
    return jwt.encode(claims, key or cached_key(), algorithm=alg, headers=headers)


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_round_trip_for_every_key_type(keys: dict[KeyType, PrivateKey], key_type: KeyType) -> None:
    key = keys[key_type]
    token = _token(key, audience=[AUDIENCE, "other"])

    header = jwt.get_unverified_header(token)
    assert header == {"alg": ALGORITHMS[key_type], "kid": KID, "typ": "JWT"}
    claims = validate_jwt_svid(token, AUDIENCE, _bundle_keys(key), now=NOW + timedelta(minutes=1))
    assert claims == {
        "sub": WORKLOAD_ID,
        "aud": [AUDIENCE, "other"],
        "exp": int((NOW + FIVE_MINUTES).timestamp()),
        "iat": int(NOW.timestamp()),
    }


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_py_spiffe_accepts_our_token_and_our_bundle(
    keys: dict[KeyType, PrivateKey], key_type: KeyType
) -> None:
    # py-spiffe checks exp against the real clock, so this token is minted for the real now.
    key = keys[key_type]
    kid = new_kid()
    now = datetime.now(UTC)
    token = _token(key, kid=kid, issued_at=now, expires_at=now + FIVE_MINUTES)
    bundle = TrustBundle(
        trust_domain=TD,
        x509_authorities=(),
        jwt_authorities={kid: key.public_key()},
        sequence=1,
        refresh_hint=FIVE_MINUTES,
    )
    jwt_bundle = spiffe.JwtBundle.parse(TD, jwt_jwks(bundle))
    assert jwt_bundle.jwt_authorities == {kid: key.public_key()}
    svid = spiffe.JwtSvid.parse_and_validate(token, jwt_bundle, {AUDIENCE})
    assert svid.spiffe_id == WORKLOAD
    assert svid.audience == {AUDIENCE}


BadToken = Callable[[], str]
REJECTIONS: list[tuple[str, BadToken, str]] = [
    (
        "alg-none",
        lambda: jwt.encode(_claims(), "", algorithm="none", headers={"kid": KID}),
        r"alg 'none' is not allowed; JWT-SVID §2\.1",
    ),
    (
        "alg-hs256",
        lambda: jwt.encode(_claims(), b"s" * 64, algorithm="HS256", headers={"kid": KID}),
        r"alg 'HS256' is not allowed",
    ),
    (
        "extra-header-key",
        lambda: _raw_token(_claims(), {"kid": KID, "x5u": "https://evil.example/key"}),
        r"header carries x5u; JWT-SVID §2 allows only alg, kid, typ",
    ),
    (
        "typ-not-jwt",
        lambda: _raw_token(_claims(), {"kid": KID, "typ": "at+jwt"}),
        r"typ 'at\+jwt' is not JWT or JOSE; JWT-SVID §2\.3",
    ),
    ("no-kid", lambda: _raw_token(_claims(), {}), r"header has no kid"),
    ("unknown-kid", lambda: _token(kid="rotated-away"), r"kid 'rotated-away' is not in the JWT"),
    ("wrong-audience", lambda: _token(audience=["billing"]), r"audience \['billing'\] does not"),
    (
        "expired",
        lambda: _token(issued_at=NOW - 2 * FIVE_MINUTES, expires_at=NOW - FIVE_MINUTES),
        r"expired at .*; JWT-SVID §3\.3",
    ),
    (
        "expires-exactly-now",
        lambda: _token(issued_at=NOW - FIVE_MINUTES, expires_at=NOW),
        r"expired at",
    ),
    (
        "no-exp",
        lambda: _raw_token(_claims(exp=None), {"kid": KID}),
        r"no exp claim; JWT-SVID §3\.3",
    ),
    ("exp-not-a-number", lambda: _raw_token(_claims(exp="soon"), {"kid": KID}), r"NumericDate"),
    (
        "no-aud",
        lambda: _raw_token(_claims(aud=None), {"kid": KID}),
        r"no aud claim; JWT-SVID §3\.2",
    ),
    ("empty-aud", lambda: _raw_token(_claims(aud=[]), {"kid": KID}), r"no aud claim"),
    (
        "nbf-in-future",
        lambda: _raw_token(_claims(nbf=int((NOW + FIVE_MINUTES).timestamp())), {"kid": KID}),
        r"not valid before",
    ),
    (
        "no-sub",
        lambda: _raw_token(_claims(sub=None), {"kid": KID}),
        r"no sub claim; JWT-SVID §3\.1",
    ),
    (
        "sub-not-spiffe-id",
        lambda: _raw_token(_claims(sub="https://example.org/web"), {"kid": KID}),
        r"JWT-SVID sub 'https://example.org/web' is not a SPIFFE ID",
    ),
    (
        "sub-of-unknown-trust-domain",
        lambda: _raw_token(_claims(sub="spiffe://other.example/web"), {"kid": KID}),
        r"trust domain other\.example, for which there is no JWT bundle",
    ),
    (
        "signed-by-another-key",
        lambda: _token(cached_key(KeyType.EC_P256, slot=4)),
        r"signature does not verify with kid 'kid-1'",
    ),
    (
        "alg-does-not-fit-key",
        lambda: _token(cached_key(KeyType.EC_P384)),
        r"alg ES384 does not fit kid 'kid-1' \(EC secp256r1 key\)",
    ),
    (
        "rs256-for-ec-key",
        lambda: _raw_token(_claims(), {"kid": KID}, cached_key(KeyType.RSA_2048), "RS256"),
        r"alg RS256 does not fit",
    ),
    ("not-compact", lambda: "a.b", r"not a JWS in compact serialization"),
    ("garbage", lambda: "a.b.c", r"cannot be decoded"),
    ("empty", lambda: "", r"JWT-SVID is empty"),
    ("oversize", lambda: "a." + "b" * 20_000 + ".c", r"above 16384"),
    (
        "json-payload-swapped",
        lambda: ".".join(
            [_token().split(".")[0], _b64(_claims(sub="spiffe://example.org/admin")), "AAAA"]
        ),
        r"signature does not verify",
    ),
]


@pytest.mark.parametrize(
    ("make", "message"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_bad_token_is_rejected(make: BadToken, message: str) -> None:
    token = make()
    with pytest.raises(InvalidSvid, match=message):
        validate_jwt_svid(token, AUDIENCE, _bundle_keys(cached_key()), now=NOW)


def test_typ_jose_and_missing_typ_are_accepted() -> None:
    for headers in ({"kid": KID, "typ": "JOSE"}, {"kid": KID, "typ": None}):
        token = _raw_token(_claims(), headers)
        assert validate_jwt_svid(token, AUDIENCE, _bundle_keys(cached_key()), now=NOW)
    assert "typ" not in jwt.get_unverified_header(_raw_token(_claims(), {"kid": KID, "typ": None}))


def test_single_string_audience_is_accepted() -> None:
    token = _raw_token(_claims(aud=AUDIENCE), {"kid": KID})
    assert (
        validate_jwt_svid(token, AUDIENCE, _bundle_keys(cached_key()), now=NOW)["aud"] == AUDIENCE
    )


def test_validation_uses_now_not_the_clock() -> None:
    # Minted in 2030; the real clock has not got there, yet "now" decides.
    token = _token()
    validate_jwt_svid(token, AUDIENCE, _bundle_keys(cached_key()), now=NOW)
    with pytest.raises(InvalidSvid, match=r"expired"):
        validate_jwt_svid(token, AUDIENCE, _bundle_keys(cached_key()), now=NOW + FIVE_MINUTES)


SignCase = Callable[[], str]
BAD_SIGNING: list[tuple[str, SignCase, str]] = [
    ("no-audience", lambda: _token(audience=[]), r"^audience: must hold at least one value"),
    ("blank-audience", lambda: _token(audience=["ok", ""]), r"^audience: must hold at least one"),
    ("audience-string", lambda: _token(audience="reports"), r"^audience: must be a sequence"),
    ("empty-kid", lambda: _token(kid=""), r"^kid: must be a non-empty string"),
    (
        "naive-issued-at",
        lambda: _token(issued_at=NOW.replace(tzinfo=None)),
        r"^issued_at: must be a timezone-aware",
    ),
    ("expires-before-issued", lambda: _token(expires_at=NOW), r"^expires_at: must be later"),
    (
        "id-too-long",
        lambda: _token(spiffe_id=SpiffeId("spiffe://example.org/" + "a" * 2100)),
        r"^spiffe_id: must be at most 2048 bytes",
    ),
]


@pytest.mark.parametrize(
    ("make", "message"),
    [case[1:] for case in BAD_SIGNING],
    ids=[case[0] for case in BAD_SIGNING],
)
def test_bad_signing_request_is_rejected(make: SignCase, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make()


def test_validate_argument_errors() -> None:
    token = _token()
    with pytest.raises(InvalidArgument, match=r"^audience: must be a non-empty string"):
        validate_jwt_svid(token, "", _bundle_keys(cached_key()), now=NOW)
    with pytest.raises(InvalidArgument, match=r"^now: must be a timezone-aware"):
        validate_jwt_svid(token, AUDIENCE, _bundle_keys(cached_key()), now=NOW.replace(tzinfo=None))


def test_new_kid_is_random_and_url_safe() -> None:
    kids = {new_kid() for _ in range(200)}
    assert len(kids) == 200
    assert all(len(kid) == 32 and kid.replace("-", "").replace("_", "").isalnum() for kid in kids)


@settings(max_examples=200, deadline=None)
@given(
    token=st.one_of(
        st.text(max_size=200),
        st.lists(st.text("abcXYZ019-_=", max_size=30), min_size=3, max_size=3).map(".".join),
    )
)
def test_arbitrary_text_is_only_ever_an_invalid_svid(token: str) -> None:
    with pytest.raises(InvalidSvid):
        validate_jwt_svid(token, AUDIENCE, _bundle_keys(cached_key()), now=NOW)


@settings(max_examples=100, deadline=None)
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "jku", "b64"]),
        st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans()),
    ),
    payload=st.dictionaries(
        st.sampled_from(["sub", "aud", "exp", "nbf", "iat"]),
        st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.lists(st.text(max_size=5))),
    ),
)
def test_arbitrary_header_and_claims_never_escape_as_other_errors(
    header: dict[str, Any], payload: dict[str, Any]
) -> None:
    token = f"{_b64(header)}.{_b64(payload)}.AAAA"
    with pytest.raises(InvalidSvid):
        validate_jwt_svid(token, AUDIENCE, _bundle_keys(cached_key()), now=NOW)
