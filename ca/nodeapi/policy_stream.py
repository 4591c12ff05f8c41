"""Policy streaming: which stored policies each proxy receives, and when a new set goes out.

Owns the decisions of ``WatchPolicies`` (the gRPC shell in ``server`` only carries them):

- **Selection.** A caller (any X509-SVID of our trust domain, verified by the shell) receives the
  stored policies whose ``spec.selector.spiffe_ids`` contains its SPIFFE ID, or that have no
  selector (they apply to every workload). A stored document that no longer parses (written by
  another version) goes to every caller unchanged: its selector cannot be trusted, and dropping
  a DENY policy silently would open doors; the proxy refuses the set and keeps its last good one.
- **Sets, not diffs.** Every message is the complete set selecting the caller, sorted by name,
  with the policies revision it is current at; a change to policies that do not select the
  caller sends nothing (``PolicyStream.next``).
- **One parse per revision.** Every stream of a server reads through ``PolicyFeed``, which
  parses the stored set once per policies revision.

Synchronous (datastore reads): the shell runs ``PolicyStream`` calls in worker threads. It must
not evaluate policies or know about sockets.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from authz import PolicyError, parse_policy_dict

from ..datastore import policies as store
from ..service import CaService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedPolicy:
    """One stored policy as it goes on the wire, with its selector (``None``: all workloads)."""

    name: str
    document_json: bytes
    selector: frozenset[str] | None
    parsed: bool = True

    def selects(self, spiffe_id: str) -> bool:
        return not self.parsed or self.selector is None or spiffe_id in self.selector


@dataclass(frozen=True)
class PolicySet:
    """The policies selecting one caller at one policies revision."""

    revision: int
    policies: tuple[FeedPolicy, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.policies)

    def same_policies(self, other: PolicySet | None) -> bool:
        if other is None:
            return False
        return [(p.name, p.document_json) for p in self.policies] == [
            (p.name, p.document_json) for p in other.policies
        ]


def document_json(document: dict[str, Any]) -> bytes:
    """The wire form of a stored document: canonical JSON (sorted keys, no spaces)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def feed_policy(name: str, document: dict[str, Any]) -> FeedPolicy:
    """Parse one stored document for its selector; an unparsable one selects everyone."""
    wire = document_json(document)
    try:
        parsed = parse_policy_dict(document, f"stored policy {name}").policies
    except PolicyError as err:
        log.warning(
            "stored policy does not parse: sent to every proxy",
            extra={"policy": name, "error": str(err)},
        )
        return FeedPolicy(name, wire, None, parsed=False)
    selectors = [p.selector for p in parsed]
    if any(s is None for s in selectors):
        return FeedPolicy(name, wire, None)
    return FeedPolicy(name, wire, frozenset(i for s in selectors if s is not None for i in s))


def select(policies: Sequence[FeedPolicy], revision: int, spiffe_id: str) -> PolicySet:
    """The set ``spiffe_id`` receives (pure)."""
    chosen = sorted((p for p in policies if p.selects(spiffe_id)), key=lambda p: p.name)
    return PolicySet(revision, tuple(chosen))


class PolicyFeed:
    """The stored policies of one server, parsed once per policies revision (thread-safe)."""

    def __init__(self, ca: CaService) -> None:
        self.ca = ca
        self._lock = threading.Lock()
        self._cached: tuple[int, tuple[FeedPolicy, ...]] | None = None

    def revision(self) -> int:
        with self.ca.store.read() as tx:
            return store.revision(tx)

    def current(self) -> tuple[int, tuple[FeedPolicy, ...]]:
        with self.ca.store.read() as tx:
            revision = store.revision(tx)
            cached = self._cached
            if cached is not None and cached[0] == revision:
                return cached
            rows = store.list_all(tx)
        parsed = (revision, tuple(feed_policy(r.name, r.document) for r in rows))
        with self._lock:
            if self._cached is None or self._cached[0] <= revision:
                self._cached = parsed
        return parsed

    def for_caller(self, spiffe_id: str) -> PolicySet:
        revision, policies = self.current()
        return select(policies, revision, spiffe_id)


class PolicyStream:
    """What one ``WatchPolicies`` stream has sent; only its worker touches it."""

    def __init__(self, feed: PolicyFeed, spiffe_id: str) -> None:
        self.feed = feed
        self.spiffe_id = spiffe_id
        self.sent: PolicySet | None = None

    def first(self) -> PolicySet:
        self.sent = self.feed.for_caller(self.spiffe_id)
        return self.sent

    def next(self) -> PolicySet | None:
        """The new set when the policies selecting the caller changed, else None."""
        current = self.feed.for_caller(self.spiffe_id)
        if current.same_policies(self.sent):
            return None
        self.sent = current
        return current
