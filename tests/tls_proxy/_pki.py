"""Real SVIDs and bundles for the proxy tests, issued by our own CA code, and PEM files of them.

trustme cannot put a ``spiffe://`` URI in a SAN, so authorities and X509-SVIDs come from
``ca.keys`` and ``ca.x509svid``. ``forge_leaf`` builds the malformed or mis-signed leaves our
CA refuses to issue (two URI SANs, a leaf of one trust domain signed by another's root).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from spiffe import SpiffeId, TrustDomain

from ca.keys import KeyType, PrivateKey, generate_key
from ca.x509svid import SigningAuthority, build_root_certificate, random_serial, sign_x509_svid

TD = "example.org"
WEB = "spiffe://example.org/web"
CLIENT = "spiffe://example.org/client"
SVID_TTL = timedelta(hours=1)


@dataclass(frozen=True)
class Authority:
    trust_domain: str
    cert: x509.Certificate
    key: PrivateKey

    @property
    def signing(self) -> SigningAuthority:
        return SigningAuthority(self.cert, self.key, ())

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Svid:
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def chain_der(self) -> list[bytes]:
        return [c.public_bytes(serialization.Encoding.DER) for c in self.chain]

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def new_authority(trust_domain: str = TD) -> Authority:
    now = datetime.now(UTC)
    key = generate_key(KeyType.EC_P256)
    cert = build_root_certificate(
        key,
        TrustDomain(trust_domain),
        not_before=now - timedelta(minutes=5),
        not_after=now + timedelta(days=1),
        serial=random_serial(),
    )
    return Authority(trust_domain, cert, key)


def mint(
    authority: Authority,
    spiffe_id: str,
    *,
    not_before: datetime | None = None,
    ttl: timedelta = SVID_TTL,
) -> Svid:
    key = generate_key(KeyType.EC_P256)
    start = not_before or datetime.now(UTC) - timedelta(minutes=1)
    chain = sign_x509_svid(
        authority.signing,
        key.public_key(),
        SpiffeId(spiffe_id),
        not_before=start,
        not_after=start + ttl,
        serial=random_serial(),
    )
    return Svid(spiffe_id, tuple(chain), key)


def forge_leaf(
    issuer: Authority,
    uris: list[str],
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Svid:
    """A leaf our CA would refuse: any URIs, any issuer."""
    key = generate_key(KeyType.EC_P256)
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forged")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(not_before or now - timedelta(minutes=1))
        .not_valid_after(not_after or now + SVID_TTL)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return Svid(uris[0] if uris else "", (cert,), key)


def write_identity(folder: Path, svid: Svid, *authorities: Authority) -> dict[str, str]:
    """Write svid.pem, svid.key and bundle.pem (atomically replaced); the identity config."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "cert": (folder / "svid.pem", svid.chain_pem()),
        "key": (folder / "svid.key", svid.key_pem()),
        "bundle": (folder / "bundle.pem", b"".join(a.pem() for a in authorities)),
    }
    for path, data in files.values():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return {name: str(path) for name, (path, _) in files.items()}
