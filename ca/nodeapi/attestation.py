"""Node attestation: what proves an agent's node, and which agent ID and selectors it yields.

Owns the two attestors' rules. Pure: values in, values out (the caller redeems join tokens in the
datastore and carries the x509pop challenge over the stream).

- ``join_token``: the payload is the token text; the agent is
  ``spiffe://TD/meshid/agent/join_token/<token id>``, with no node selectors.
- ``x509pop``: the payload is the node certificate chain in PEM, leaf first. It must verify (RFC
  5280 path validation, by cryptography's verifier) to one of the configured provisioning CAs; the
  node then proves possession of the leaf's private key by signing a 32-byte server challenge:
  ECDSA with SHA-256 (DER signature) for EC keys, RSA-PSS with SHA-256 and MGF1-SHA-256 for RSA
  keys (any salt length is accepted; use 32, the digest length). The agent is
  ``spiffe://TD/meshid/agent/x509pop/<SHA-1 hex of the leaf DER>`` (SPIRE's fingerprint rule), and
  its node selectors are ``x509pop:subject:cn:<CN>``, ``x509pop:ca:fingerprint:<SHA-1 hex>`` of
  every CA certificate of the verified path, and ``x509pop:san:dns:<name>`` for each DNS SAN.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from spiffe import SpiffeId, TrustDomain

from ..entries import Selector
from ..errors import InvalidArgument
from .errors import Refused

JOIN_TOKEN = "join_token"  # noqa: S105 - an attestation type, not a secret
X509POP = "x509pop"
ATTESTATION_TYPES = (JOIN_TOKEN, X509POP)
AGENT_PATH = "/meshid/agent"
CHALLENGE_BYTES = 32  # as much entropy as the SHA-256 digest the node signs
MAX_PAYLOAD_BYTES = 64 * 1024  # a chain of a few certificates; larger is abuse
MAX_TOKEN_BYTES = 256  # our tokens are 43 characters
MAX_NODE_CHAIN = 8  # leaf plus intermediates an agent may send
MAX_SIGNATURE_BYTES = 1024  # RSA-4096 signatures are 512 bytes
MAX_PATH_DEPTH = 8  # intermediates allowed between the node certificate and a provisioning CA

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


def agent_id(trust_domain: TrustDomain, attestation_type: str, name: str) -> SpiffeId:
    return SpiffeId(f"{trust_domain.as_spiffe_id()}{AGENT_PATH}/{attestation_type}/{name}")


def is_agent_id(spiffe_id: SpiffeId, trust_domain: TrustDomain) -> bool:
    return spiffe_id.trust_domain == trust_domain and spiffe_id.path.startswith(f"{AGENT_PATH}/")


def token_text(payload: bytes) -> str:
    if not payload or len(payload) > MAX_TOKEN_BYTES:
        raise InvalidArgument(
            "params.payload", f"must be a join token of 1..{MAX_TOKEN_BYTES} bytes"
        )
    try:
        return payload.decode("ascii").strip()
    except UnicodeDecodeError as err:
        raise InvalidArgument("params.payload", "a join token is ASCII text") from err


# -- x509pop ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeCertificate:
    """A node certificate whose path to a provisioning CA verified."""

    leaf: x509.Certificate
    path: tuple[x509.Certificate, ...]  # leaf first, provisioning CA last

    @property
    def fingerprint(self) -> str:
        return _sha1(self.leaf)

    def selectors(self) -> tuple[str, ...]:
        """The node selectors (invalid ones, such as a CN with control characters, dropped)."""
        values = [
            f"x509pop:subject:cn:{a.value!s}"
            for a in self.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
        values += [f"x509pop:ca:fingerprint:{_sha1(ca)}" for ca in self.path[1:]]
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            pass
        else:
            values += [f"x509pop:san:dns:{n}" for n in san.value.get_values_for_type(x509.DNSName)]
        return tuple(dict.fromkeys(v for v in values if _valid_selector(v)))


def _valid_selector(text: str) -> bool:
    try:
        Selector.parse(text)
    except InvalidArgument:
        return False
    return True


def _sha1(cert: x509.Certificate) -> str:
    # SHA-1 is SPIRE's fingerprint here: an identifier of a certificate already verified, not a
    # security decision.
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()  # noqa: S324


def load_provisioning_cas(data: bytes, source: str) -> tuple[x509.Certificate, ...]:
    """The x509pop trust anchors from a PEM file's content."""
    try:
        cas = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as err:
        raise InvalidArgument(
            "x509pop_ca_bundle", f"{source} must hold PEM CA certificates: {err}"
        ) from err
    return cas


