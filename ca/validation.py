"""Spec conformance and path checks for X509-SVIDs: the CA validates its own output.

Owns the checks of the X509-SVID standard (every MUST for the leaf and its signing certificates)
and a small chain verifier (signatures, validity at a given time, anchoring in given roots). The
server runs both on every chain it signs before the chain leaves the CA (SPIRE does the same),
and they serve to check chains received from elsewhere.

Rules of this module:
- Pure: no I/O, no clock reads; ``now`` is a parameter.
- Every failure is ``InvalidSvid`` whose message names the certificate (position and serial),
  what is wrong and the spec section broken, e.g.
  ``leaf certificate has cA=true (serial 0x1f); X509-SVID §4.1 forbids it``.
- This is not a general RFC 5280 path builder: the chain is taken in the order given.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TypeVar, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from .errors import InvalidArgument, InvalidSvid

__all__ = [
    "parse_spiffe_id",
    "validate_signing_certificate",
    "validate_x509_svid",
    "verify_chain",
]

SPIFFE_ID_CACHE_SIZE = 4096  # parsed SVID IDs kept: a CA's working set, at most ~8 MiB of text

_SPIFFE_SCHEME = "spiffe:"
_E = TypeVar("_E", bound=x509.ExtensionType)
_Extensions = dict[x509.ObjectIdentifier, x509.Extension[x509.ExtensionType]]
ISSUER_CACHE = 64  # authority certificates whose facts are kept (a few per replica at a time)
_LEAF = "leaf certificate"
_SIGNING = "signing certificate"


def parse_spiffe_id(text: str, *, what: str) -> SpiffeId:
    """Parse ``text`` as a SPIFFE ID in canonical form, or raise ``InvalidSvid`` about ``what``.

    py-spiffe accepts an upper-case scheme or trust domain and lower-cases it; an SVID must carry
    the canonical form (SPIFFE-ID §2.1: trust domain names are lower case).
    """
    try:
        spiffe_id = SpiffeId(text)
    except PySpiffeError as err:
        raise InvalidSvid(f"{what} {text!r} is not a SPIFFE ID: {err}; SPIFFE-ID §2") from err
    if str(spiffe_id) != text:
        raise InvalidSvid(
            f"{what} {text!r} is not in canonical form (expected {str(spiffe_id)!r}); "
            "SPIFFE-ID §2.1 requires a lower-case scheme and trust domain"
        )
    return spiffe_id


def validate_x509_svid(
    chain: Sequence[x509.Certificate], *, trust_domain: TrustDomain | None = None
) -> SpiffeId:
    """Check the leaf and signing certificates of ``chain`` (leaf first) against X509-SVID.

    Returns the leaf's SPIFFE ID. With ``trust_domain``, the leaf must belong to it. Signatures
    and validity times are ``verify_chain``'s job.
    """
    if not chain:
        raise InvalidSvid("the chain is empty; X509-SVID §5.1 needs at least the leaf")
    leaf = chain[0]
    spiffe_id = _check_leaf(leaf)
    if trust_domain is not None and spiffe_id.trust_domain != trust_domain:
        raise InvalidSvid(
            f"{_LEAF} SPIFFE ID {spiffe_id} is not in trust domain {trust_domain} "
            f"({_serial(leaf)}); SPIFFE bundle §3 binds each SVID to its own trust domain"
        )
    for index, cert in enumerate(chain[1:], start=1):
        _check_signing(cert, spiffe_id.trust_domain, f"{_SIGNING} #{index}")
    return spiffe_id


def _check_link(
    leaf: x509.Certificate, extensions: _Extensions, issuer: x509.Certificate, issuer_der: bytes
) -> None:
    """Structural link from ``leaf`` to the authority that just signed it: issuer name (as DER)
    and key identifier match, and the leaf's validity nests inside the issuer's. The signature
    is right by construction, because ``SigningAuthority`` refuses a key that does not match
    its certificate; ``verify_chain`` is the full path check for certificates from elsewhere."""
    facts = _issuer_facts(issuer)
    if issuer_der != facts.subject_der:
        raise InvalidSvid(
            f"{_LEAF} ({_serial(leaf)}) names issuer {leaf.issuer.rfc4514_string()!r}, not the "
            f"signing authority {issuer.subject.rfc4514_string()!r}; X509-SVID §5.1 requires a "
            "valid path"
        )
    aki = _extension(extensions, x509.AuthorityKeyIdentifier)
    if aki is not None and facts.ski is not None and aki.value.key_identifier != facts.ski:
        raise InvalidSvid(
            f"{_LEAF} ({_serial(leaf)}) authorityKeyIdentifier does not match the signing "
            "authority's subjectKeyIdentifier; RFC 5280 §4.2.1.1"
        )
    if leaf.not_valid_after_utc > facts.not_after or leaf.not_valid_before_utc < facts.not_before:
        raise InvalidSvid(
            f"{_LEAF} ({_serial(leaf)}) is valid outside its signing authority's lifetime; an SVID "
            "must not outlive the authority that signed it"
        )


_EMPTY_NAME_DER = b"\x30\x00"  # an empty RDNSequence


def _der_item(data: bytes, pos: int) -> tuple[int, int]:
    """Where the content of the DER item at ``pos`` starts and where the item ends (X.690 §10.1:
    definite lengths, short or long form)."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or pos + count > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated")
    return pos, pos + length


