"""Certificate templates and signing for the authority and its X509-SVIDs.

Owns what goes into a certificate: the self-signed root or upstream-signed intermediate of a
signing authority, and the workload leaf (X509-SVID) it signs. Also reads the public key out of a
CSR or a SubjectPublicKeyInfo.

Rules of this module:
- Pure: values in, values out. No file or network I/O and no clock reads; every time is an aware
  ``datetime`` passed by the caller. ``random_serial`` is the one helper that draws randomness.
- The SPIFFE ID of a leaf is decided by the server and passed in; a CSR only contributes its
  public key, never its subject or extensions.
- Signing does not check its own output; the server runs ``ca.validation.check_signed_x509_svid``
  on every leaf before it leaves the CA, as SPIRE does, and checks the authority's own chain
  (``validate_signing_certificate``, ``verify_chain``) when it loads the signer.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from .errors import AuthorityUnavailable, InvalidArgument
from .keys import KeyType, PrivateKey, PublicKey, is_supported_public_key, key_type_of

__all__ = [
    "LEAF_SUBJECT_ORG",
    "SigningAuthority",
    "build_intermediate_certificate",
    "build_root_certificate",
    "public_key_from_csr",
    "public_key_from_der",
    "random_serial",
    "sign_x509_svid",
]

LEAF_SUBJECT_ORG = "meshid"  # a non-empty subject keeps the SAN non-critical (X509-SVID §3.1)
SERIAL_BITS = 128  # RFC 5280 §4.1.2.2 wants unpredictable serials; 128 random bits is plenty
MAX_SERIAL_BITS = 159  # RFC 5280 §4.1.2.2: at most 20 octets, and the sign bit must stay clear
CN_MAX_LENGTH = 64  # RFC 5280 ub-common-name; longer DNS names stay in the SAN only
DNS_NAME_MAX_LENGTH = 253  # RFC 1035 §2.3.4: 255 octets on the wire, 253 characters as text
SPIFFE_ID_MAX_BYTES = 2048  # SPIFFE-ID §2.3: implementations SHOULD NOT generate longer IDs
MAX_ENCODED_BYTES = 64 * 1024  # a CSR or key of RSA-4096 is < 2 KiB; larger input is abuse

_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_PEM_MARKER = b"-----BEGIN"
_EARLIEST_TIME = datetime(1950, 1, 1, tzinfo=UTC)  # RFC 5280 §4.1.2.5: UTCTime starts in 1950


def _encoded(value: x509.ExtensionType, *, critical: bool) -> x509.Extension[x509.ExtensionType]:
    """``value`` as an extension whose DER is worked out now, once, rather than at every signing.

    The builder copies an ``UnrecognizedExtension``'s bytes into the certificate as they are, so
    the certificate is byte for byte what ``value`` itself would give, and reads back as ``value``.
    """
    raw = x509.UnrecognizedExtension(value.oid, value.public_bytes())
    return x509.Extension(value.oid, critical, raw)


# The parts of every leaf that depend on nothing but the key type (X509-SVID §4.1, §4.3, §4.4).
_LEAF_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, LEAF_SUBJECT_ORG)])
_LEAF_BASIC_CONSTRAINTS = _encoded(x509.BasicConstraints(ca=False, path_length=None), critical=True)


def _leaf_key_usage(*, is_rsa: bool) -> x509.Extension[x509.ExtensionType]:
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=not is_rsa,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return _encoded(usage, critical=True)  # critical: X509-SVID §4.3


_LEAF_KEY_USAGE_EC = _leaf_key_usage(is_rsa=False)
_LEAF_KEY_USAGE_RSA = _leaf_key_usage(is_rsa=True)
_LEAF_EXTENDED_KEY_USAGE = _encoded(
    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
    critical=False,
)


@dataclass(frozen=True, slots=True)
class _LeafTemplate:
    """What every leaf of one authority shares, worked out once per authority."""

    issuer: x509.Name
    not_after: datetime
    trust_domain: TrustDomain | None
    authority_key_identifier: x509.Extension[x509.ExtensionType]
    algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512


@dataclass(frozen=True)
class SigningAuthority:
    """A CA certificate with its private key, ready to sign X509-SVIDs.

    ``chain`` is what follows the leaf in every SVID: empty for a self-signed root; for an
    intermediate signed by an upstream CA, the authority certificate itself, then any upstream
    intermediates, never the upstream root (that one travels in the trust bundle).
    """

    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.chain, tuple):
            object.__setattr__(self, "chain", tuple(self.chain))
        if not _same_public_key(self.certificate.public_key(), self.key.public_key()):
            raise InvalidArgument(
                "key", "must be the private key of the authority certificate's public key"
            )
        if self.chain and self.chain[0] != self.certificate:
            raise InvalidArgument(
                "chain", "must start with the authority certificate when it is not empty"
            )

    @cached_property
    def _leaf_template(self) -> _LeafTemplate:
        # Once per authority rather than per SVID: the certificate and key never change.
        return _LeafTemplate(
            issuer=self.certificate.subject,
            not_after=self.certificate.not_valid_after_utc,
            trust_domain=_trust_domain_of(self.certificate),
            authority_key_identifier=_encoded(_aki_for(self.certificate), critical=False),
            algorithm=_hash_for(self.key),
        )


def random_serial() -> int:
    """A fresh positive serial number of exactly ``SERIAL_BITS`` bits."""
    return secrets.randbits(SERIAL_BITS - 1) | (1 << (SERIAL_BITS - 1))


def build_root_certificate(
    key: PrivateKey,
    trust_domain: TrustDomain,
    *,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    subject_org: str = LEAF_SUBJECT_ORG,
) -> x509.Certificate:
    """A self-signed signing certificate for ``trust_domain`` (X509-SVID §3.2, §4.1, §4.3)."""
    _check_validity(not_before, not_after)
    _check_serial(serial)
    key_type_of(key)
    subject = _authority_name(subject_org, serial)
    public_key = key.public_key()
    builder = _authority_builder(
        public_key,
        trust_domain,
        subject=subject,
        issuer=subject,
        not_before=not_before,
        not_after=not_after,
        serial=serial,
        aki=x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key),
    )
    return builder.sign(key, _hash_for(key))


def build_intermediate_certificate(
    public_key: PublicKey,
    trust_domain: TrustDomain,
    *,
    upstream_certificate: x509.Certificate,
    upstream_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    subject_org: str = LEAF_SUBJECT_ORG,
) -> x509.Certificate:
    """A signing certificate for ``trust_domain`` issued by an upstream CA.

    ``not_after`` is clamped to the upstream certificate's; a certificate cannot outlive its
    issuer in any useful way.
    """
    _check_validity(not_before, not_after)
    _check_serial(serial)
    _check_public_key(public_key, "public_key")
    if not _same_public_key(upstream_certificate.public_key(), upstream_key.public_key()):
        raise InvalidArgument(
            "upstream_key", "must be the private key of the upstream certificate's public key"
        )
    _check_upstream_is_ca(upstream_certificate)
    upstream_not_after = upstream_certificate.not_valid_after_utc
    not_after = min(not_after, upstream_not_after)
    if not_after <= not_before:
        raise InvalidArgument(
            "upstream_certificate",
            f"expires at {upstream_not_after.isoformat()}, not after not_before "
            f"{not_before.isoformat()}",
        )
    builder = _authority_builder(
        public_key,
        trust_domain,
        subject=_authority_name(subject_org, serial),
        issuer=upstream_certificate.subject,
        not_before=not_before,
        not_after=not_after,
        serial=serial,
        aki=_aki_for(upstream_certificate),
    )
    return builder.sign(upstream_key, _hash_for(upstream_key))


def sign_x509_svid(
    authority: SigningAuthority,
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    *,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    dns_names: Sequence[str] = (),
) -> list[x509.Certificate]:
    """Sign an X509-SVID for ``spiffe_id``; return the leaf first, then ``authority.chain``.

    ``not_after`` is clamped to the authority's. Raises ``InvalidArgument`` for a bad request and
    ``AuthorityUnavailable`` when the authority expires before ``not_before``.
    """
    _check_validity(not_before, not_after)
    _check_serial(serial)
    leaf_key_type = _check_public_key(public_key, "public_key")
    template = authority._leaf_template
    _check_leaf_spiffe_id(spiffe_id, template.trust_domain)
    names = _check_dns_names(dns_names)
    if not_before < _EARLIEST_TIME:
        raise InvalidArgument(
            "not_before", "must be on or after 1950-01-01 (RFC 5280 §4.1.2.5)", not_before
        )

    not_after = min(not_after, template.not_after)
    if not_after <= not_before:
        raise AuthorityUnavailable(
            f"signing authority (serial 0x{authority.certificate.serial_number:x}) expires at "
            f"{template.not_after.isoformat()}, before the SVID's not_before "
            f"{not_before.isoformat()}"
        )

    subject = _LEAF_SUBJECT
    if names and len(names[0]) <= CN_MAX_LENGTH:
        subject = x509.Name([*_LEAF_SUBJECT, x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    is_rsa = leaf_key_type in (KeyType.RSA_2048, KeyType.RSA_4096)
    general_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    general_names.extend(x509.DNSName(name) for name in names)
    extensions: list[x509.Extension[x509.ExtensionType]] = [
        _LEAF_BASIC_CONSTRAINTS,
        _LEAF_KEY_USAGE_RSA if is_rsa else _LEAF_KEY_USAGE_EC,
        _LEAF_EXTENDED_KEY_USAGE,
        x509.Extension(
            ExtensionOID.SUBJECT_KEY_IDENTIFIER,
            False,
            x509.SubjectKeyIdentifier.from_public_key(public_key),
        ),
        template.authority_key_identifier,
        # X509-SVID §3.1: the SAN must be critical when the subject is empty.
        x509.Extension(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
            len(subject) == 0,
            x509.SubjectAlternativeName(general_names),
        ),
    ]
    # Every field was checked above, so the builder is made in one step rather than through its
    # one-field-at-a-time setters (which copy the builder each time); its times are naive UTC.
    builder = x509.CertificateBuilder(
        issuer_name=template.issuer,
        subject_name=subject,
        public_key=public_key,
        serial_number=serial,
        not_valid_before=_naive_utc(not_before),
        not_valid_after=_naive_utc(not_after),
        extensions=extensions,
    )
    leaf = builder.sign(authority.key, template.algorithm)
    return [leaf, *authority.chain]


def public_key_from_csr(data: bytes) -> PublicKey:
    """The public key of a PKCS#10 CSR (DER or PEM) whose self-signature verifies.

    Only the key is used; the SPIFFE ID is decided by the server, never taken from the CSR.
    """
    if len(data) > MAX_ENCODED_BYTES:
        raise InvalidArgument("csr", f"must be at most {MAX_ENCODED_BYTES} bytes", len(data))
    try:
        if data.lstrip().startswith(_PEM_MARKER):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError as err:
        raise InvalidArgument("csr", "must be a PKCS#10 request in DER or PEM") from err
    try:
        key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except (ValueError, TypeError) as err:
        raise InvalidArgument("csr", "has a public key or signature this CA cannot read") from err
    if not signature_ok:
        raise InvalidArgument("csr", "signature does not verify with its own public key")
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidArgument("csr", "public key must be ECDSA P-256/P-384 or RSA 2048/4096")
    _check_public_key(key, "csr")
    return key


def public_key_from_der(data: bytes) -> PublicKey:
    """A supported public key from a SubjectPublicKeyInfo in DER or PEM."""
    if len(data) > MAX_ENCODED_BYTES:
        raise InvalidArgument("public_key", f"must be at most {MAX_ENCODED_BYTES} bytes", len(data))
    try:
        if data.lstrip().startswith(_PEM_MARKER):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, TypeError) as err:
        raise InvalidArgument("public_key", "must be a SubjectPublicKeyInfo in DER or PEM") from err
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidArgument("public_key", "must be ECDSA P-256/P-384 or RSA 2048/4096")
    _check_public_key(key, "public_key")
    return key


# --- private helpers -------------------------------------------------------------------------


def _authority_name(org: str, serial: int) -> x509.Name:
    # The serial in the subject tells rotated authorities apart (SPIRE does the same).
    if not org:
        raise InvalidArgument("subject_org", "must not be empty")
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)),
        ]
    )


def _authority_builder(
    public_key: PublicKey,
    trust_domain: TrustDomain,
    *,
    subject: x509.Name,
    issuer: x509.Name,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    aki: x509.AuthorityKeyIdentifier,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            # X509-SVID §4.3 and appendix A: keyCertSign must, cRLSign may, and
            # digitalSignature is for leaves only.
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
        # X509-SVID §3.2: a signing certificate's SPIFFE ID has no path.
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain.as_spiffe_id())]
            ),
            critical=False,
        )
    )


def _aki_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        key = issuer.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise InvalidArgument(
                "issuer", "public key must be ECDSA or RSA", f"serial 0x{issuer.serial_number:x}"
            ) from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _naive_utc(value: datetime) -> datetime:
    # What CertificateBuilder.not_valid_before/after store: naive, in UTC.
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None)


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    # Match the hash to the curve (RFC 5480 §4): SHA-384 for P-384, SHA-512 for P-521 (an
    # upstream CA may use it); SHA-256 for P-256 and every RSA size.
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 384:
            return hashes.SHA512()
        if key.curve.key_size > 256:
            return hashes.SHA384()
    return hashes.SHA256()


def _check_public_key(key: object, field: str) -> KeyType:
    if not is_supported_public_key(key):
        raise InvalidArgument(field, "must be ECDSA P-256/P-384 or RSA 2048/4096")
    try:
        return key_type_of(cast("PublicKey", key))
    except InvalidArgument as err:
        raise InvalidArgument(field, err.rule) from err


def _same_public_key(a: object, b: object) -> bool:
    if not isinstance(a, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    if not isinstance(b, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    return a.public_numbers() == b.public_numbers()


def _check_upstream_is_ca(cert: x509.Certificate) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as err:
        raise InvalidArgument(
            "upstream_certificate", "must carry basicConstraints and keyUsage (RFC 5280 §4.2.1)"
        ) from err
    if not bc.ca or not ku.key_cert_sign:
        raise InvalidArgument(
            "upstream_certificate",
            "must be a CA certificate with keyCertSign (X509-SVID §3.2)",
            f"serial 0x{cert.serial_number:x}",
        )


def _check_validity(not_before: datetime, not_after: datetime) -> None:
    if not_before.tzinfo is None or not_before.utcoffset() is None:
        raise InvalidArgument("not_before", "must be a timezone-aware datetime")
    if not_after.tzinfo is None or not_after.utcoffset() is None:
        raise InvalidArgument("not_after", "must be a timezone-aware datetime")
    if not_after <= not_before:
        raise InvalidArgument(
            "not_after", f"must be later than not_before {not_before.isoformat()}", not_after
        )


def _check_serial(serial: int) -> None:
    if isinstance(serial, bool) or not isinstance(serial, int):
        raise InvalidArgument("serial", "must be an integer", serial)
    if serial <= 0 or serial.bit_length() > MAX_SERIAL_BITS:
        raise InvalidArgument(
            "serial",
            f"must be positive and at most {MAX_SERIAL_BITS} bits (RFC 5280 §4.1.2.2)",
            serial,
        )


def _check_leaf_spiffe_id(spiffe_id: SpiffeId, authority_td: TrustDomain | None) -> None:
    text = str(spiffe_id)
    if not spiffe_id.path:
        raise InvalidArgument("spiffe_id", "must have a non-root path (X509-SVID §3.1)", text)
    if len(text.encode()) > SPIFFE_ID_MAX_BYTES:
        raise InvalidArgument(
            "spiffe_id", f"must be at most {SPIFFE_ID_MAX_BYTES} bytes (SPIFFE-ID §2.3)", text
        )
    if authority_td is not None and authority_td != spiffe_id.trust_domain:
        raise InvalidArgument(
            "spiffe_id",
            f"must be in the authority's trust domain {authority_td} (X509-SVID §3.2)",
            text,
        )


def _trust_domain_of(cert: x509.Certificate) -> TrustDomain | None:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return None
    assert isinstance(san, x509.SubjectAlternativeName)
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            return SpiffeId(uri).trust_domain
        except PySpiffeError:
            continue
    return None


def _check_dns_names(dns_names: Sequence[str]) -> list[str]:
    if isinstance(dns_names, str):
        raise InvalidArgument("dns_names", "must be a sequence of names, not one string")
    seen: set[str] = set()
    names: list[str] = []
    for name in dns_names:
        if not isinstance(name, str) or not _DNS_NAME.fullmatch(name):
            raise InvalidArgument(
                "dns_names",
                "each name must be RFC 1123 labels of [A-Za-z0-9-] (1-63 characters, no "
                "leading or trailing '-') joined by '.', optionally after a leading '*.'",
                name,
            )
        if len(name) > DNS_NAME_MAX_LENGTH:
            raise InvalidArgument(
                "dns_names", f"each name must be at most {DNS_NAME_MAX_LENGTH} characters", name
            )
        folded = name.lower()
        if folded in seen:
            raise InvalidArgument("dns_names", "must not repeat a name", name)
        seen.add(folded)
        names.append(name)
    return names