def parse_node_chain(payload: bytes) -> list[x509.Certificate]:
    if not payload or len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(
            "params.payload", f"must be a PEM certificate chain of 1..{MAX_PAYLOAD_BYTES} bytes"
        )
    if _PEM_CERT not in payload:
        raise InvalidArgument("params.payload", "must be PEM certificates, node certificate first")
    try:
        chain = x509.load_pem_x509_certificates(payload)
    except ValueError as err:
        raise InvalidArgument("params.payload", f"is not a PEM certificate chain: {err}") from err
    if len(chain) > MAX_NODE_CHAIN:
        raise InvalidArgument("params.payload", f"at most {MAX_NODE_CHAIN} certificates")
    key = chain[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidArgument("params.payload", "the node certificate's key must be ECDSA or RSA")
    return chain


def verify_node_chain(
    chain: list[x509.Certificate], cas: tuple[x509.Certificate, ...], now: datetime
) -> NodeCertificate:
    """RFC 5280 path validation of the node certificate to a provisioning CA."""
    if not cas:
        raise Refused("x509pop attestation is not enabled", "no x509pop_ca_bundle is configured")
    leaf, intermediates = chain[0], chain[1:]
    _check_node_leaf(leaf)
    verifier = (
        PolicyBuilder()
        .store(Store(list(cas)))
        .time(now)
        .max_chain_depth(MAX_PATH_DEPTH)
        # Node certificates come from many provisioning systems: the leaf need not follow the
        # Web PKI profile (a CN and no SAN is common); its own rules are checked above. CAs must.
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except VerificationError as err:
        raise Refused(
            "node certificate not trusted",
            f"x509pop: node certificate {leaf.subject.rfc4514_string()!r} (serial "
            f"{leaf.serial_number:#x}) does not verify to a provisioning CA: {err}",
        ) from err
    return NodeCertificate(leaf, tuple(verified.chain))


def _check_node_leaf(leaf: x509.Certificate) -> None:
    where = f"x509pop: node certificate {leaf.subject.rfc4514_string()!r}"
    try:
        basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is not None and basic.ca:
        raise Refused("node certificate not trusted", f"{where} is a CA certificate")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.digital_signature:
        raise Refused("node certificate not trusted", f"{where} may not sign (keyUsage)")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    allowed = {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    if eku is not None and not allowed & set(eku):
        raise Refused("node certificate not trusted", f"{where} is not for client authentication")


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_BYTES)


def verify_challenge_response(node: NodeCertificate, challenge: bytes, signature: bytes) -> None:
    """The node's signature over the challenge with the leaf certificate's key."""
    if not signature or len(signature) > MAX_SIGNATURE_BYTES:
        raise Refused("challenge response does not verify", "x509pop: empty or oversized response")
    key = node.leaf.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, challenge, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            key.verify(signature, challenge, pss, hashes.SHA256())
        else:  # parse_node_chain refused other key types
            raise Refused("challenge response does not verify", "x509pop: unsupported key type")
    except InvalidSignature as err:
        raise Refused(
            "challenge response does not verify",
            f"x509pop: the signature over the challenge does not verify with the key of node "
            f"certificate {node.fingerprint}",
        ) from err
