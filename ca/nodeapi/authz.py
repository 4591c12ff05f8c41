"""Which registration entries an agent is authorized for: the pure authorization walk.

Owns the rule (SPIRE's): an agent is authorized for

1. **node entries**: entries whose parent is the server (``spiffe://TD/meshid/server``) and whose
   selectors are all among the agent's node selectors; their SPIFFE IDs become aliases of the
   agent;
2. every entry whose parent is the agent's own ID, one of its aliases (a join token's
   ``--spiffe-id``, or a node entry's SPIFFE ID), or the SPIFFE ID of an entry already
   authorized, transitively.

Pure: the caller passes ``children_of`` (entries by parent ID; a dict in tests, batched queries in
the server) and gets a value back. Cycles end the walk (each ID is expanded once). IDs under
``/meshid/`` other than the agent's own are never expanded, so an alias can never make an agent
stand in for the server or another agent. Every grant names the rule that decided it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from ..entries import RESERVED_PATH_PREFIX, RegistrationEntry

ChildrenOf = Callable[[Collection[str]], Iterable[RegistrationEntry]]


class Rule(StrEnum):
    """Why an entry is authorized."""

    NODE_ENTRY = "node-entry"  # parent is the server, selectors among the node's selectors
    AGENT = "agent"  # parent is the agent's own ID
    ALIAS = "alias"  # parent is an alias of the agent (join token --spiffe-id)
    NODE_ALIAS = "node-alias"  # parent is the SPIFFE ID of a node entry that matched
    DESCENDANT = "descendant"  # parent is the SPIFFE ID of another authorized entry


@dataclass(frozen=True)
class Agent:
    """The facts authorization starts from."""

    spiffe_id: str
    aliases: frozenset[str] = frozenset()
    node_selectors: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Grant:
    entry: RegistrationEntry
    rule: Rule
    via: str  # the parent ID through which it was granted


@dataclass(frozen=True)
class Denial:
    entry_id: str
    reason: str


@dataclass(frozen=True)
class Authorization:
    """The result of one walk: every authorized entry with its grant."""

    agent: Agent
    grants: Mapping[str, Grant] = field(default_factory=lambda: MappingProxyType({}))
    parent_ids: frozenset[str] = frozenset()  # IDs whose child entries are authorized

    def check(self, entry_id: str) -> Grant | Denial:
        grant = self.grants.get(entry_id)
        if grant is None:
            return Denial(entry_id, "entry not authorized for this agent")
        return grant

    def entries(self) -> list[RegistrationEntry]:
        return [g.entry for g in self.grants.values()]

    def federates_with(self) -> frozenset[str]:
        return frozenset(td.name for g in self.grants.values() for td in g.entry.federates_with)


def _expandable(spiffe_id: str, agent_id: str, server_id: str) -> bool:
    if spiffe_id == agent_id:
        return True
    if spiffe_id == server_id:
        return False
    _, _, rest = spiffe_id.partition("://")
    _, slash, path = rest.partition("/")
    return not (slash and f"/{path}".startswith(RESERVED_PATH_PREFIX))


def node_entry_matches(entry: RegistrationEntry, node_selectors: frozenset[str]) -> bool:
    """All of the entry's selectors are among the node's (an entry without any matches none)."""
    return bool(entry.selectors) and all(str(s) in node_selectors for s in entry.selectors)


def authorize(agent: Agent, server_id: str, children_of: ChildrenOf) -> Authorization:
    """Walk the entry graph from the agent, its aliases and its node entries."""
    grants: dict[str, Grant] = {}
    roots: dict[str, Rule] = {agent.spiffe_id: Rule.AGENT}
    for alias in sorted(agent.aliases):
        roots.setdefault(alias, Rule.ALIAS)
    for entry in children_of([server_id]):
        if str(entry.parent_id) == server_id and node_entry_matches(entry, agent.node_selectors):
            grants[entry.id] = Grant(entry, Rule.NODE_ENTRY, server_id)
            roots.setdefault(str(entry.spiffe_id), Rule.NODE_ALIAS)
    expanded: set[str] = set()
    frontier = {i for i in roots if _expandable(i, agent.spiffe_id, server_id)}
    while frontier:
        expanded |= frontier
        found: set[str] = set()
        for entry in children_of(frontier):
            parent = str(entry.parent_id)
            if entry.id in grants or parent not in frontier:
                continue
            grants[entry.id] = Grant(entry, roots.get(parent, Rule.DESCENDANT), parent)
            child = str(entry.spiffe_id)
            if child not in expanded and _expandable(child, agent.spiffe_id, server_id):
                found.add(child)
        frontier = found
    return Authorization(agent, MappingProxyType(grants), frozenset(expanded))
