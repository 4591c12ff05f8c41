"""The seam between the Workload API and whatever holds the identities (the node agent).

Defined here, by the consumer, and kept small: a snapshot getter, a change wait, and JWT-SVID
signing on demand. The Workload API never learns how SVIDs are obtained; it matches the
caller's selectors against the snapshot and composes responses from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol


@dataclass(frozen=True)
class X509Identity:
    """One registration entry's current X509-SVID, as the agent holds it."""

    entry_id: str
    spiffe_id: str
    selectors: frozenset[str]  # "type:value"; matches a workload holding all of them
    cert_chain: tuple[bytes, ...]  # DER, leaf first
    private_key: bytes  # PKCS#8 DER, unencrypted; never logged
    hint: str = ""
    federates_with: tuple[str, ...] = ()  # trust domain names whose bundles go along


@dataclass(frozen=True)
class JwtIdentity:
    spiffe_id: str
    token: str
    hint: str = ""


def _empty() -> Mapping[str, bytes]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """Everything the Workload API serves, at one version. Immutable; replaced on change."""

    version: int
    ready: bool  # False until the agent has synced once: callers then get Unavailable
    trust_domain: str  # our trust domain name
    identities: tuple[X509Identity, ...] = ()  # in the order entries were created
    x509_bundles: Mapping[str, bytes] = field(default_factory=_empty)  # td -> DER certs
    jwt_bundles: Mapping[str, bytes] = field(default_factory=_empty)  # td -> JWKS JSON


class IdentityProvider(Protocol):
    """What the Workload API needs from the agent."""

    def current(self) -> Snapshot:
        """The latest snapshot, without waiting."""
        ...

    async def wait_changed(self, version: int) -> Snapshot:
        """Return the first snapshot whose version differs from ``version``."""
        ...

    async def fetch_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> JwtIdentity:
        """A JWT-SVID for the entry (the agent may serve it from a cache).

        Raise ``workload_api.errors.IdentityUnavailable`` when it cannot be had right now (server
        unreachable, entry just removed): the caller then gets ``Unavailable`` and retries.
        """
        ...
