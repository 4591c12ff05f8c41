"""Real SVIDs and bundles for the Workload API tests, issued by our own CA code.

trustme cannot put a ``spiffe://`` URI in a SAN, so the authorities, X509-SVIDs, JWT-SVIDs and
bundles come from ``ca.keys``, ``ca.x509svid``, ``ca.jwtsvid`` and ``ca.bundle``, exactly as the
server issues them. Times are real (now-based): py-spiffe's client sees valid SVIDs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain

from ca.bundle import TrustBundle, jwt_jwks, x509_authorities_der
from ca.jwtsvid import new_kid, sign_jwt_svid
from ca.keys import KeyType, PrivateKey, generate_key
from ca.x509svid import SigningAuthority, build_root_certificate, random_serial, sign_x509_svid
from workload_api.provider import Snapshot, X509Identity
from workload_api.static import JwtSigner

TD = "example.org"
PARTNER = "partner.org"
OTHER = "other.org"
WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"
ADMIN = "spiffe://example.org/admin"
SVID_TTL = timedelta(hours=1)
JWT_TTL = timedelta(minutes=5)


@dataclass(frozen=True)
class Authority:
    """One trust domain's X.509 and JWT signing keys and its bundle."""

    trust_domain: str
    signing: SigningAuthority
    jwt_key: PrivateKey
    kid: str
    bundle: TrustBundle

    @property
    def x509_der(self) -> bytes:
        return x509_authorities_der(self.bundle)

    @property
    def jwks(self) -> bytes:
        return jwt_jwks(self.bundle)


@functools.cache
def authority(trust_domain: str = TD) -> Authority:
    now = datetime.now(UTC)
    key = generate_key(KeyType.EC_P256)
    cert = build_root_certificate(
        key,
        TrustDomain(trust_domain),
        not_before=now - timedelta(minutes=5),
        not_after=now + timedelta(days=1),
        serial=random_serial(),
    )
    jwt_key = generate_key(KeyType.EC_P256)
    kid = new_kid()
    bundle = TrustBundle(
        trust_domain=TrustDomain(trust_domain),
        x509_authorities=(cert,),
        jwt_authorities={kid: jwt_key.public_key()},
        sequence=1,
        refresh_hint=timedelta(minutes=5),
    )
    return Authority(trust_domain, SigningAuthority(cert, key, ()), jwt_key, kid, bundle)


def identity(
    spiffe_id: str,
    selectors: Iterable[str],
    *,
    entry_id: str | None = None,
    hint: str = "",
    federates_with: Sequence[str] = (),
) -> X509Identity:
    """An X509Identity holding a fresh, real X509-SVID for ``spiffe_id``."""
    issuer = authority(SpiffeId(spiffe_id).trust_domain.name)
    key = generate_key(KeyType.EC_P256)
    now = datetime.now(UTC)
    chain = sign_x509_svid(
        issuer.signing,
        key.public_key(),
        SpiffeId(spiffe_id),
        not_before=now - timedelta(minutes=1),
        not_after=now + SVID_TTL,
        serial=random_serial(),
    )
    return X509Identity(
        entry_id=entry_id or spiffe_id.rsplit("/", 1)[-1],
        spiffe_id=spiffe_id,
        selectors=frozenset(selectors),
        cert_chain=tuple(cert.public_bytes(serialization.Encoding.DER) for cert in chain),
        private_key=key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        hint=hint,
        federates_with=tuple(federates_with),
    )


def snapshot(
    identities: Sequence[X509Identity] = (),
    *,
    ready: bool = True,
    version: int = 1,
    trust_domains: Sequence[str] = (TD, PARTNER, OTHER),
) -> Snapshot:
    """Our trust domain's snapshot with the bundles of ``trust_domains`` (ours first)."""
    authorities = [authority(name) for name in trust_domains]
    return Snapshot(
        version=version,
        ready=ready,
        trust_domain=TD,
        identities=tuple(identities),
        x509_bundles={a.trust_domain: a.x509_der for a in authorities},
        jwt_bundles={a.trust_domain: a.jwks for a in authorities},
    )


def jwt_signer() -> JwtSigner:
    """Mint JWT-SVIDs as the CA does, with the authority of the identity's trust domain."""

    def sign(identity: X509Identity, audience: Sequence[str]) -> str:
        spiffe_id = SpiffeId(identity.spiffe_id)
        issuer = authority(spiffe_id.trust_domain.name)
        now = datetime.now(UTC)
        return sign_jwt_svid(
            issuer.jwt_key,
            issuer.kid,
            spiffe_id,
            audience,
            issued_at=now,
            expires_at=now + JWT_TTL,
        )

    return sign
