"""Certificate and key helpers for the CA tests (an importable module, not a conftest).

Keys are real and generated with ``ca.keys.generate_key``; each (type, slot) pair is generated
once per test session because RSA-4096 takes seconds. ``craft_leaf`` and ``craft_signing``
build certificates directly with cryptography's ``CertificateBuilder`` so that tests can break
exactly one X509-SVID rule at a time; their defaults produce a conforming certificate.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import TrustDomain

from ca.keys import KeyType, PrivateKey, generate_key
from ca.x509svid import SigningAuthority, build_root_certificate

TD = TrustDomain("example.org")
OTHER_TD = TrustDomain("other.example")
WORKLOAD_ID = "spiffe://example.org/ns/default/sa/web"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

BOTH_AUTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
_serials = iter(range(0x1000, 1 << 62))


def next_serial() -> int:
    """Distinct, readable serials for crafted certificates."""
    return next(_serials)


@functools.cache
def cached_key(key_type: KeyType = KeyType.EC_P256, slot: int = 0) -> PrivateKey:
    """A real key of ``key_type``; the same object for the same (type, slot) all session."""
    return generate_key(key_type)


def root_authority(
    key_type: KeyType = KeyType.EC_P256,
    *,
    trust_domain: TrustDomain = TD,
    not_before: datetime = NOW - DAY,
    not_after: datetime = NOW + DAY,
    slot: int = 0,
) -> SigningAuthority:
    """A self-signed signing authority built with the production template."""
    key = cached_key(key_type, slot)
    cert = build_root_certificate(
        key, trust_domain, not_before=not_before, not_after=not_after, serial=next_serial()
    )
    return SigningAuthority(certificate=cert, key=key, chain=())


def key_usage(**flags: bool) -> x509.KeyUsage:
    """A KeyUsage with every bit off except those named."""
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    unknown = set(flags) - set(names)
    assert not unknown, unknown
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


LEAF_KU = key_usage(digital_signature=True)
SIGNING_KU = key_usage(key_cert_sign=True, crl_sign=True)
DEFAULT_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshid")])


def craft_leaf(
    issuer: SigningAuthority,
    *,
    key: PrivateKey | None = None,
    uris: Sequence[str] = (WORKLOAD_ID,),
    dns_names: Sequence[str] = (),
    subject: x509.Name = DEFAULT_SUBJECT,
    san: bool = True,
    san_critical: bool = False,
    basic_constraints: bool = True,
    ca: bool = False,
    ku: x509.KeyUsage | None = LEAF_KU,
    ku_critical: bool = True,
    eku: Sequence[x509.ObjectIdentifier] | None = BOTH_AUTH,
    not_before: datetime = NOW - HOUR,
    not_after: datetime = NOW + HOUR,
) -> x509.Certificate:
    """A leaf signed by ``issuer``; every argument can break one X509-SVID rule."""
    public_key = (key or cached_key(KeyType.EC_P256, slot=1)).public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(next_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if basic_constraints:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    if ku is not None:
        builder = builder.add_extension(ku, critical=ku_critical)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names.extend(x509.DNSName(d) for d in dns_names)
    if san and names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=san_critical)
    return builder.sign(issuer.key, hashes.SHA256())


def craft_signing(
    issuer_cert: x509.Certificate | None,
    issuer_key: PrivateKey,
    *,
    key: PrivateKey,
    uris: Sequence[str] = ("spiffe://example.org",),
    subject: x509.Name | None = None,
    basic_constraints: bool = True,
    ca: bool = True,
    ku: x509.KeyUsage | None = SIGNING_KU,
    ku_critical: bool = True,
    not_before: datetime = NOW - DAY,
    not_after: datetime = NOW + DAY,
) -> x509.Certificate:
    """A signing (CA) certificate; self-signed when ``issuer_cert`` is None."""
    serial = next_serial()
    name = subject or x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "crafted"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer_cert is None else issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if basic_constraints:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    if ku is not None:
        builder = builder.add_extension(ku, critical=ku_critical)
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def der_chain(chain: Sequence[x509.Certificate]) -> bytes:
    """Concatenated DER, leaf first (the Workload API's ``x509_svid`` field)."""
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in chain)


def pkcs8_der(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 DER (the Workload API's ``x509_svid_key`` field)."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