def _tbs_names(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """The DER of ``cert``'s issuer and subject as encoded in its TBSCertificate (RFC 5280 §4.1:
    version, serialNumber, signature, issuer, validity, subject).

    The CA's self-check compares these bytes instead of building ``x509.Name`` objects (a third
    of its cost per SVID): equal bytes are a stricter match than equal names.
    """
    tbs = cert.tbs_certificate_bytes
    try:
        pos = _der_item(tbs, 0)[0]  # into the TBSCertificate SEQUENCE
        if tbs[pos] == 0xA0:  # [0] EXPLICIT version
            pos = _der_item(tbs, pos)[1]
        pos = _der_item(tbs, pos)[1]  # serialNumber
        pos = _der_item(tbs, pos)[1]  # signature AlgorithmIdentifier
        issuer_end = _der_item(tbs, pos)[1]
        subject_start = _der_item(tbs, issuer_end)[1]  # after validity
        subject_end = _der_item(tbs, subject_start)[1]
    except (ValueError, IndexError) as err:
        raise InvalidSvid(f"certificate ({_serial(cert)}) has a malformed TBSCertificate") from err
    return tbs[pos:issuer_end], tbs[subject_start:subject_end]


def check_signed_x509_svid(
    leaf: x509.Certificate, *, spiffe_id: SpiffeId, issuer: x509.Certificate
) -> None:
    """The CA's check of an X509-SVID it has just signed, before the SVID leaves.

    Every X509-SVID rule for a leaf (§2, §3.1, §4.1, §4.3, §4.4) and its link to the signing
    authority (``_check_link``), in one pass over the leaf's extensions. The one URI SAN must be
    exactly ``spiffe_id``, the ID the request asked for, which the CA validated as a SPIFFE ID
    (canonical, non-root, in our trust domain) before signing: an exact match is stricter than
    re-parsing it. The authority's own certificates are checked when the authority is loaded
    (``validate_signing_certificate``), not once per SVID.
    """
    extensions = _extensions(leaf)
    uris, san = _uri_sans(extensions)
    expected = str(spiffe_id)
    if uris != [expected]:
        raise InvalidSvid(
            f"{_LEAF} ({_serial(leaf)}) carries URI SANs {uris}, not exactly the requested "
            f"{expected!r}; X509-SVID §2 requires exactly one SPIFFE ID"
        )
    issuer_der, subject_der = _tbs_names(leaf)
    if san is not None and not san.critical and subject_der == _EMPTY_NAME_DER:
        raise InvalidSvid(
            f"{_LEAF} has an empty subject and a non-critical SAN ({_serial(leaf)}); "
            "X509-SVID §3.1 requires the SAN to be critical then"
        )
    _check_leaf_usage(leaf, extensions)
    _check_link(leaf, extensions, issuer, issuer_der)


@dataclass(frozen=True)
class _IssuerFacts:
    subject_der: bytes
    ski: bytes | None
    not_before: datetime
    not_after: datetime


@functools.lru_cache(maxsize=ISSUER_CACHE)
def _issuer_facts(issuer: x509.Certificate) -> _IssuerFacts:
    """What ``_check_link`` needs of an authority, read once per authority certificate."""
    ski = _extension(_extensions(issuer), x509.SubjectKeyIdentifier)
    return _IssuerFacts(
        issuer.subject.public_bytes(),
        ski.value.digest if ski is not None else None,
        issuer.not_valid_before_utc,
        issuer.not_valid_after_utc,
    )


def validate_signing_certificate(cert: x509.Certificate, trust_domain: TrustDomain) -> None:
    """Check an authority certificate against X509-SVID §3.2, §4.1 and §4.3."""
    _check_signing(cert, trust_domain, _SIGNING)


def verify_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], *, now: datetime
) -> None:
    """Verify that ``chain`` (leaf first) leads to one of ``roots`` and is valid at ``now``.

    Each certificate must be signed by the next one, and the last by one of ``roots`` (or be one
    of them). Every certificate used, the anchoring root included, must be within its validity
    at ``now``.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvalidArgument("now", "must be a timezone-aware datetime")
    if not chain:
        raise InvalidSvid("the chain is empty; X509-SVID §5.1 needs at least the leaf")
    for index, cert in enumerate(chain):
        _check_time(cert, _label(index), now)
    for index in range(len(chain) - 1):
        child, parent = chain[index], chain[index + 1]
        problem = _signature_problem(child, parent)
        if problem is not None:
            raise InvalidSvid(
                f"{_label(index)} ({_serial(child)}) is not signed by {_label(index + 1)} "
                f"({_serial(parent)}): {problem}; X509-SVID §5.1 requires a valid path"
            )

    last_index = len(chain) - 1
    last = chain[last_index]
    if any(last == root for root in roots):
        return
    expired_issuer: x509.Certificate | None = None
    for root in roots:
        if _signature_problem(last, root) is not None:
            continue
        if _time_problem(root, now) is None:
            return
        expired_issuer = root
    if expired_issuer is not None:
        raise InvalidSvid(
            f"the trusted root ({_serial(expired_issuer)}) that signed {_label(last_index)} "
            f"({_serial(last)}) {_time_problem(expired_issuer, now)}; "
            "X509-SVID §5.1 (RFC 5280 §6.1.3) requires every certificate of the path to be valid"
        )
    raise InvalidSvid(
        f"{_label(last_index)} ({_serial(last)}) is signed by an unknown authority "
        f"(issuer {last.issuer.rfc4514_string()!r}, none of the {len(roots)} trusted roots "
        "verifies it); X509-SVID §5.1 requires a path to the trust bundle"
    )


# --- private helpers -------------------------------------------------------------------------


def _label(index: int) -> str:
    return _LEAF if index == 0 else f"{_SIGNING} #{index}"


def _serial(cert: x509.Certificate) -> str:
    return f"serial 0x{cert.serial_number:x}"


def _check_time(cert: x509.Certificate, label: str, now: datetime) -> None:
    problem = _time_problem(cert, now)
    if problem is not None:
        raise InvalidSvid(
            f"{label} ({_serial(cert)}) {problem}; RFC 5280 §6.1.3 requires it valid at "
            f"{now.isoformat()}"
        )


def _time_problem(cert: x509.Certificate, now: datetime) -> str | None:
    if now < cert.not_valid_before_utc:
        return f"is not yet valid (not before {cert.not_valid_before_utc.isoformat()})"
    if now > cert.not_valid_after_utc:
        return f"expired at {cert.not_valid_after_utc.isoformat()}"
    return None


def _signature_problem(child: x509.Certificate, parent: x509.Certificate) -> str | None:
    try:
        child.verify_directly_issued_by(parent)
    except InvalidSignature:
        return "the signature does not verify"
    except (ValueError, TypeError) as err:
        return str(err) or type(err).__name__
    return None


def _extensions(cert: x509.Certificate) -> _Extensions:
    """The extensions of ``cert`` by OID, parsed and indexed once for all the checks."""
    try:
        return {ext.oid: ext for ext in cert.extensions}
    except (ValueError, x509.DuplicateExtension) as err:  # undecodable or duplicate extensions
        raise InvalidSvid(f"certificate ({_serial(cert)}) has malformed extensions: {err}") from err


def _extension(extensions: _Extensions, kind: type[_E]) -> x509.Extension[_E] | None:
    ext = extensions.get(kind.oid)
    # cryptography decodes a known OID into exactly its class; anything else (an undecoded
    # value) counts as absent, which fails the rule that needs it. ``type(...) is`` rather than
    # ``isinstance``: the ABC check costs a microsecond, five times per SVID signed.
    if ext is None or type(ext.value) is not kind:
        return None
    return cast("x509.Extension[_E]", ext)


def _uri_sans(
    extensions: _Extensions,
) -> tuple[list[str], x509.Extension[x509.SubjectAlternativeName] | None]:
    ext = _extension(extensions, x509.SubjectAlternativeName)
    if ext is None:
        return [], None
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier), ext


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    # The serial is formatted only for a message: this runs on every SVID the CA signs.
    extensions = _extensions(leaf)
    uris, san = _uri_sans(extensions)
    if not uris:
        raise InvalidSvid(
            f"{_LEAF} has no URI SAN ({_serial(leaf)}); X509-SVID §2 requires exactly one SPIFFE ID"
        )
    if len(uris) > 1:
        raise InvalidSvid(
            f"{_LEAF} has {len(uris)} URI SANs ({_serial(leaf)}); X509-SVID §2 requires exactly one"
        )
    spiffe_id = _parse_uri_san(uris[0], leaf, _LEAF)
    if not spiffe_id.path:
        raise InvalidSvid(
            f"{_LEAF} SPIFFE ID {spiffe_id} has a root path ({_serial(leaf)}); "
            "X509-SVID §3.1 requires a non-root path"
        )
    if san is not None and not san.critical and len(leaf.subject) == 0:
        raise InvalidSvid(
            f"{_LEAF} has an empty subject and a non-critical SAN ({_serial(leaf)}); "
            "X509-SVID §3.1 requires the SAN to be critical then"
        )
    _check_leaf_usage(leaf, extensions)
    return spiffe_id


def _check_leaf_usage(leaf: x509.Certificate, extensions: _Extensions) -> None:
    """X509-SVID §4.1, §4.3 and §4.4 for a leaf: basicConstraints, keyUsage, extendedKeyUsage."""
    bc = _extension(extensions, x509.BasicConstraints)
    if bc is None:
        raise InvalidSvid(
            f"{_LEAF} has no basicConstraints ({_serial(leaf)}); X509-SVID §4.1 requires cA=false"
        )
    if bc.value.ca:
        raise InvalidSvid(f"{_LEAF} has cA=true ({_serial(leaf)}); X509-SVID §4.1 forbids it")

    ku = _key_usage(leaf, extensions, _LEAF)
    if not ku.digital_signature:
        raise InvalidSvid(
            f"{_LEAF} keyUsage lacks digitalSignature ({_serial(leaf)}); X509-SVID §4.3 requires it"
        )
    if ku.key_cert_sign:
        raise InvalidSvid(
            f"{_LEAF} keyUsage has keyCertSign ({_serial(leaf)}); X509-SVID §4.3 forbids it"
        )
    if ku.crl_sign:
        raise InvalidSvid(
            f"{_LEAF} keyUsage has cRLSign ({_serial(leaf)}); X509-SVID §4.3 forbids it"
        )

    eku = _extension(extensions, x509.ExtendedKeyUsage)
    if eku is not None:
        usages = set(eku.value)
        for oid, name in (
            (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
        ):
            if oid not in usages:
                raise InvalidSvid(
                    f"{_LEAF} extendedKeyUsage lacks {name} ({_serial(leaf)}); "
                    "X509-SVID §4.4 requires serverAuth and clientAuth when present"
                )


def _parse_uri_san(uri: str, cert: x509.Certificate, label: str) -> SpiffeId:
    try:
        return _canonical_spiffe_id(uri)
    except InvalidSvid:
        pass
    # Parse again for the message: only a failure pays for naming the certificate.
    return parse_spiffe_id(uri, what=f"{label} ({_serial(cert)}) URI SAN")


@lru_cache(maxsize=SPIFFE_ID_CACHE_SIZE)
def _canonical_spiffe_id(text: str) -> SpiffeId:
    # A CA signs the same few IDs over and over; parsing is pure, so its result can be kept.
    # Failures raise and are not cached.
    return parse_spiffe_id(text, what="URI SAN")


def _key_usage(cert: x509.Certificate, extensions: _Extensions, label: str) -> x509.KeyUsage:
    ku = _extension(extensions, x509.KeyUsage)
    if ku is None:
        raise InvalidSvid(f"{label} has no keyUsage ({_serial(cert)}); X509-SVID §4.3 requires it")
    if not ku.critical:
        raise InvalidSvid(
            f"{label} keyUsage is not critical ({_serial(cert)}); X509-SVID §4.3 requires critical"
        )
    return ku.value


def _check_signing(cert: x509.Certificate, trust_domain: TrustDomain, label: str) -> None:
    serial = _serial(cert)
    extensions = _extensions(cert)
    bc = _extension(extensions, x509.BasicConstraints)
    if bc is None:
        raise InvalidSvid(
            f"{label} has no basicConstraints ({serial}); X509-SVID §4.1 requires cA=true"
        )
    if not bc.value.ca:
        raise InvalidSvid(f"{label} has cA=false ({serial}); X509-SVID §4.1 requires cA=true")

    uris, _ = _uri_sans(extensions)
    spiffe_uris = [uri for uri in uris if uri[: len(_SPIFFE_SCHEME)].lower() == _SPIFFE_SCHEME]
    if len(spiffe_uris) > 1:
        raise InvalidSvid(
            f"{label} has {len(spiffe_uris)} SPIFFE IDs ({serial}); X509-SVID §2 allows one"
        )
    is_svid = bool(spiffe_uris)
    if is_svid:
        spiffe_id = _parse_uri_san(spiffe_uris[0], cert, label)
        if spiffe_id.path:
            raise InvalidSvid(
                f"{label} SPIFFE ID {spiffe_id} has a path ({serial}); "
                "X509-SVID §3.2 forbids a path on signing certificates"
            )
        if spiffe_id.trust_domain != trust_domain:
            raise InvalidSvid(
                f"{label} SPIFFE ID {spiffe_id} is not in trust domain {trust_domain} "
                f"({serial}); X509-SVID §3.2 wants signing certificates in the trust domain "
                "of the SVIDs they issue"
            )

    if is_svid:
        ku = _key_usage(cert, extensions, label)
    else:
        # An upstream CA without a SPIFFE ID is not an SVID: §4.3's "critical" is not ours to
        # demand of it, but it must still be allowed to sign certificates.
        ku_ext = _extension(extensions, x509.KeyUsage)
        if ku_ext is None:
            raise InvalidSvid(
                f"{label} has no keyUsage ({serial}); X509-SVID §4.3 requires keyCertSign"
            )
        ku = ku_ext.value
    if not ku.key_cert_sign:
        raise InvalidSvid(
            f"{label} keyUsage lacks keyCertSign ({serial}); X509-SVID §4.3 requires it"
        )
