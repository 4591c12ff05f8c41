"""Trust bundles and their encodings (ca.bundle), cross-checked with py-spiffe."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.bundle import (
    DEFAULT_REFRESH_HINT,
    TrustBundle,
    from_pem,
    from_spiffe_json,
    jwt_jwks,
    to_pem,
    to_spiffe_json,
    x509_authorities_der,
)
from ca.errors import InvalidArgument
from ca.keys import KeyType, PrivateKey
from tests.ca.conftest_crypto import (
    TD,
    cached_key,
    craft_leaf,
    craft_signing,
    root_authority,
)

ROOT_TYPES = [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048]


@pytest.fixture(scope="module")
def keys() -> dict[KeyType, PrivateKey]:
    """One real key per type for the module (RSA-4096 is generated once per session)."""
    return {key_type: cached_key(key_type) for key_type in KeyType}


@pytest.fixture(scope="module")
def bundle(keys: dict[KeyType, PrivateKey]) -> TrustBundle:
    roots = tuple(root_authority(key_type).certificate for key_type in ROOT_TYPES)
    return TrustBundle(
        trust_domain=TD,
        x509_authorities=roots,
        jwt_authorities={f"kid-{key_type}": keys[key_type].public_key() for key_type in KeyType},
        sequence=42,
        refresh_hint=timedelta(minutes=10),
    )


def _document(bundle: TrustBundle) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(to_spiffe_json(bundle))
    return document


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def test_spiffe_json_round_trip(bundle: TrustBundle) -> None:
    parsed = from_spiffe_json(TD, to_spiffe_json(bundle))
    assert parsed == bundle
    assert hash(parsed) == hash(bundle)


def test_spiffe_json_follows_the_bundle_format(bundle: TrustBundle) -> None:
    document = _document(bundle)
    assert document["spiffe_sequence"] == 42
    assert document["spiffe_refresh_hint"] == 600
    x509_entries = [k for k in document["keys"] if k["use"] == "x509-svid"]
    jwt_entries = [k for k in document["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_entries) == len(ROOT_TYPES)
    assert len(jwt_entries) == len(KeyType)

    for entry, cert in zip(x509_entries, bundle.x509_authorities, strict=True):
        assert "kid" not in entry
        assert len(entry["x5c"]) == 1
        der = base64.b64decode(entry["x5c"][0], validate=True)
        assert der == cert.public_bytes(serialization.Encoding.DER)
    for entry in jwt_entries:
        assert entry["kid"].startswith("kid-")
        assert "x5c" not in entry

    for entry in document["keys"]:
        if entry["kty"] == "EC":
            size = {"P-256": 32, "P-384": 48}[entry["crv"]]
            for coordinate in ("x", "y"):
                assert "=" not in entry[coordinate]
                assert len(_b64url_decode(entry[coordinate])) == size
        else:
            assert entry["kty"] == "RSA"
            assert _b64url_decode(entry["n"])[0] != 0  # minimal encoding, RFC 7518 §6.3.1.1
            assert entry["e"] == "AQAB"


def test_py_spiffe_accepts_the_workload_api_encodings(bundle: TrustBundle) -> None:
    x509_bundle = spiffe.X509Bundle.parse_raw(TD, x509_authorities_der(bundle))
    assert x509_bundle.x509_authorities == set(bundle.x509_authorities)
    jwt_bundle = spiffe.JwtBundle.parse(TD, jwt_jwks(bundle))
    assert jwt_bundle.jwt_authorities == dict(bundle.jwt_authorities)


def test_jwt_jwks_holds_only_jwt_keys(bundle: TrustBundle) -> None:
    document = json.loads(jwt_jwks(bundle))
    assert set(document) == {"keys"}
    assert {entry["use"] for entry in document["keys"]} == {"jwt-svid"}


def test_pem_round_trip(bundle: TrustBundle) -> None:
    parsed = from_pem(TD, to_pem(bundle))
    assert parsed.x509_authorities == bundle.x509_authorities
    assert parsed.jwt_authorities == {}
    assert (parsed.sequence, parsed.refresh_hint) == (0, DEFAULT_REFRESH_HINT)


def test_from_pem_rejects_a_leaf_and_garbage() -> None:
    root = root_authority()
    leaf_pem = craft_leaf(root).public_bytes(serialization.Encoding.PEM)
    root_pem = root.certificate.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidArgument, match=r"^bundle\[1\]: must be a CA certificate"):
        from_pem(TD, root_pem + leaf_pem)
    for data in (b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"):
        with pytest.raises(InvalidArgument, match=r"^bundle: must hold one or more PEM"):
            from_pem(TD, data)


def test_empty_keys_trust_nothing_and_defaults_apply() -> None:
    parsed = from_spiffe_json(TD, b'{"keys": []}')
    assert parsed.x509_authorities == ()
    assert parsed.jwt_authorities == {}
    assert (parsed.sequence, parsed.refresh_hint) == (0, DEFAULT_REFRESH_HINT)


def test_unknown_kty_and_use_are_ignored(bundle: TrustBundle) -> None:
    document = _document(bundle)
    document["keys"][0:0] = [
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        {"kty": "EC", "use": "sig", "crv": "P-521", "x": "AA", "y": "AA"},
        {"kty": "oct", "use": "jwt-svid", "k": "c2VjcmV0"},
    ]
    document["keys"][0]["use"] = "x509-svid"
    document["extension_field"] = {"anything": True}
    parsed = from_spiffe_json(TD, json.dumps(document).encode())
    assert parsed == bundle


def test_bundle_is_frozen(bundle: TrustBundle) -> None:
    with pytest.raises(TypeError):
        bundle.jwt_authorities["new"] = cached_key().public_key()  # type: ignore[index]
    with pytest.raises(AttributeError):
        bundle.sequence = 43  # type: ignore[misc]


def test_bundle_constructor_checks_its_fields() -> None:
    with pytest.raises(InvalidArgument, match=r"^sequence: must be in"):
        TrustBundle(TD, (), {}, -1, DEFAULT_REFRESH_HINT)
    with pytest.raises(InvalidArgument, match=r"^refresh_hint: must be a non-negative"):
        TrustBundle(TD, (), {}, 0, timedelta(seconds=-1))
    with pytest.raises(InvalidArgument, match=r"^jwt_authorities: every kid"):
        TrustBundle(TD, (), {"": cached_key().public_key()}, 0, DEFAULT_REFRESH_HINT)


# --- rejections ------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _other_root_der() -> str:
    der = root_authority(slot=2).certificate.public_bytes(serialization.Encoding.DER)
    return base64.b64encode(der).decode()


def _leaf_der() -> str:
    leaf = craft_leaf(root_authority(), key=cached_key())
    return base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()


def _set(index: int, name: str, value: Any) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        if value is _DELETE:
            del document["keys"][index][name]
        else:
            document["keys"][index][name] = value

    return mutate


def _top(name: str, value: Any) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        if value is _DELETE:
            del document[name]
        else:
            document[name] = value

    return mutate


_DELETE = object()
# The document under test: keys[0] x509-svid P-256, keys[1] x509-svid P-384,
# keys[2] x509-svid RSA, keys[3..6] jwt-svid (EC-P256, EC-P384, RSA-2048, RSA-4096 by kid order).
REJECTIONS: list[tuple[str, Mutation, str]] = [
    ("keys-missing", _top("keys", _DELETE), r"^keys: must be present \(SPIFFE bundle §4\.1\.3\)"),
    ("keys-not-array", _top("keys", {"a": 1}), r"^keys: must be an array"),
    ("sequence-negative", _top("spiffe_sequence", -1), r"^spiffe_sequence: must be a non-negative"),
    ("sequence-bool", _top("spiffe_sequence", True), r"^spiffe_sequence: must be a non-negative"),
    ("sequence-huge", _top("spiffe_sequence", 2**64), r"^spiffe_sequence: must be at most"),
    ("hint-string", _top("spiffe_refresh_hint", "300"), r"^spiffe_refresh_hint: must be a non-neg"),
    ("hint-float", _top("spiffe_refresh_hint", 1.5), r"^spiffe_refresh_hint: must be a non-neg"),
    ("hint-overflow", _top("spiffe_refresh_hint", 10**20), r"^spiffe_refresh_hint: is too large"),
    ("use-null", _set(0, "use", None), r"^keys\[0\]\.use: must be a non-empty string"),
    ("kty-missing", _set(2, "kty", _DELETE), r"^keys\[2\]\.kty: must be a non-empty string"),
    ("use-missing", _set(1, "use", _DELETE), r"^keys\[1\]\.use: must be a non-empty string"),
    (
        "x509-with-kid",
        _set(0, "kid", "abc"),
        r"^keys\[0\]\.kid: must not be set on an x509-svid key \(X509-SVID §6\.1\)",
    ),
    (
        "x5c-two-certs",
        lambda d: d["keys"][2]["x5c"].append(d["keys"][1]["x5c"][0]),
        r"^keys\[2\]\.x5c: must hold exactly one certificate \(X509-SVID §6\.1\) \(got 2\)",
    ),
    ("x5c-empty", _set(0, "x5c", []), r"^keys\[0\]\.x5c: must hold exactly one certificate"),
    ("x5c-missing", _set(0, "x5c", _DELETE), r"^keys\[0\]\.x5c: must hold exactly one"),
    ("x5c-not-base64", _set(0, "x5c", ["!!!"]), r"^keys\[0\]\.x5c: must be a base64 DER"),
    ("x5c-base64url", _set(0, "x5c", ["-_-_"]), r"^keys\[0\]\.x5c: must be a base64 DER"),
    ("x5c-not-a-cert", _set(0, "x5c", ["AAAA"]), r"^keys\[0\]\.x5c: must be a base64 DER"),
    ("x5c-not-a-string", _set(0, "x5c", [7]), r"^keys\[0\]\.x5c: must be a base64 DER"),
    (
        "x5c-key-mismatch",
        lambda d: d["keys"][0].__setitem__("x5c", [_other_root_der()]),
        r"^keys\[0\]\.x5c: certificate key does not match the JWK parameters",
    ),
    (
        "x5c-leaf-not-ca",
        lambda d: d["keys"][0].__setitem__("x5c", [_leaf_der()]),
        r"^keys\[0\]\.x5c: must be a CA certificate",
    ),
    ("jwt-without-kid", _set(3, "kid", _DELETE), r"^keys\[3\]\.kid: must be set on a jwt-svid"),
    ("jwt-empty-kid", _set(4, "kid", ""), r"^keys\[4\]\.kid: must be set on a jwt-svid key"),
    (
        "duplicate-kid",
        lambda d: d["keys"][4].__setitem__("kid", d["keys"][3]["kid"]),
        r"^keys\[4\]\.kid: must not repeat another key's kid",
    ),
    ("ec-unsupported-curve", _set(3, "crv", "P-521"), r"^keys\[3\]\.crv: must be P-256 or P-384"),
    ("ec-missing-y", _set(3, "y", _DELETE), r"^keys\[3\]\.y: must be a non-empty base64url"),
    (
        "ec-short-x",
        lambda d: d["keys"][3].__setitem__("x", d["keys"][3]["x"][:-3]),
        r"^keys\[3\]\.x: must encode exactly 32 bytes",
    ),
    ("ec-padded-x", lambda d: d["keys"][3].__setitem__("x", d["keys"][3]["x"] + "="), r"padding"),
    (
        "ec-point-not-on-curve",
        lambda d: d["keys"][3].__setitem__("y", d["keys"][3]["x"]),
        r"^keys\[3\]: x and y are not a point on P-256",
    ),
    (
        "rsa-key-too-small",
        _set(5, "n", base64.urlsafe_b64encode(b"\xc5" * 128).rstrip(b"=").decode()),
        r"^keys\[5\]: RSA keys must have at least 2048 bits",
    ),
    ("rsa-missing-e", _set(5, "e", _DELETE), r"^keys\[5\]\.e: must be a non-empty base64url"),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_bad_spiffe_bundle_is_rejected(bundle: TrustBundle, mutate: Mutation, message: str) -> None:
    document = copy.deepcopy(_document(bundle))
    assert [k["kty"] for k in document["keys"][3:7]] == ["EC", "EC", "RSA", "RSA"]
    mutate(document)
    with pytest.raises(InvalidArgument, match=message):
        from_spiffe_json(TD, json.dumps(document).encode())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"^bundle: must be a JSON document"),
        (b"\xff\xfe", r"^bundle: must be a JSON document"),
        (b"[]", r"^bundle: must be a JSON object"),
        (b'{"keys": ["x"]}', r"^keys\[0\]: must be a JSON object"),
        (b" " * (1024 * 1024 + 1), r"^bundle: must be at most"),
    ],
    ids=["empty", "not-utf8", "array", "key-not-object", "oversize"],
)
def test_malformed_document_is_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        from_spiffe_json(TD, data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
_ENTRY_FIELDS = st.sampled_from(["kty", "use", "kid", "crv", "x", "y", "n", "e", "x5c"])


@settings(max_examples=100, deadline=None)
@given(document=_JSON)
def test_arbitrary_json_is_a_bundle_or_an_invalid_argument(document: Any) -> None:
    try:
        parsed = from_spiffe_json(TD, json.dumps(document).encode())
    except InvalidArgument:
        return
    assert isinstance(parsed, TrustBundle)


_HYPOTHESIS_DOCUMENT: dict[str, Any] = json.loads(
    to_spiffe_json(
        TrustBundle(
            trust_domain=TD,
            x509_authorities=tuple(root_authority(t).certificate for t in ROOT_TYPES),
            jwt_authorities={
                f"kid-{t}": cached_key(t).public_key()
                for t in (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048)
            }
            | {"kid-z": cached_key(KeyType.EC_P256, slot=2).public_key()},
            sequence=1,
            refresh_hint=DEFAULT_REFRESH_HINT,
        )
    )
)


@settings(max_examples=100, deadline=None)
@given(index=st.integers(0, 6), name=_ENTRY_FIELDS, value=_JSON)
def test_any_field_mutation_is_a_bundle_or_an_invalid_argument(
    index: int, name: str, value: Any
) -> None:
    document = copy.deepcopy(_HYPOTHESIS_DOCUMENT)
    document["keys"][index][name] = value
    try:
        parsed = from_spiffe_json(TD, json.dumps(document).encode())
    except InvalidArgument:
        return
    assert all(isinstance(c, x509.Certificate) for c in parsed.x509_authorities)


def test_crafted_signing_certificate_in_pem_bundle() -> None:
    key = cached_key(slot=2)
    corp_root = craft_signing(None, key, key=key, uris=())
    parsed = from_pem(TD, corp_root.public_bytes(serialization.Encoding.PEM))
    assert parsed.x509_authorities == (corp_root,)
    assert from_spiffe_json(TD, to_spiffe_json(parsed)) == parsed
