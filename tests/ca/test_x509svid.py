"""Certificate templates and X509-SVID signing (ca.x509svid)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe import SpiffeId

from ca.errors import AuthorityUnavailable, InvalidArgument
from ca.keys import KeyType, PrivateKey
from ca.validation import validate_signing_certificate, validate_x509_svid, verify_chain
from ca.x509svid import (
    SigningAuthority,
    build_intermediate_certificate,
    build_root_certificate,
    public_key_from_csr,
    public_key_from_der,
    random_serial,
    sign_x509_svid,
)
from tests.ca.conftest_crypto import (
    DAY,
    HOUR,
    NOW,
    OTHER_TD,
    TD,
    WORKLOAD_ID,
    cached_key,
    craft_signing,
    der_chain,
    next_serial,
    pkcs8_der,
    root_authority,
)

ALL_KEY_TYPES = list(KeyType)
WORKLOAD = SpiffeId(WORKLOAD_ID)


@pytest.fixture(scope="module")
def keys() -> dict[KeyType, PrivateKey]:
    """One real key per type for the module (RSA-4096 is generated once per session)."""
    return {key_type: cached_key(key_type) for key_type in KeyType}


def _sign(
    authority: SigningAuthority,
    *,
    key: PrivateKey | None = None,
    spiffe_id: SpiffeId = WORKLOAD,
    not_before: datetime = NOW - HOUR,
    not_after: datetime = NOW + HOUR,
    dns_names: tuple[str, ...] = (),
) -> list[x509.Certificate]:
    leaf_key = key or cached_key(KeyType.EC_P256, slot=1)
    return sign_x509_svid(
        authority,
        leaf_key.public_key(),
        spiffe_id,
        not_before=not_before,
        not_after=not_after,
        serial=random_serial(),
        dns_names=dns_names,
    )


def _expected_hash(key: PrivateKey) -> type[hashes.HashAlgorithm]:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size == 384:
        return hashes.SHA384
    return hashes.SHA256


# --- authority certificates ---------------------------------------------------------------


@pytest.mark.parametrize("key_type", ALL_KEY_TYPES, ids=str)
def test_root_certificate_is_a_spiffe_signing_certificate(
    keys: dict[KeyType, PrivateKey], key_type: KeyType
) -> None:
    key = keys[key_type]
    serial = random_serial()
    cert = build_root_certificate(
        key, TD, not_before=NOW, not_after=NOW + DAY, serial=serial, subject_org="acme"
    )

    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == str(serial)
    assert cert.serial_number == serial
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (NOW, NOW + DAY)
    assert isinstance(cert.signature_hash_algorithm, _expected_hash(key))
    cert.verify_directly_issued_by(cert)
    validate_signing_certificate(cert, TD)


def test_each_authority_has_a_distinct_subject() -> None:
    first, second = root_authority(), root_authority()
    assert first.certificate.subject != second.certificate.subject


def test_intermediate_is_signed_by_upstream_and_clamped_to_it() -> None:
    upstream = root_authority(KeyType.EC_P384, not_after=NOW + 2 * DAY, slot=5)
    key = cached_key(KeyType.EC_P256, slot=6)
    cert = build_intermediate_certificate(
        key.public_key(),
        TD,
        upstream_certificate=upstream.certificate,
        upstream_key=upstream.key,
        not_before=NOW,
        not_after=NOW + 30 * DAY,
        serial=random_serial(),
    )
    cert.verify_directly_issued_by(upstream.certificate)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)  # the upstream key's curve
    assert cert.not_valid_after_utc == NOW + 2 * DAY
    assert cert.issuer == upstream.certificate.subject
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    upstream_ski = upstream.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    assert aki.key_identifier == upstream_ski.digest
    validate_signing_certificate(cert, TD)


def test_intermediate_authority_chain_verifies_to_the_upstream_root() -> None:
    upstream = root_authority(KeyType.EC_P384, slot=5)
    key = cached_key(KeyType.EC_P256, slot=6)
    intermediate = build_intermediate_certificate(
        key.public_key(),
        TD,
        upstream_certificate=upstream.certificate,
        upstream_key=upstream.key,
        not_before=NOW - HOUR,
        not_after=NOW + DAY,
        serial=random_serial(),
    )
    authority = SigningAuthority(certificate=intermediate, key=key, chain=(intermediate,))
    chain = _sign(authority)

    assert chain[1:] == [intermediate]
    assert validate_x509_svid(chain, trust_domain=TD) == WORKLOAD
    verify_chain(chain, [upstream.certificate], now=NOW)
    parsed = spiffe.X509Svid.parse_raw(der_chain(chain), pkcs8_der(cached_key(slot=1)))
    assert parsed.spiffe_id == WORKLOAD


def test_authority_below_a_corporate_intermediate_without_spiffe_id() -> None:
    corp_root_key = cached_key(KeyType.EC_P256, slot=7)
    corp_root = craft_signing(None, corp_root_key, key=corp_root_key, uris=())
    corp_mid_key = cached_key(KeyType.EC_P256, slot=8)
    corp_mid = craft_signing(corp_root, corp_root_key, key=corp_mid_key, uris=(), ku_critical=False)
    key = cached_key(KeyType.EC_P256, slot=9)
    ours = build_intermediate_certificate(
        key.public_key(),
        TD,
        upstream_certificate=corp_mid,
        upstream_key=corp_mid_key,
        not_before=NOW - HOUR,
        not_after=NOW + DAY,
        serial=random_serial(),
    )
    authority = SigningAuthority(certificate=ours, key=key, chain=(ours, corp_mid))
    chain = _sign(authority)

    assert chain[1:] == [ours, corp_mid]
    assert validate_x509_svid(chain, trust_domain=TD) == WORKLOAD
    verify_chain(chain, [corp_root], now=NOW)


def test_intermediate_rejects_an_upstream_that_is_not_a_ca() -> None:
    upstream_key = cached_key(KeyType.EC_P256, slot=7)
    not_ca = craft_signing(None, upstream_key, key=upstream_key, ca=False)
    with pytest.raises(InvalidArgument, match=r"upstream_certificate: must be a CA"):
        build_intermediate_certificate(
            cached_key(slot=6).public_key(),
            TD,
            upstream_certificate=not_ca,
            upstream_key=upstream_key,
            not_before=NOW,
            not_after=NOW + DAY,
            serial=1,
        )


def test_intermediate_rejects_a_key_that_does_not_match_the_upstream() -> None:
    upstream = root_authority()
    with pytest.raises(InvalidArgument, match=r"upstream_key: must be the private key"):
        build_intermediate_certificate(
            cached_key(slot=6).public_key(),
            TD,
            upstream_certificate=upstream.certificate,
            upstream_key=cached_key(slot=6),
            not_before=NOW,
            not_after=NOW + DAY,
            serial=1,
        )


def test_intermediate_rejects_an_upstream_expiring_before_not_before() -> None:
    upstream = root_authority(not_after=NOW)
    with pytest.raises(InvalidArgument, match=r"upstream_certificate: expires at"):
        build_intermediate_certificate(
            cached_key(slot=6).public_key(),
            TD,
            upstream_certificate=upstream.certificate,
            upstream_key=upstream.key,
            not_before=NOW + HOUR,
            not_after=NOW + DAY,
            serial=1,
        )


def test_signing_authority_checks_its_key_and_chain() -> None:
    authority = root_authority()
    with pytest.raises(InvalidArgument, match=r"^key: must be the private key"):
        SigningAuthority(certificate=authority.certificate, key=cached_key(slot=6), chain=())
    other = root_authority(slot=6)
    with pytest.raises(InvalidArgument, match=r"^chain: must start with the authority"):
        SigningAuthority(
            certificate=authority.certificate, key=authority.key, chain=(other.certificate,)
        )


# --- leaf SVIDs -----------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ALL_KEY_TYPES, ids=str)
def test_svid_of_every_key_type_validates_and_parses_with_py_spiffe(
    keys: dict[KeyType, PrivateKey], key_type: KeyType
) -> None:
    authority = SigningAuthority(
        certificate=build_root_certificate(
            keys[key_type], TD, not_before=NOW - DAY, not_after=NOW + DAY, serial=next_serial()
        ),
        key=keys[key_type],
        chain=(),
    )
    leaf_key = keys[key_type]
    chain = _sign(authority, key=leaf_key, dns_names=("web.example.org", "*.web.example.org"))
    leaf = chain[0]

    assert len(chain) == 1
    assert validate_x509_svid(chain, trust_domain=TD) == WORKLOAD
    verify_chain(chain, [authority.certificate], now=NOW)
    parsed = spiffe.X509Svid.parse_raw(der_chain(chain), pkcs8_der(leaf_key))
    assert parsed.spiffe_id == WORKLOAD
    assert parsed.leaf == leaf

    assert isinstance(leaf.signature_hash_algorithm, _expected_hash(authority.key))
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    is_rsa = isinstance(leaf_key, rsa.RSAPrivateKey)
    assert ku.value.key_encipherment is is_rsa
    assert ku.value.key_agreement is not is_rsa
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WORKLOAD_ID]
    assert san.value.get_values_for_type(x509.DNSName) == ["web.example.org", "*.web.example.org"]
    assert not san.critical  # the subject is not empty
    assert leaf.subject.rfc4514_string() == "CN=web.example.org,O=meshid"
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ski.value.digest
    leaf_ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert leaf_ski == x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key())


def test_svid_without_dns_names_has_only_the_organization() -> None:
    leaf = _sign(root_authority())[0]
    assert leaf.subject.rfc4514_string() == "O=meshid"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []


def test_long_dns_name_stays_out_of_the_common_name() -> None:
    name = ".".join(["a" * 60, "b" * 10])
    leaf = _sign(root_authority(), dns_names=(name,))[0]
    assert leaf.subject.rfc4514_string() == "O=meshid"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [name]


def test_svid_not_after_is_clamped_to_the_authority() -> None:
    authority = root_authority(not_after=NOW + HOUR)
    leaf = _sign(authority, not_before=NOW, not_after=NOW + DAY)[0]
    assert leaf.not_valid_after_utc == NOW + HOUR
    assert leaf.not_valid_before_utc == NOW


def test_svid_from_an_authority_expiring_before_not_before_is_refused() -> None:
    authority = root_authority(not_after=NOW)
    with pytest.raises(AuthorityUnavailable, match=r"expires at .* before the SVID's not_before"):
        _sign(authority, not_before=NOW + HOUR, not_after=NOW + 2 * HOUR)


def test_times_given_in_any_zone_are_written_in_utc() -> None:
    east = timezone(timedelta(hours=5, minutes=30))
    leaf = _sign(root_authority(), not_before=NOW.astimezone(east), not_after=NOW + HOUR)[0]
    assert (leaf.not_valid_before_utc, leaf.not_valid_after_utc) == (NOW, NOW + HOUR)


def test_one_authority_signs_leaves_of_every_key_type(keys: dict[KeyType, PrivateKey]) -> None:
    """The per-authority template carries nothing of one leaf over to the next."""
    authority = root_authority()
    for key_type in (KeyType.RSA_2048, KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048):
        leaf_key = keys[key_type]
        chain = _sign(authority, key=leaf_key)
        assert validate_x509_svid(chain, trust_domain=TD) == WORKLOAD
        verify_chain(chain, [authority.certificate], now=NOW)
        ku = chain[0].extensions.get_extension_for_class(x509.KeyUsage).value
        is_rsa = isinstance(leaf_key, rsa.RSAPrivateKey)
        assert (ku.key_encipherment, ku.key_agreement) == (is_rsa, not is_rsa)
        leaf_ski = chain[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert leaf_ski == x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key())


RequestCase = Callable[[SigningAuthority], object]
BAD_REQUESTS: list[tuple[str, RequestCase, str]] = [
    (
        "naive-not-before",
        lambda a: _sign(a, not_before=datetime(2030, 1, 1)),
        r"^not_before: must be a timezone-aware",
    ),
    (
        "naive-not-after",
        lambda a: _sign(a, not_after=datetime(2031, 1, 1)),
        r"^not_after: must be a timezone-aware",
    ),
    ("not-after-before-not-before", lambda a: _sign(a, not_after=NOW - 2 * HOUR), r"^not_after"),
    (
        "not-before-1949",
        lambda a: _sign(a, not_before=datetime(1949, 12, 31, tzinfo=UTC)),
        r"^not_before: must be on or after 1950-01-01",
    ),
    ("root-path-id", lambda a: _sign(a, spiffe_id=SpiffeId("spiffe://example.org")), r"non-root"),
    (
        "other-trust-domain",
        lambda a: _sign(a, spiffe_id=SpiffeId("spiffe://other.example/x")),
        r"^spiffe_id: must be in the authority's trust domain example.org",
    ),
    (
        "id-too-long",
        lambda a: _sign(a, spiffe_id=SpiffeId("spiffe://example.org/" + "a" * 2100)),
        r"^spiffe_id: must be at most 2048 bytes",
    ),
    (
        "serial-zero",
        lambda a: sign_x509_svid(
            a, cached_key().public_key(), WORKLOAD, not_before=NOW, not_after=NOW + HOUR, serial=0
        ),
        r"^serial: must be positive",
    ),
    (
        "serial-too-big",
        lambda a: sign_x509_svid(
            a,
            cached_key().public_key(),
            WORKLOAD,
            not_before=NOW,
            not_after=NOW + HOUR,
            serial=1 << 160,
        ),
        r"^serial: must be positive and at most 159 bits",
    ),
    ("dns-string-not-list", lambda a: _sign(a, dns_names="a.example"), r"^dns_names: must be a"),  # type: ignore[arg-type]
    ("dns-empty-label", lambda a: _sign(a, dns_names=("a..example",)), r"^dns_names: each name"),
    ("dns-leading-dash", lambda a: _sign(a, dns_names=("-a.example",)), r"^dns_names: each name"),
    ("dns-inner-wildcard", lambda a: _sign(a, dns_names=("a.*.example",)), r"^dns_names: each"),
    ("dns-trailing-dot", lambda a: _sign(a, dns_names=("a.example.",)), r"^dns_names: each"),
    ("dns-unicode", lambda a: _sign(a, dns_names=("bücher.example",)), r"^dns_names: each"),
    ("dns-duplicate", lambda a: _sign(a, dns_names=("a.example", "A.example")), r"must not repeat"),
    (
        "dns-too-long",
        lambda a: _sign(a, dns_names=(".".join(["a" * 63] * 4),)),
        r"^dns_names: each name must be at most 253",
    ),
]


@pytest.mark.parametrize(
    ("make", "message"),
    [(m, msg) for _, m, msg in BAD_REQUESTS],
    ids=[i for i, _, _ in BAD_REQUESTS],
)
def test_bad_signing_request_is_rejected(make: RequestCase, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make(root_authority())


def test_unsupported_public_key_is_rejected() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InvalidArgument, match=r"^public_key: must be ECDSA P-256/P-384 or RSA"):
        sign_x509_svid(
            root_authority(),
            small.public_key(),
            WORKLOAD,
            not_before=NOW,
            not_after=NOW + HOUR,
            serial=1,
        )


def test_random_serials_are_positive_128_bit_and_distinct() -> None:
    serials = {random_serial() for _ in range(1000)}
    assert len(serials) == 1000
    assert all(s.bit_length() == 128 for s in serials)


# --- free-form inputs -----------------------------------------------------------------------

_HYPOTHESIS_AUTHORITY = root_authority(slot=3)
_LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)


def _rfc1123(name: str) -> bool:
    """An independent statement of the DNS name rule the CA enforces."""
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if not labels or len(name) > 253:
        return False
    for label in labels:
        if not 1 <= len(label) <= 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isascii() and (c.isalnum() or c == "-") for c in label):
            return False
    return True


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(
        st.builds(
            lambda wildcard, labels: ("*." if wildcard else "") + ".".join(labels),
            st.booleans(),
            st.lists(_LABEL, min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=3,
        unique_by=str.lower,
    )
)
def test_valid_dns_names_end_up_in_the_san(names: list[str]) -> None:
    leaf = _sign(_HYPOTHESIS_AUTHORITY, dns_names=tuple(names))[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names
    assert validate_x509_svid([leaf]) == WORKLOAD


@settings(max_examples=150, deadline=None)
@given(name=st.one_of(st.text(max_size=80), st.from_regex(r"[a-z*.-]{0,12}", fullmatch=True)))
def test_any_text_is_a_dns_name_only_if_rfc1123_says_so(name: str) -> None:
    if _rfc1123(name):
        _sign(_HYPOTHESIS_AUTHORITY, dns_names=(name,))
    else:
        with pytest.raises(InvalidArgument, match=r"^dns_names: "):
            _sign(_HYPOTHESIS_AUTHORITY, dns_names=(name,))


_SEGMENT = st.from_regex(r"[a-zA-Z0-9._-]{1,12}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=60, deadline=None)
@given(segments=st.lists(_SEGMENT, min_size=1, max_size=5))
def test_any_valid_spiffe_path_round_trips_through_an_svid(segments: list[str]) -> None:
    spiffe_id = SpiffeId("spiffe://example.org/" + "/".join(segments))
    chain = _sign(_HYPOTHESIS_AUTHORITY, spiffe_id=spiffe_id)
    assert validate_x509_svid(chain, trust_domain=TD) == spiffe_id


# --- CSRs and public keys ---------------------------------------------------------------------


def _csr(key: PrivateKey | ed25519.Ed25519PrivateKey) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


@pytest.mark.parametrize("encoding", [serialization.Encoding.DER, serialization.Encoding.PEM])
@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048], ids=str)
def test_public_key_from_csr(
    keys: dict[KeyType, PrivateKey], key_type: KeyType, encoding: serialization.Encoding
) -> None:
    key = keys[key_type]
    data = _csr(key).public_bytes(encoding)
    assert public_key_from_csr(data) == key.public_key()


def test_csr_with_a_bad_signature_is_rejected() -> None:
    data = bytearray(_csr(cached_key()).public_bytes(serialization.Encoding.DER))
    data[-1] ^= 0x01
    with pytest.raises(InvalidArgument, match=r"^csr: signature does not verify"):
        public_key_from_csr(bytes(data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"^csr: must be a PKCS#10"),
        (b"not a csr", r"^csr: must be a PKCS#10"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "PKCS#10",
        ),
        (b"\x30" * 70_000, r"^csr: must be at most 65536 bytes"),
    ],
    ids=["empty", "garbage", "bad-pem", "oversize"],
)
def test_malformed_csr_is_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        public_key_from_csr(data)


def test_csr_with_an_unsupported_key_is_rejected() -> None:
    data = _csr(ed25519.Ed25519PrivateKey.generate()).public_bytes(serialization.Encoding.DER)
    with pytest.raises(InvalidArgument, match=r"^csr: public key must be ECDSA"):
        public_key_from_csr(data)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InvalidArgument, match=r"^csr: must be ECDSA P-256/P-384 or RSA"):
        public_key_from_csr(_csr(small).public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize("encoding", [serialization.Encoding.DER, serialization.Encoding.PEM])
def test_public_key_from_der(encoding: serialization.Encoding) -> None:
    key = cached_key(KeyType.EC_P384).public_key()
    data = key.public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public_key_from_der(data) == key


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"junk", r"^public_key: must be a SubjectPublicKeyInfo"),
        (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            r"^public_key: must be ECDSA",
        ),
        (
            ec.generate_private_key(ec.SECP521R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            r"^public_key: must be ECDSA P-256/P-384",
        ),
    ],
    ids=["garbage", "ed25519", "p521"],
)
def test_bad_public_key_is_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        public_key_from_der(data)


def test_spiffe_id_is_never_taken_from_the_csr() -> None:
    key = cached_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://example.org/admin")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    public_key = public_key_from_csr(csr.public_bytes(serialization.Encoding.DER))
    leaf = sign_x509_svid(
        root_authority(),
        public_key,
        WORKLOAD,
        not_before=NOW,
        not_after=NOW + HOUR,
        serial=random_serial(),
    )[0]
    assert validate_x509_svid([leaf]) == WORKLOAD
    assert re.search("admin", str(leaf.extensions)) is None


def test_other_trust_domain_authority_cannot_sign_for_ours() -> None:
    other = root_authority(trust_domain=OTHER_TD)
    with pytest.raises(InvalidArgument, match=r"trust domain other.example"):
        _sign(other)
