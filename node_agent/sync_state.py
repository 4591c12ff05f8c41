"""The agent's copy of its authorized entries, kept in step with the server's sync stream.

Pure: it applies ``SyncEntriesResponse`` updates (snapshots in chunks, then changes) and says
what changed. A snapshot replaces everything only once its last chunk arrives, so a stream cut
in the middle of a snapshot leaves the previous, consistent set in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class AgentEntry:
    """An entry as the agent needs it (a subset of the server's registration entry)."""

    id: str
    spiffe_id: str
    parent_id: str
    selectors: frozenset[str]
    x509_svid_ttl: int
    jwt_svid_ttl: int
    dns_names: tuple[str, ...]
    hint: str
    federates_with: tuple[str, ...]
    revision: int
    expires_at: int = 0  # unix seconds, 0 = never


@dataclass(frozen=True)
class BundleDoc:
    trust_domain: str
    spiffe_bundle: bytes
    sequence: int
    tainted: frozenset[bytes] = frozenset()  # key ids of authorities an operator tainted


@dataclass(frozen=True)
class SyncUpdate:
    """One message of the stream, decoded from protobuf by the client."""

    revision: int
    full: bool
    more: bool
    upserts: Sequence[AgentEntry] = ()
    deleted_ids: Sequence[str] = ()
    bundle: BundleDoc | None = None
    federated_bundles: Sequence[BundleDoc] | None = None  # None = unchanged


@dataclass(frozen=True)
class Applied:
    """What an update changed once applied (empty while a snapshot is still arriving)."""

    entries_changed: bool = False
    bundles_changed: bool = False
    complete: bool = True


@dataclass
class SyncState:
    revision: int = 0
    entries: dict[str, AgentEntry] = field(default_factory=dict)
    bundle: BundleDoc | None = None
    federated: dict[str, BundleDoc] = field(default_factory=dict)
    synced_once: bool = False
    _pending: dict[str, AgentEntry] | None = None

    def view(self) -> Mapping[str, AgentEntry]:
        return MappingProxyType(self.entries)

    def apply(self, update: SyncUpdate) -> Applied:
        bundles_changed = False
        if update.bundle is not None and update.bundle != self.bundle:
            self.bundle = update.bundle
            bundles_changed = True
        if update.federated_bundles is not None:
            federated = {b.trust_domain: b for b in update.federated_bundles}
            if federated != self.federated:
                self.federated = federated
                bundles_changed = True
        if update.full:
            if self._pending is None:
                self._pending = {}
            for entry in update.upserts:
                self._pending[entry.id] = entry
            if update.more:
                return Applied(bundles_changed=bundles_changed, complete=False)
            changed = self._pending != self.entries
            self.entries = self._pending
            self._pending = None
        else:
            self._pending = None
            changed = False
            for entry in update.upserts:
                if self.entries.get(entry.id) != entry:
                    self.entries[entry.id] = entry
                    changed = True
            for entry_id in update.deleted_ids:
                if self.entries.pop(entry_id, None) is not None:
                    changed = True
            if update.more:
                self.revision = max(self.revision, update.revision)
                return Applied(changed, bundles_changed, complete=False)
        self.revision = update.revision
        self.synced_once = True
        return Applied(changed, bundles_changed, complete=True)
