"""The agent's identity cache: entries, the SVIDs signed for them, and the bundles.

Owns the in-memory state the Workload API serves, as immutable ``Snapshot``s replaced on every
change (so a stream never sees a half-applied update), and implements ``IdentityProvider`` for
``workload_api``. Workload private keys live here, in memory only. JWT-SVIDs are fetched from the
server on demand and reused until half their lifetime has passed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from cryptography import x509
from spiffe import TrustDomain

from ca.bundle import from_spiffe_json, jwt_jwks, x509_authorities_der
from ca.errors import CaError
from workload_api.provider import JwtIdentity, Snapshot, X509Identity

from .errors import AgentError
from .sync_state import AgentEntry, BundleDoc

JwtSigner = Callable[[str, Sequence[str]], Awaitable[tuple[str, int]]]
JWT_REUSE_FRACTION = 0.5  # hand out a cached JWT-SVID only in the first half of its life
MAX_JWT_CACHE = 10_000  # (entry, audience) pairs; oldest dropped beyond this


@dataclass(frozen=True)
class HeldX509:
    entry_id: str
    entry_revision: int
    cert_chain: tuple[bytes, ...]
    private_key: bytes  # PKCS#8 DER
    not_before: float  # unix seconds
    not_after: float
    authority_key_id: bytes | None


def held_from_chain(
    entry: AgentEntry, chain: tuple[bytes, ...], private_key_der: bytes
) -> HeldX509:
    leaf = x509.load_der_x509_certificate(chain[0])
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        key_id = aki.value.key_identifier
    except x509.ExtensionNotFound:
        key_id = None
    return HeldX509(
        entry.id,
        entry.revision,
        chain,
        private_key_der,
        leaf.not_valid_before_utc.timestamp(),
        leaf.not_valid_after_utc.timestamp(),
        key_id,
    )


class IdentityCache:
    """Implements ``workload_api.provider.IdentityProvider`` over the agent's state."""

    def __init__(self, trust_domain: str, jwt_signer: JwtSigner) -> None:
        self.trust_domain = trust_domain
        self._jwt_signer = jwt_signer
        self._entries: Mapping[str, AgentEntry] = {}
        self._svids: dict[str, HeldX509] = {}
        self._bundle: BundleDoc | None = None
        self._federated: Mapping[str, BundleDoc] = {}
        self._ready = False
        self._snapshot = Snapshot(version=0, ready=False, trust_domain=trust_domain)
        self._changed = asyncio.Event()
        self._jwts: dict[tuple[str, tuple[str, ...]], tuple[str, float, float]] = {}

    # -- writes (from the agent's sync and rotation tasks) ---------------------------------
    def set_entries(self, entries: Mapping[str, AgentEntry]) -> None:
        self._entries = dict(entries)
        for gone in set(self._svids) - set(entries):
            del self._svids[gone]
        self._jwts = {k: v for k, v in self._jwts.items() if k[0] in entries}
        self._publish()

    def set_bundles(self, bundle: BundleDoc | None, federated: Mapping[str, BundleDoc]) -> None:
        self._bundle = bundle
        self._federated = dict(federated)
        self._publish()

    def put_svids(self, svids: Sequence[HeldX509]) -> None:
        for svid in svids:
            if svid.entry_id in self._entries:
                self._svids[svid.entry_id] = svid
        self._publish()

    def forget_jwts(self) -> None:
        """Drop cached JWT-SVIDs (after a taint: the next fetch is signed afresh)."""
        self._jwts.clear()

    def mark_ready(self) -> None:
        if not self._ready:
            self._ready = True
            self._publish()

    def held(self) -> Mapping[str, HeldX509]:
        return MappingProxyType(self._svids)

    def entries(self) -> Mapping[str, AgentEntry]:
        return MappingProxyType(dict(self._entries))

    def _publish(self) -> None:
        identities = []
        for entry in sorted(self._entries.values(), key=lambda e: (e.revision, e.id)):
            svid = self._svids.get(entry.id)
            if svid is None:
                continue
            identities.append(
                X509Identity(
                    entry_id=entry.id,
                    spiffe_id=entry.spiffe_id,
                    selectors=entry.selectors,
                    cert_chain=svid.cert_chain,
                    private_key=svid.private_key,
                    hint=entry.hint,
                    federates_with=entry.federates_with,
                )
            )
        x509_bundles: dict[str, bytes] = {}
        jwt_bundles: dict[str, bytes] = {}
        for doc in [self._bundle, *self._federated.values()]:
            if doc is None:
                continue
            try:
                parsed = from_spiffe_json(TrustDomain(doc.trust_domain), doc.spiffe_bundle)
            except CaError:
                continue  # the server validated it; a bad one is skipped, never half-served
            x509_bundles[doc.trust_domain] = x509_authorities_der(parsed)
            jwt_bundles[doc.trust_domain] = jwt_jwks(parsed)
        self._snapshot = Snapshot(
            version=self._snapshot.version + 1,
            ready=self._ready,
            trust_domain=self.trust_domain,
            identities=tuple(identities),
            x509_bundles=MappingProxyType(x509_bundles),
            jwt_bundles=MappingProxyType(jwt_bundles),
        )
        self._changed.set()
        self._changed = asyncio.Event()

    # -- IdentityProvider --------------------------------------------------------------------
    def current(self) -> Snapshot:
        return self._snapshot

    async def wait_changed(self, version: int) -> Snapshot:
        while self._snapshot.version == version:
            await self._changed.wait()
        return self._snapshot

    async def fetch_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> JwtIdentity:
        entry = self._entries.get(entry_id)
        if entry is None:
            raise AgentError(f"entry {entry_id} is not held by this agent")
        key = (entry_id, tuple(sorted(set(audience))))
        now = time.time()
        cached = self._jwts.get(key)
        if cached is not None:
            token, issued, expires = cached
            if now < issued + (expires - issued) * JWT_REUSE_FRACTION:
                return JwtIdentity(entry.spiffe_id, token, entry.hint)
        token, expires_at = await self._jwt_signer(entry_id, key[1])
        if len(self._jwts) >= MAX_JWT_CACHE:
            self._jwts.pop(next(iter(self._jwts)))
        self._jwts[key] = (token, now, float(expires_at))
        return JwtIdentity(entry.spiffe_id, token, entry.hint)
