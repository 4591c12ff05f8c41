"""X509-SVID conformance and chain verification (ca.validation).

The conformance table crafts certificates that each break exactly one rule of the X509-SVID
standard; the baseline test proves the crafting defaults conform, so each failure is the rule's.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe import SpiffeId, TrustDomain

from ca.errors import InvalidArgument, InvalidSvid
from ca.keys import KeyType
from ca.validation import (
    _tbs_names,
    check_signed_x509_svid,
    parse_spiffe_id,
    validate_signing_certificate,
    validate_x509_svid,
    verify_chain,
)
from ca.x509svid import SigningAuthority, random_serial, sign_x509_svid
from tests.ca.conftest_crypto import (
    DAY,
    HOUR,
    NOW,
    OTHER_TD,
    TD,
    WORKLOAD_ID,
    cached_key,
    craft_leaf,
    craft_signing,
    key_usage,
    root_authority,
)

ChainMaker = Callable[[SigningAuthority], list[x509.Certificate]]


def _intermediate(
    root: SigningAuthority, **overrides: object
) -> tuple[x509.Certificate, SigningAuthority]:
    """A crafted intermediate under ``root`` and the authority that signs with it."""
    key = cached_key(KeyType.EC_P256, slot=2)
    cert = craft_signing(root.certificate, root.key, key=key, **overrides)  # type: ignore[arg-type]
    return cert, SigningAuthority(certificate=cert, key=key, chain=(cert,))


def _with_intermediate(**overrides: object) -> ChainMaker:
    def make(root: SigningAuthority) -> list[x509.Certificate]:
        cert, authority = _intermediate(root, **overrides)
        return [craft_leaf(authority), cert]

    return make


def _leaf(**overrides: object) -> ChainMaker:
    return lambda root: [craft_leaf(root, **overrides)]  # type: ignore[arg-type]


EMPTY = x509.Name([])

# (id, chain maker, trust domain passed to the validator, message pattern)
BROKEN_RULES: list[tuple[str, ChainMaker, TrustDomain | None, str]] = [
    (
        "leaf-ca-true",
        _leaf(ca=True),
        None,
        r"^leaf certificate has cA=true \(serial 0x[0-9a-f]+\); X509-SVID §4\.1 forbids it$",
    ),
    ("leaf-no-basic-constraints", _leaf(basic_constraints=False), None, r"no basicConstraints"),
    ("leaf-no-key-usage", _leaf(ku=None), None, r"leaf certificate has no keyUsage .*§4\.3"),
    (
        "leaf-key-usage-not-critical",
        _leaf(ku_critical=False),
        None,
        r"leaf certificate keyUsage is not critical .*§4\.3",
    ),
    (
        "leaf-key-cert-sign",
        _leaf(ku=key_usage(digital_signature=True, key_cert_sign=True)),
        None,
        r"leaf certificate keyUsage has keyCertSign .*§4\.3 forbids it",
    ),
    (
        "leaf-crl-sign",
        _leaf(ku=key_usage(digital_signature=True, crl_sign=True)),
        None,
        r"leaf certificate keyUsage has cRLSign",
    ),
    (
        "leaf-no-digital-signature",
        _leaf(ku=key_usage(key_encipherment=True)),
        None,
        r"lacks digitalSignature .*§4\.3 requires it",
    ),
    (
        "two-uri-sans",
        _leaf(uris=(WORKLOAD_ID, "spiffe://example.org/other")),
        None,
        r"leaf certificate has 2 URI SANs .*X509-SVID §2 requires exactly one",
    ),
    (
        "spiffe-and-https-uri-sans",
        _leaf(uris=(WORKLOAD_ID, "https://example.org/")),
        None,
        r"has 2 URI SANs",
    ),
    (
        "no-uri-san",
        _leaf(uris=(), dns_names=("web.example.org",)),
        None,
        r"leaf certificate has no URI SAN .*§2",
    ),
    ("no-san-at-all", _leaf(san=False), None, r"leaf certificate has no URI SAN"),
    ("root-path-id", _leaf(uris=("spiffe://example.org",)), None, r"root path .*§3\.1"),
    ("not-a-spiffe-id", _leaf(uris=("https://example.org/web",)), None, r"is not a SPIFFE ID"),
    (
        "non-canonical-id",
        _leaf(uris=("spiffe://Example.org/web",)),
        None,
        r"not in canonical form \(expected 'spiffe://example.org/web'\)",
    ),
    (
        "eku-missing-client-auth",
        _leaf(eku=(ExtendedKeyUsageOID.SERVER_AUTH,)),
        None,
        r"extendedKeyUsage lacks clientAuth .*§4\.4",
    ),
    (
        "eku-missing-server-auth",
        _leaf(eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)),
        None,
        r"extendedKeyUsage lacks serverAuth",
    ),
    (
        "empty-subject-non-critical-san",
        _leaf(subject=EMPTY, san_critical=False),
        None,
        r"empty subject and a non-critical SAN .*§3\.1",
    ),
    (
        "signing-cert-without-ca",
        _with_intermediate(ca=False),
        None,
        r"^signing certificate #1 has cA=false \(serial 0x[0-9a-f]+\); X509-SVID §4\.1",
    ),
    (
        "signing-cert-without-basic-constraints",
        _with_intermediate(basic_constraints=False),
        None,
        r"signing certificate #1 has no basicConstraints",
    ),
    (
        "signing-cert-without-key-cert-sign",
        _with_intermediate(ku=key_usage(crl_sign=True)),
        None,
        r"signing certificate #1 keyUsage lacks keyCertSign",
    ),
    (
        "signing-svid-key-usage-not-critical",
        _with_intermediate(ku_critical=False),
        None,
        r"signing certificate #1 keyUsage is not critical",
    ),
    (
        "signing-cert-with-path-id",
        _with_intermediate(uris=("spiffe://example.org/ca",)),
        None,
        r"signing certificate #1 SPIFFE ID spiffe://example.org/ca has a path .*§3\.2",
    ),
    (
        "signing-cert-two-spiffe-ids",
        _with_intermediate(uris=("spiffe://example.org", "spiffe://other.example")),
        None,
        r"signing certificate #1 has 2 SPIFFE IDs",
    ),
    (
        "signing-cert-wrong-trust-domain",
        _with_intermediate(uris=("spiffe://other.example",)),
        None,
        r"signing certificate #1 SPIFFE ID spiffe://other.example is not in trust domain "
        r"example\.org",
    ),
    (
        "leaf-wrong-trust-domain",
        _leaf(),
        OTHER_TD,
        r"leaf certificate SPIFFE ID spiffe://example.org/.* is not in trust domain other\.example",
    ),
]


@pytest.mark.parametrize(
    ("make", "trust_domain", "message"),
    [case[1:] for case in BROKEN_RULES],
    ids=[case[0] for case in BROKEN_RULES],
)
def test_broken_rule_is_rejected(
    make: ChainMaker, trust_domain: TrustDomain | None, message: str
) -> None:
    chain = make(root_authority())
    with pytest.raises(InvalidSvid, match=message):
        validate_x509_svid(chain, trust_domain=trust_domain)


# The leaf rules: one-certificate chains checked without a trust domain.
LEAF_RULES = [case for case in BROKEN_RULES if not case[0].startswith("signing-") and not case[2]]


@pytest.mark.parametrize(
    "make", [case[1] for case in LEAF_RULES], ids=[case[0] for case in LEAF_RULES]
)
def test_the_ca_self_check_catches_every_leaf_rule(make: ChainMaker) -> None:
    """``check_signed_x509_svid`` (the CA's check of its own output) refuses every broken leaf
    the full validator refuses."""
    root = root_authority()
    (leaf,) = make(root)
    with pytest.raises(InvalidSvid):
        check_signed_x509_svid(leaf, spiffe_id=SpiffeId(WORKLOAD_ID), issuer=root.certificate)


def test_the_ca_self_check_wants_exactly_the_requested_id_and_its_own_issuer() -> None:
    root = root_authority()
    leaf = craft_leaf(root)
    check_signed_x509_svid(leaf, spiffe_id=SpiffeId(WORKLOAD_ID), issuer=root.certificate)
    with pytest.raises(InvalidSvid, match=r"not exactly the requested 'spiffe://example.org/x'"):
        check_signed_x509_svid(
            leaf, spiffe_id=SpiffeId("spiffe://example.org/x"), issuer=root.certificate
        )
    other = root_authority(slot=1)
    with pytest.raises(InvalidSvid, match=r"names issuer .* not the signing authority"):
        check_signed_x509_svid(leaf, spiffe_id=SpiffeId(WORKLOAD_ID), issuer=other.certificate)
    outlives = craft_leaf(root, not_after=root.certificate.not_valid_after_utc + HOUR)
    with pytest.raises(InvalidSvid, match=r"valid outside its signing authority's lifetime"):
        check_signed_x509_svid(outlives, spiffe_id=SpiffeId(WORKLOAD_ID), issuer=root.certificate)


def test_crafting_defaults_conform() -> None:
    root = root_authority()
    assert validate_x509_svid([craft_leaf(root)], trust_domain=TD) == SpiffeId(WORKLOAD_ID)
    assert validate_x509_svid(_with_intermediate()(root), trust_domain=TD) == WORKLOAD_ID
    # An empty subject is fine when the SAN is critical (X509-SVID §3.1).
    assert validate_x509_svid([craft_leaf(root, subject=EMPTY, san_critical=True)])
    # EKU is optional (X509-SVID §4.4 says SHOULD).
    assert validate_x509_svid([craft_leaf(root, eku=None)])
    # keyEncipherment and keyAgreement are allowed on leaves (X509-SVID §4.3).
    ku = key_usage(digital_signature=True, key_encipherment=True, key_agreement=True)
    assert validate_x509_svid([craft_leaf(root, ku=ku)])
    # A signing certificate without a SPIFFE ID is a plain CA; its keyUsage need not be critical.
    assert validate_x509_svid(_with_intermediate(uris=(), ku_critical=False)(root))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("spiffe://exa mple/web", r"is not a SPIFFE ID"),
        ("spiffe://Example.org/web", r"is not in canonical form"),
    ],
    ids=["invalid", "non-canonical"],
)
def test_uri_san_is_checked_every_time(uri: str, message: str) -> None:
    """Parsed IDs are remembered, failures are not: each bad leaf is named again, every time."""
    root = root_authority()
    assert validate_x509_svid([craft_leaf(root)]) == SpiffeId(WORKLOAD_ID)  # the good one, kept
    for _ in range(2):
        leaf = craft_leaf(root, uris=(uri,))
        pattern = rf"^leaf certificate \(serial 0x{leaf.serial_number:x}\) URI SAN .*{message}"
        with pytest.raises(InvalidSvid, match=pattern):
            validate_x509_svid([leaf])


def test_empty_chain_is_rejected() -> None:
    with pytest.raises(InvalidSvid, match=r"the chain is empty"):
        validate_x509_svid([])


def test_validate_signing_certificate() -> None:
    root = root_authority()
    validate_signing_certificate(root.certificate, TD)
    with pytest.raises(InvalidSvid, match=r"^signing certificate SPIFFE ID .* not in trust domain"):
        validate_signing_certificate(root.certificate, OTHER_TD)
    leaf = craft_leaf(root)
    with pytest.raises(InvalidSvid, match=r"^signing certificate has cA=false"):
        validate_signing_certificate(leaf, TD)
    key = cached_key(slot=2)
    no_ku = craft_signing(None, key, key=key, ku=None)
    with pytest.raises(InvalidSvid, match=r"^signing certificate has no keyUsage"):
        validate_signing_certificate(no_ku, TD)


def test_parse_spiffe_id_translates_py_spiffe_errors() -> None:
    with pytest.raises(
        InvalidSvid, match=r"^thing 'spiffe://exa mple/x' is not a SPIFFE ID"
    ) as info:
        parse_spiffe_id("spiffe://exa mple/x", what="thing")
    assert info.value.__cause__ is not None
    assert parse_spiffe_id("spiffe://example.org/a", what="x") == SpiffeId("spiffe://example.org/a")


# --- verify_chain -----------------------------------------------------------------------------


def _signed_chain(authority: SigningAuthority) -> list[x509.Certificate]:
    return sign_x509_svid(
        authority,
        cached_key(slot=1).public_key(),
        SpiffeId(WORKLOAD_ID),
        not_before=NOW - HOUR,
        not_after=NOW + HOUR,
        serial=random_serial(),
    )


def test_verify_chain_accepts_a_good_chain_at_the_edges_of_validity() -> None:
    root = root_authority()
    chain = _signed_chain(root)
    for moment in (NOW - HOUR, NOW, NOW + HOUR):
        verify_chain(chain, [root.certificate], now=moment)
    verify_chain([*chain, root.certificate], [root.certificate], now=NOW)  # root included


def test_verify_chain_picks_the_right_root_among_several() -> None:
    root = root_authority()
    others = [root_authority(slot=s).certificate for s in (2, 3)]
    verify_chain(_signed_chain(root), [*others, root.certificate], now=NOW)


@pytest.mark.parametrize(
    ("now", "message"),
    [
        (NOW + HOUR + HOUR, r"^leaf certificate \(serial 0x[0-9a-f]+\) expired at "),
        (NOW - 2 * HOUR, r"^leaf certificate \(serial 0x[0-9a-f]+\) is not yet valid"),
    ],
    ids=["expired", "not-yet-valid"],
)
def test_verify_chain_rejects_a_leaf_outside_its_validity(now: datetime, message: str) -> None:
    root = root_authority()
    with pytest.raises(InvalidSvid, match=message):
        verify_chain(_signed_chain(root), [root.certificate], now=now)


def test_verify_chain_rejects_an_expired_intermediate() -> None:
    root = root_authority()
    cert, authority = _intermediate(root, not_after=NOW - HOUR, not_before=NOW - DAY)
    chain = [craft_leaf(authority), cert]
    with pytest.raises(InvalidSvid, match=r"^signing certificate #1 \(serial .*\) expired at"):
        verify_chain(chain, [root.certificate], now=NOW)


def test_verify_chain_rejects_an_unknown_root() -> None:
    chain = _signed_chain(root_authority())
    stranger = root_authority(slot=2)
    with pytest.raises(
        InvalidSvid, match=r"^leaf certificate .* is signed by an unknown authority"
    ):
        verify_chain(chain, [stranger.certificate], now=NOW)
    with pytest.raises(InvalidSvid, match=r"none of the 0 trusted roots"):
        verify_chain(chain, [], now=NOW)


def test_verify_chain_rejects_an_expired_root() -> None:
    root = root_authority(not_before=NOW - DAY, not_after=NOW + 2 * HOUR)
    chain = _signed_chain(root)
    # The leaf is clamped to the root, so step past both to see the leaf fail first ...
    with pytest.raises(InvalidSvid, match=r"^leaf certificate .* expired"):
        verify_chain(chain, [root.certificate], now=NOW + 3 * HOUR)
    # ... and craft a leaf that outlives its root to see the root fail.
    leaf = craft_leaf(root, not_after=NOW + DAY)
    with pytest.raises(
        InvalidSvid, match=r"^the trusted root \(serial .*\) that signed .* expired"
    ):
        verify_chain([leaf], [root.certificate], now=NOW + 3 * HOUR)


def test_verify_chain_rejects_a_broken_link_by_name() -> None:
    root = root_authority()
    cert, _ = _intermediate(root)
    leaf = craft_leaf(root_authority(slot=3))  # issued by someone else
    with pytest.raises(InvalidSvid, match=r"^leaf certificate .* is not signed by signing cert"):
        verify_chain([leaf, cert], [root.certificate], now=NOW)


def test_verify_chain_rejects_a_broken_link_by_signature() -> None:
    root = root_authority()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "same-name")])
    real = craft_signing(root.certificate, root.key, key=cached_key(slot=2), subject=name)
    impostor_key = cached_key(slot=4)
    impostor = craft_signing(root.certificate, root.key, key=impostor_key, subject=name)
    leaf = craft_leaf(SigningAuthority(certificate=impostor, key=impostor_key, chain=()))
    with pytest.raises(InvalidSvid, match=r"not signed by signing certificate #1 .*signature does"):
        verify_chain([leaf, real], [root.certificate], now=NOW)


def test_verify_chain_argument_errors() -> None:
    root = root_authority()
    with pytest.raises(InvalidSvid, match=r"the chain is empty"):
        verify_chain([], [root.certificate], now=NOW)
    with pytest.raises(InvalidArgument, match=r"^now: must be a timezone-aware"):
        verify_chain(_signed_chain(root), [root.certificate], now=NOW.replace(tzinfo=None))


@given(
    names=st.lists(
        st.text(
            alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=64
        ),
        max_size=6,
    )
)
@settings(max_examples=40, deadline=None)
def test_the_tbs_names_read_from_der_are_the_names_cryptography_parses(names: list[str]) -> None:
    """The self-check compares issuer and subject as DER cut from the TBSCertificate; for any
    subject (empty, short, past the 127-byte short length form) that is exactly what
    cryptography encodes for the parsed names."""
    root = root_authority()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, n) for n in names])
    leaf = craft_leaf(root, subject=subject, san_critical=not names)
    assert _tbs_names(leaf) == (leaf.issuer.public_bytes(), leaf.subject.public_bytes())
    assert _tbs_names(root.certificate)[0] == root.certificate.issuer.public_bytes()


def test_a_malformed_tbs_is_refused_not_crashed() -> None:
    class Broken:
        tbs_certificate_bytes = b"\x30\x82\xff"
        serial_number = 1

    with pytest.raises(InvalidSvid, match="malformed TBSCertificate"):
        _tbs_names(Broken())  # type: ignore[arg-type]
