"""Entry sync: what each agent's stream sends, first and then on every change.

Owns the decisions of ``SyncEntries`` (the gRPC shell only carries them):

- **First update.** A full snapshot (``full``) when the agent starts from revision 0, from a
  revision this server cannot answer incrementally (newer than the newest change, older than the
  ``entry_changes`` table keeps, older than the node's last change of selectors or aliases), or
  when an entry was *updated or deleted* since that revision: the server keeps no old versions of
  entries, so it could not tell which unchanged entries lost their authorization with it. Only
  when entries were merely created since is the first update incremental: the authorized ones of
  them. The bundle always comes with it, and the federated bundles the agent's entries federate
  with (``federated_bundles_set``).
- **Then each change.** When the entry revision moves, the changes that can touch this agent
  (an entry it has, or a new or changed entry whose parent is one of its authorized IDs or the
  server) trigger the authorization walk again; the difference from what the agent holds goes
  out: upserts (new or newer revision) and ``deleted_ids`` (deleted or no longer authorized).
  Bundle and federated-bundle changes go out when their content changes.
- **Revisions.** ``revision`` is the server's newest entry revision once an update is complete;
  continuation messages of an incremental update carry the previous one, so an agent cut off in
  the middle resumes from a revision it fully has.
- **PostgreSQL commit order.** Revisions come from a sequence, so a smaller one can commit after
  a larger one. Missing revisions below the newest are watched for ``GAP_TIMEOUT`` and picked up
  when they commit (SQLite commits writers one at a time, in revision order).
- **Cut-off.** A banned, evicted or re-attested agent's stream ends with ``Refused``.

Synchronous (datastore reads): the shell runs ``open`` and ``update`` in a worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..bundle import TrustBundle, to_spiffe_json
from ..datastore import Tx
from ..datastore.entry_graph import (
    EntryChange,
    change_at,
    changes_after,
    changes_between,
    entries_by_id,
    max_revision,
    min_revision,
    present_revisions,
)
from ..datastore.nodes import AttestedNode, get_node
from ..datastore.repository import BUNDLE_SEQUENCE
from ..entries import RegistrationEntry
from .authz import Authorization
from .errors import Refused
from .service import CallingAgent, NodeService

GAP_TIMEOUT = timedelta(seconds=30)  # longer than any entry transaction runs; then: rolled back
GAP_SCAN = 256  # revisions below the newest checked for late commits when a stream opens
GAP_LIMIT = 10_000  # missing revisions tracked at most (a burst of rolled-back writes)


@dataclass(frozen=True)
class BundleDoc:
    trust_domain: str  # the name, e.g. example.org
    document: bytes  # SPIFFE bundle JSON
    sequence: int
    tainted: tuple[bytes, ...] = ()  # key ids of tainted authorities (own trust domain only)


@dataclass(frozen=True)
class Update:
    """One logical update; ``messages`` splits it into responses."""

    revision: int
    full: bool = False
    upserts: tuple[RegistrationEntry, ...] = ()
    deleted_ids: tuple[str, ...] = ()
    bundle: BundleDoc | None = None
    federated: tuple[BundleDoc, ...] | None = None  # None: unchanged
    previous_revision: int = 0  # what continuation messages carry

    @property
    def empty(self) -> bool:
        return not (
            self.full
            or self.upserts
            or self.deleted_ids
            or self.bundle is not None
            or self.federated is not None
        )


@dataclass
class StreamState:
    """What one stream has sent; only its worker touches it."""

    agent_id: str
    attested_at: datetime
    revision: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # entry id -> revision the agent has
    parent_ids: frozenset[str] = frozenset()
    federates_with: frozenset[str] = frozenset()
    bundle_sequence: int = -1
    federated: tuple[BundleDoc, ...] | None = None
    gaps: dict[int, float] = field(default_factory=dict)  # missing revision -> give-up time


def own_bundle_doc(bundle: TrustBundle, tainted: tuple[bytes, ...] = ()) -> BundleDoc:
    return BundleDoc(bundle.trust_domain.name, to_spiffe_json(bundle), bundle.sequence, tainted)


class EntrySync:
    """Plans the updates of every ``SyncEntries`` stream of one server."""

    def __init__(self, nodes: NodeService, *, track_gaps: bool | None = None) -> None:
        self.nodes = nodes
        self.ca = nodes.ca
        self.track_gaps = (
            self.ca.store.backend == "postgresql" if track_gaps is None else track_gaps
        )

    # -- the first update ---------------------------------------------------------------------
    def open(self, caller: CallingAgent, since: int) -> tuple[StreamState, Update]:
        with self.ca.store.read() as tx:
            node = self._live_node(tx, caller.spiffe_id, caller.node.attested_at)
            newest = max_revision(tx)
            authorization = self.nodes.authorize(tx, node)
            changes = self._resume_changes(tx, node, since, newest)
            federated = self._federated(tx, authorization.federates_with())
            bundle_sequence = tx.counter(BUNDLE_SEQUENCE)
            gaps = self._initial_gaps(tx, newest)
        bundle = own_bundle_doc(self.ca.bundle(), self.ca.tainted_key_ids())
        state = StreamState(
            agent_id=node.spiffe_id,
            attested_at=node.attested_at,
            revision=newest,
            sent={e.id: e.revision for e in authorization.entries()},
            parent_ids=authorization.parent_ids,
            federates_with=authorization.federates_with(),
            bundle_sequence=max(bundle_sequence, bundle.sequence),
            federated=federated,
            gaps=gaps,
        )
        if changes is None:
            entries = tuple(sorted(authorization.entries(), key=lambda e: e.id))
            return state, Update(newest, True, entries, (), bundle, federated, newest)
        # Only creates since ``since`` (see _resume_changes): the authorized ones are new to the
        # agent, and none of its entries can have lost its authorization.
        grants = authorization.grants
        upserts = {c.entry_id: grants[c.entry_id].entry for c in changes if c.entry_id in grants}
        update = Update(
            newest, False, tuple(upserts.values()), (), bundle, federated, previous_revision=since
        )
        return state, update

    def _resume_changes(
        self, tx: Tx, node: AttestedNode, since: int, newest: int
    ) -> list[EntryChange] | None:
        """The changes to send incrementally from ``since``, or None for a full snapshot."""
        if since <= 0 or since > newest or since < node.sync_floor:
            return None
        if since < min_revision(tx) - 1:
            return None  # older than the change feed keeps
        changes = changes_after(tx, since)
        if self.track_gaps:
            # Changes with smaller revisions may have committed after the agent's last update.
            last = change_at(tx, since)
            if last is None:
                return None
            changes = changes_between(tx, since - GAP_LIMIT, since, since=last.at - GAP_TIMEOUT) + [
                c for c in changes if c.revision > since
            ]
        if any(c.op != "create" for c in changes):
            return None
        return changes

    def _initial_gaps(self, tx: Tx, newest: int) -> dict[int, float]:
        if not self.track_gaps or newest <= 1:
            return {}
        wanted = list(range(max(1, newest - GAP_SCAN), newest))
        present = present_revisions(tx, wanted)
        deadline = time.monotonic() + GAP_TIMEOUT.total_seconds()
        return {r: deadline for r in wanted if r not in present}

    # -- later updates ------------------------------------------------------------------------
    def update(self, state: StreamState) -> Update:
        """What changed since the last update (``empty`` when nothing the agent sees did)."""
        with self.ca.store.read() as tx:
            node = self._live_node(tx, state.agent_id, state.attested_at)
            newest = max(max_revision(tx), state.revision)
            changes: list[EntryChange] = []
            if newest > state.revision or state.gaps:
                changes = changes_after(tx, state.revision, also=tuple(state.gaps))
            self._track_gaps(state, changes, newest)
            authorization: Authorization | None = None
            if changes and self._relevant(tx, state, changes):
                authorization = self.nodes.authorize(tx, node)
            federates = authorization.federates_with() if authorization else state.federates_with
            federated = self._federated(tx, federates)
            bundle_sequence = tx.counter(BUNDLE_SEQUENCE)
        previous = state.revision
        state.revision = newest
        upserts: tuple[RegistrationEntry, ...] = ()
        deleted: tuple[str, ...] = ()
        if authorization is not None:
            current = {e.id: e for e in authorization.entries()}
            upserts = tuple(
                e for i, e in sorted(current.items()) if state.sent.get(i) != e.revision
            )
            deleted = tuple(sorted(i for i in state.sent if i not in current))
            state.sent = {i: e.revision for i, e in current.items()}
            state.parent_ids = authorization.parent_ids
            state.federates_with = federates
        bundle = None
        if bundle_sequence != state.bundle_sequence:
            own = self.ca.bundle()
            bundle = own_bundle_doc(own, self.ca.tainted_key_ids())
            state.bundle_sequence = max(bundle_sequence, own.sequence)
        federated_changed = None
        if federated != state.federated:
            state.federated = federated_changed = federated
        return Update(newest, False, upserts, deleted, bundle, federated_changed, previous)

    def _relevant(self, tx: Tx, state: StreamState, changes: list[EntryChange]) -> bool:
        if any(c.entry_id in state.sent for c in changes):
            return True
        live = entries_by_id(tx, {c.entry_id for c in changes if c.op != "delete"})
        server_id = self.nodes.server_id
        return any(
            str(e.parent_id) in state.parent_ids or str(e.parent_id) == server_id
            for e in live.values()
        )

    def _track_gaps(self, state: StreamState, changes: list[EntryChange], newest: int) -> None:
        if not self.track_gaps:
            return
        now = time.monotonic()
        seen = {c.revision for c in changes}
        for revision in seen:
            state.gaps.pop(revision, None)
        top = max(seen, default=state.revision)
        deadline = now + GAP_TIMEOUT.total_seconds()
        for revision in range(state.revision + 1, min(top, newest)):
            if revision not in seen and len(state.gaps) < GAP_LIMIT:
                state.gaps.setdefault(revision, deadline)
        for revision, give_up in list(state.gaps.items()):
            if give_up <= now:
                del state.gaps[revision]

    # -- shared -------------------------------------------------------------------------------
    @staticmethod
    def _live_node(tx: Tx, agent_id: str, attested_at: datetime) -> AttestedNode:
        """The stream's node, still attested as when the stream opened (renewals keep it)."""
        node = get_node(tx, agent_id)
        if node is None:
            raise Refused("agent is not attested", f"{agent_id} was evicted")
        if node.banned:
            raise Refused("agent is banned", f"{agent_id} is banned")
        if node.attested_at != attested_at:
            raise Refused("agent re-attested", f"{agent_id} attested again")
        return node

    @staticmethod
    def _federated(tx: Tx, trust_domains: frozenset[str]) -> tuple[BundleDoc, ...]:
        if not trust_domains:
            return ()
        return tuple(
            BundleDoc(r.trust_domain, r.jwks.encode(), r.sequence)
            for r in tx.list_federated_bundles()
            if r.trust_domain in trust_domains
        )
