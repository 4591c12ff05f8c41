"""The policy model: frozen values that describe AuthorizationPolicy documents.

Owns the shape of a policy (``Policy``, ``Rule``, ``Source``, ``Operation``, ``Condition``) and
which fields only exist on HTTP requests. It holds no behaviour beyond simple queries: parsing
lives in ``parser``, validation in ``_validate`` and matching in ``engine``. No I/O.

Semantics follow Istio's AuthorizationPolicy: inside a rule, one ``from`` entry, one ``to`` entry
and every ``when`` condition must match; inside an entry every non-empty field must match; inside
a field one value must match (``not_*`` fields: no value may match). An empty tuple means the
field or section is absent. String values match exactly, by prefix (``abc*``), by suffix
(``*abc``) or by presence (``*``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum


class Action(StrEnum):
    """What a policy does when one of its rules matches."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


@dataclass(frozen=True, slots=True)
class Source:
    """Who sends the request. Principals are SPIFFE IDs of the verified mTLS peer."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    not_trust_domains: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """What the request does. Ports are the destination port the proxy accepted on."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    """An extra attribute test: ``key`` names the attribute (see ``CONDITION_KEYS``)."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule. ``from_`` is the YAML ``from`` (a keyword in Python); empty means any."""

    from_: tuple[Source, ...] = ()
    to: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    """An AuthorizationPolicy.

    ``selector`` lists the SPIFFE IDs of the workloads it applies to; ``None`` means every
    workload. ``rules == ()`` matches nothing (an ALLOW policy without rules therefore denies
    everything it selects); ``rules == (Rule(),)`` matches everything.
    """

    name: str
    selector: tuple[str, ...] | None = None
    action: Action = Action.ALLOW
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    def selects(self, spiffe_id: str) -> bool:
        """Whether this policy applies to the workload ``spiffe_id``."""
        return self.selector is None or spiffe_id in self.selector


SOURCE_FIELDS = tuple(f.name for f in fields(Source))
OPERATION_FIELDS = tuple(f.name for f in fields(Operation))

# Fields that only exist on an HTTP request: Istio ignores them on TCP connections (see
# ``rule_http_only_fields``). Ports, principals, trust domains and addresses exist on both.
HTTP_ONLY_SOURCE_FIELDS = frozenset({"request_principals", "not_request_principals"})
HTTP_ONLY_OPERATION_FIELDS = frozenset(
    {"hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths"}
)

# ``when`` keys. ``[NAME]`` takes a header name (matched lower-cased) or a claim name; claims
# may be nested: ``request.auth.claims[realm][roles]``.
CONDITION_KEYS = (
    "request.headers[NAME]",
    "request.auth.principal",
    "request.auth.claims[NAME]",
    "source.ip",
    "source.principal",
    "source.trust_domain",
    "destination.port",
)
HTTP_ONLY_CONDITION_PREFIXES = ("request.",)


def condition_is_http_only(key: str) -> bool:
    """Whether the ``when`` key reads an HTTP attribute (headers, JWT)."""
    return key.startswith(HTTP_ONLY_CONDITION_PREFIXES)


def rule_http_only_fields(rule: Rule) -> tuple[str, ...]:
    """Names of the HTTP-only fields and ``when`` keys the rule uses, in document order."""
    used: list[str] = []
    for source in rule.from_:
        used.extend(
            name
            for name in SOURCE_FIELDS
            if name in HTTP_ONLY_SOURCE_FIELDS and getattr(source, name)
        )
    for operation in rule.to:
        used.extend(
            name
            for name in OPERATION_FIELDS
            if name in HTTP_ONLY_OPERATION_FIELDS and getattr(operation, name)
        )
    used.extend(c.key for c in rule.when if condition_is_http_only(c.key))
    return tuple(dict.fromkeys(used))
