"""SPIFFE authentication of a TLS peer: a pure function over its chain, the bundles and a time.

Owns the decision whether a peer certificate chain is a valid X509-SVID of a trust domain we
trust, and which SPIFFE ID it proves. Rules (X509-SVID §4, §5; SPIFFE bundle §3):

1. the leaf carries exactly one URI SAN, a SPIFFE ID, and is an X509-SVID leaf
   (``ca.validation.validate_x509_svid``: not a CA, digitalSignature, no keyCertSign...);
2. the chain verifies against the bundle of the *peer's own* trust domain, and only that one:
   a leaf of ``b.org`` signed by ``a.org``'s root is refused even though we trust ``a.org``
   (``ca.validation.verify_chain``; every certificate valid at ``now``);
3. when ``expect_ids`` is given (outbound), the ID is one of them.

Failures raise ``PeerRejected`` with a ``RejectReason`` for counters and a detail for the log.
It must not do I/O or read the clock: ``now`` is a parameter.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from spiffe import SpiffeId

from ca.errors import InvalidSvid
from ca.validation import validate_x509_svid, verify_chain

from .errors import PeerRejected, RejectReason

Bundles = Mapping[str, Sequence[x509.Certificate]]
"""X.509 authorities per trust domain name (``example.org``), ours and federated ones."""


def verify_peer(
    chain_der: Sequence[bytes],
    bundles: Bundles,
    *,
    now: datetime,
    expect_ids: Collection[str] | None = None,
) -> SpiffeId:
    """The SPIFFE ID ``chain_der`` (leaf first) proves, or ``PeerRejected`` saying why not."""
    if not chain_der:
        raise PeerRejected(RejectReason.NO_CLIENT_CERTIFICATE, "the peer sent no certificate")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as err:
        raise PeerRejected(RejectReason.NOT_AN_SVID, f"unparsable certificate: {err}") from err
    try:
        spiffe_id = validate_x509_svid(chain)
    except InvalidSvid as err:
        raise PeerRejected(RejectReason.NOT_AN_SVID, str(err)) from err
    trust_domain = spiffe_id.trust_domain.name
    roots = bundles.get(trust_domain)
    if not roots:
        raise PeerRejected(
            RejectReason.WRONG_TRUST_DOMAIN,
            f"peer {spiffe_id} belongs to trust domain {trust_domain!r}, for which we hold no "
            f"bundle (trusted: {sorted(bundles)})",
        )
    # The chain the peer sent may end with its root; verify_chain anchors on either form.
    try:
        verify_chain(_without_roots(chain, roots), roots, now=now)
    except InvalidSvid as err:
        text = str(err)
        if "expired at" in text or "not yet valid" in text:
            raise PeerRejected(RejectReason.EXPIRED, f"peer {spiffe_id}: {text}") from err
        signer = _signing_trust_domain(chain[-1], bundles, exclude=trust_domain)
        if signer is not None:
            raise PeerRejected(
                RejectReason.WRONG_TRUST_DOMAIN,
                f"peer {spiffe_id} is signed by an authority of trust domain {signer!r}, not of "
                f"its own {trust_domain!r}; SPIFFE bundle §3 binds each SVID to its own bundle",
            ) from err
        raise PeerRejected(RejectReason.UNKNOWN_CA, f"peer {spiffe_id}: {text}") from err
    if expect_ids is not None and str(spiffe_id) not in expect_ids:
        raise PeerRejected(
            RejectReason.UNEXPECTED_ID,
            f"peer presented {spiffe_id}, expected one of {sorted(expect_ids)}",
        )
    return spiffe_id


def _without_roots(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """The chain up to (not including) the first certificate that is itself a trusted root."""
    out: list[x509.Certificate] = []
    for cert in chain:
        if out and cert in roots:
            break
        out.append(cert)
    return out


def _signing_trust_domain(cert: x509.Certificate, bundles: Bundles, *, exclude: str) -> str | None:
    """The other trust domain whose bundle signed ``cert``, for a precise rejection reason."""
    for name, roots in bundles.items():
        if name == exclude:
            continue
        for root in roots:
            try:
                cert.verify_directly_issued_by(root)
            except (InvalidSignature, ValueError, TypeError):
                continue
            return name
    return None
