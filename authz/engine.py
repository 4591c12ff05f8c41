"""The authorization engine: compiles policies into indexed matchers and decides requests.

Owns the decision procedure (Istio AuthorizationPolicy semantics) and its explanation:

1. any matching enforced DENY policy denies;
2. else, if no enforced ALLOW policy selects the workload, its default posture decides;
3. else a matching ALLOW policy allows;
4. else the request is denied ("no ALLOW policy matched: N considered").

AUDIT policies never change the decision; matches are reported. Dry-run policies are evaluated
and their would-be decision reported, never enforced. On an L4 connection a rule that uses
HTTP-only fields is ignored by ALLOW policies, while DENY and AUDIT policies drop those fields and
apply the rest (Istio's rule: a narrower ALLOW, a wider DENY).

It must not do I/O of any kind (no clock, no log, no file, no socket) and ``evaluate`` must never
raise: a fault denies, and says so in the verdict.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter

from authz import _syntax
from authz._syntax import KeyKind, PatternKind
from authz._validate import policy_problems
from authz.errors import PolicyError
from authz.model import (
    Action,
    Condition,
    Operation,
    Policy,
    Rule,
    Source,
    condition_is_http_only,
    rule_http_only_fields,
)
from authz.posture import DEFAULT_POSTURE, Posture
from authz.request import Request
from authz.verdict import DryRunResult, PolicyMatch, Verdict

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ADDRESS_CACHE_SIZE = 4096  # distinct peer addresses whose parse is memoized; a proxy sees few

_Pred = Callable[["_Ctx"], bool]
_Match = Callable[[str | None], bool]


@lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _parse_address(address: str) -> IpAddress | None:
    """The peer address, IPv4-mapped IPv6 folded to IPv4 so IPv4 blocks still apply."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _split_host(host: str) -> tuple[str, str]:
    """``(host with port, host without port)``, lower-cased, trailing root dot removed.

    Host names compare case-insensitively (RFC 4343); ``Example.COM.`` and ``example.com`` name
    the same host, so both forms reach the matcher in one spelling (Istio CVE-2021-39155).
    """
    lowered = host.lower()
    name, port = lowered, ""
    if lowered.startswith("["):
        end = lowered.find("]")
        if end != -1 and lowered[end + 1 : end + 2] == ":":
            name, port = lowered[: end + 1], lowered[end + 2 :]
    elif ":" in lowered:
        name, _, port = lowered.rpartition(":")
    name = name.rstrip(".")
    return (f"{name}:{port}" if port else name), name


class _Ctx:
    """The request attributes in the form the matchers read, computed once per decision."""

    __slots__ = (
        "_address",
        "_ip",
        "_ip_done",
        "claims",
        "headers",
        "host",
        "host_bare",
        "method",
        "path",
        "port",
        "principal",
        "request_principal",
        "trust_domain",
    )

    def __init__(self, request: Request) -> None:
        self.principal = request.source_principal
        self.trust_domain = _syntax.trust_domain_of(request.source_principal)
        self.port = request.destination_port
        self._address = request.source_address
        self._ip: IpAddress | None = None
        self._ip_done = False
        self.method: str | None = None
        self.path: str | None = None
        self.host: str | None = None
        self.host_bare: str | None = None
        self.headers: Mapping[str, str] = {}
        self.request_principal: str | None = None
        self.claims: Mapping[str, object] = {}
        if request.is_l4:
            return
        self.method = request.method
        path = request.path
        # Paths match without the query string, as in Istio.
        self.path = None if path is None else path.partition("?")[0]
        if request.host is not None:
            self.host, self.host_bare = _split_host(request.host)
        self.headers = request.headers
        self.request_principal = request.request_principal
        self.claims = request.claims

    def ip(self) -> IpAddress | None:
        """The peer address, parsed on first use; ``None`` when absent or unparsable."""
        if not self._ip_done:
            self._ip_done = True
            self._ip = None if self._address is None else _parse_address(self._address)
        return self._ip


# -- value matchers ---------------------------------------------------------------------------


def _strings(values: Iterable[str], *, lower: bool = False) -> _Match:
    """A matcher for ORed string patterns; ``None`` (attribute absent) never matches."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    for value in values:
        kind, literal = _syntax.split_pattern(value.lower() if lower else value)
        if kind is PatternKind.PRESENCE:
            return _present
        if kind is PatternKind.EXACT:
            exact.add(literal)
        elif kind is PatternKind.PREFIX:
            prefixes.append(literal)
        else:
            suffixes.append(literal)
    exact_set = frozenset(exact)
    if not prefixes and not suffixes:
        return exact_set.__contains__  # C-level lookup; None is simply not in the set
    starts, ends = tuple(prefixes), tuple(suffixes)

    def match(value: str | None) -> bool:
        if value is None:
            return False
        return value in exact_set or value.startswith(starts) or value.endswith(ends)

    return match


def _present(value: str | None) -> bool:
    return value is not None


def _ip_blocks(values: Iterable[str]) -> Callable[[IpAddress | None], bool]:
    networks = tuple(_syntax.parse_ip_block(value) for value in values)

    def match(ip: IpAddress | None) -> bool:
        if ip is None:
            return False
        return any(ip.version == net.version and ip in net for net in networks)

    return match


def _ports(values: Iterable[int | str]) -> frozenset[int]:
    return frozenset(_syntax.parse_port(value) for value in values)


# -- predicates over the context --------------------------------------------------------------


def _on_attr(attr: str, match: _Match, negate: bool) -> _Pred:
    get = attrgetter(attr)
    if negate:
        return lambda ctx: not match(get(ctx))
    return lambda ctx: match(get(ctx))


def _on_ip(values: Iterable[str], negate: bool) -> _Pred:
    match = _ip_blocks(values)
    if negate:
        return lambda ctx: not match(ctx.ip())
    return lambda ctx: match(ctx.ip())


def _on_port(values: Iterable[int | str], negate: bool) -> _Pred:
    ports = _ports(values)
    if negate:
        return lambda ctx: ctx.port not in ports
    return lambda ctx: ctx.port in ports


def _on_host(values: Iterable[str], negate: bool) -> _Pred:
    match = _strings(values, lower=True)
    # A pattern without a port also matches the host sent with one; this is stricter than
    # Istio's exact match, where ``hosts: [a.com]`` misses ``a.com:80`` and a DENY is bypassed.
    if negate:
        return lambda ctx: not (match(ctx.host) or match(ctx.host_bare))
    return lambda ctx: match(ctx.host) or match(ctx.host_bare)


def _all_of(preds: Sequence[_Pred]) -> _Pred | None:
    """AND of ``preds``; ``None`` means "always true" so callers can skip the call."""
    if not preds:
        return None
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        first, second = preds
        return lambda ctx: first(ctx) and second(ctx)
    frozen = tuple(preds)

    def every(ctx: _Ctx) -> bool:
        for pred in frozen:  # noqa: SIM110  # a plain loop: all() of a generator costs more
            if not pred(ctx):
                return False
        return True

    return every


def _any_of(preds: Sequence[_Pred | None]) -> _Pred | None:
    """OR of ``preds``; one always-true member makes the whole always true (``None``)."""
    if any(pred is None for pred in preds):
        return None
    real = tuple(pred for pred in preds if pred is not None)
    if len(real) == 1:
        return real[0]

    def some(ctx: _Ctx) -> bool:
        for pred in real:  # noqa: SIM110  # a plain loop: any() of a generator costs more
            if pred(ctx):
                return True
        return False

    return some


def _compile_source(source: Source, l4: bool) -> _Pred | None:
    preds: list[_Pred] = []
    for negate in (False, True):
        prefix = "not_" if negate else ""
        if values := getattr(source, prefix + "principals"):
            preds.append(_on_attr("principal", _strings(values), negate))
        if values := getattr(source, prefix + "trust_domains"):
            preds.append(_on_attr("trust_domain", _strings(values), negate))
        if values := getattr(source, prefix + "ip_blocks"):
            preds.append(_on_ip(values, negate))
        if (values := getattr(source, prefix + "request_principals")) and not l4:
            preds.append(_on_attr("request_principal", _strings(values), negate))
    return _all_of(preds)


def _compile_operation(operation: Operation, l4: bool) -> _Pred | None:
    preds: list[_Pred] = []
    for negate in (False, True):
        prefix = "not_" if negate else ""
        if values := getattr(operation, prefix + "ports"):
            preds.append(_on_port(values, negate))
        if l4:
            continue
        if values := getattr(operation, prefix + "hosts"):
            preds.append(_on_host(values, negate))
        if values := getattr(operation, prefix + "methods"):
            preds.append(_on_attr("method", _strings(values), negate))
        if values := getattr(operation, prefix + "paths"):
            preds.append(_on_attr("path", _strings(values), negate))
    return _all_of(preds)


def _claim_matcher(names: tuple[str, ...], match: _Match) -> _Pred:
    """Reads a (nested) claim; a list claim matches when one of its strings matches."""

    def claim(ctx: _Ctx) -> bool:
        value: object = ctx.claims
        for name in names:
            if not isinstance(value, Mapping):
                return False
            value = value.get(name)
        if isinstance(value, str):
            return match(value)
        if isinstance(value, list | tuple):
            return any(isinstance(item, str) and match(item) for item in value)
        return False

    return claim


def _condition_side(kind: KeyKind, arg: tuple[str, ...], values: tuple[str, ...]) -> _Pred:
    """The positive test "the attribute matches one of ``values``"."""
    if kind is KeyKind.SOURCE_IP:
        return _on_ip(values, negate=False)
    if kind is KeyKind.DESTINATION_PORT:
        return _on_port(values, negate=False)
    if kind is KeyKind.CLAIM:
        return _claim_matcher(arg, _strings(values))
    if kind is KeyKind.HEADER:
        name, match = arg[0], _strings(values)
        return lambda ctx: match(ctx.headers.get(name))
    attr = {
        KeyKind.AUTH_PRINCIPAL: "request_principal",
        KeyKind.SOURCE_PRINCIPAL: "principal",
        KeyKind.SOURCE_TRUST_DOMAIN: "trust_domain",
    }[kind]
    return _on_attr(attr, _strings(values), negate=False)


def _compile_condition(condition: Condition, l4: bool) -> _Pred | None:
    if l4 and condition_is_http_only(condition.key):
        return None
    kind, arg = _syntax.parse_condition_key(condition.key)
    preds: list[_Pred] = []
    if condition.values:
        preds.append(_condition_side(kind, arg, condition.values))
    if condition.not_values:
        excluded = _condition_side(kind, arg, condition.not_values)
        preds.append(lambda ctx: not excluded(ctx))
    return _all_of(preds)


def _compile_rule(rule: Rule, l4: bool) -> _Pred | None:
    parts: list[_Pred] = []
    if rule.from_ and (pred := _any_of([_compile_source(s, l4) for s in rule.from_])):
        parts.append(pred)
    if rule.to and (pred := _any_of([_compile_operation(o, l4) for o in rule.to])):
        parts.append(pred)
    parts.extend(p for c in rule.when if (p := _compile_condition(c, l4)) is not None)
    return _all_of(parts)


# -- compiled policies and the index ----------------------------------------------------------

_Rules = tuple[tuple[int, _Pred | None], ...]


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One policy, its rules compiled for HTTP (``l7``) and for L4, with ready-made verdicts."""

    name: str
    action: Action
    dry_run: bool
    l7: _Rules
    l4: _Rules
    verdicts: tuple[Verdict, ...]  # the enforced verdict per rule index (ALLOW/DENY only)

    def first_match(self, ctx: _Ctx, l4: bool) -> int | None:
        for index, pred in self.l4 if l4 else self.l7:
            if pred is None or pred(ctx):
                return index
        return None


def _compile_policy(policy: Policy) -> _Compiled:
    l7 = tuple((i, _compile_rule(rule, l4=False)) for i, rule in enumerate(policy.rules))
    l4 = tuple(
        (i, _compile_rule(rule, l4=True))
        for i, rule in enumerate(policy.rules)
        # Istio: an ALLOW rule with HTTP-only fields is dropped on TCP (a narrower ALLOW).
        if not (policy.action is Action.ALLOW and rule_http_only_fields(rule))
    )
    allowed = policy.action is Action.ALLOW
    verb = "allowed" if allowed else "denied"
    verdicts = tuple(
        Verdict(
            allowed, policy.name, i, f'{verb} by {policy.action} policy "{policy.name}" rule {i}'
        )
        for i in range(len(policy.rules))
    )
    return _Compiled(policy.name, policy.action, policy.dry_run, l7, l4, verdicts)


@dataclass(frozen=True, slots=True)
class _Selected:
    """The compiled policies that select one workload, by role, in document order."""

    deny: tuple[_Compiled, ...]
    allow: tuple[_Compiled, ...]
    audit: tuple[_Compiled, ...]
    dry_run: tuple[_Compiled, ...]
    no_allow_matched: Verdict
    empty: bool  # no policy selects the workload: the posture alone decides

    @classmethod
    def of(cls, compiled: Iterable[_Compiled]) -> _Selected:
        chosen = tuple(compiled)
        enforced = [c for c in chosen if not c.dry_run]
        allow = tuple(c for c in enforced if c.action is Action.ALLOW)
        return cls(
            deny=tuple(c for c in enforced if c.action is Action.DENY),
            allow=allow,
            audit=tuple(c for c in enforced if c.action is Action.AUDIT),
            dry_run=tuple(c for c in chosen if c.dry_run),
            no_allow_matched=Verdict(
                False, None, None, f"no ALLOW policy matched: {len(allow)} considered"
            ),
            empty=not chosen,
        )


_NO_ALLOW_SELECTS = "no ALLOW policy selects the workload: default posture"


class Engine:
    """Compiled policies, indexed by the SPIFFE ID of the workload they select.

    Build one with ``Engine.compile`` (or ``Engine.deny_all`` to fail closed) and share it: it
    is immutable, so a new policy set means a new engine swapped in by the caller.
    """

    __slots__ = (
        "_by_destination",
        "_default_posture",
        "_everyone",
        "_fail_closed",
        "_policies",
        "_posture_allowed",
        "_postures",
        "_trusted",
    )

    def __init__(
        self,
        policies: tuple[Policy, ...],
        by_destination: dict[str, _Selected],
        everyone: _Selected,
        trusted: frozenset[str],
        default_posture: Posture,
        postures: dict[str, Posture],
        fail_closed: Verdict | None,
    ) -> None:
        """Internal: use ``Engine.compile`` or ``Engine.deny_all``."""
        self._policies = policies
        self._by_destination = by_destination
        self._everyone = everyone
        self._trusted = trusted
        self._default_posture = default_posture
        self._postures = postures
        self._fail_closed = fail_closed
        self._posture_allowed = {
            td: Verdict(
                True,
                None,
                None,
                f"{_NO_ALLOW_SELECTS} all-authenticated admits trust domain {td}",
            )
            for td in trusted
        }

    @classmethod
    def compile(
        cls,
        policies: Iterable[Policy],
        *,
        trust_domain: str,
        federated_trust_domains: Iterable[str] = (),
        default_posture: Posture = DEFAULT_POSTURE,
        postures: Mapping[str, Posture] | None = None,
    ) -> Engine:
        """Validate and compile ``policies``.

        ``trust_domain`` and ``federated_trust_domains`` are the peers the ``all-authenticated``
        posture admits. ``postures`` overrides ``default_posture`` per workload SPIFFE ID.
        Raises ``PolicyError`` naming the policy and key path of the first problem.
        """
        chosen = tuple(policies)
        trusted = frozenset([trust_domain, *federated_trust_domains])
        for td in sorted(trusted):
            _settings_check("trust_domain", td, _syntax.check_trust_domain)
        overrides = dict(postures or {})
        for name, posture in [("default_posture", default_posture)] + [
            (f"postures[{k!r}]", v) for k, v in overrides.items()
        ]:
            if not isinstance(posture, Posture):
                raise PolicyError(
                    "engine",
                    name,
                    f"expected one of deny, all-authenticated, allow (got {posture!r})",
                )
        for spiffe_id in overrides:
            _settings_check(f"postures[{spiffe_id!r}]", spiffe_id, _syntax.check_spiffe_id)
        seen: set[str] = set()
        for index, policy in enumerate(chosen):
            if not isinstance(policy, Policy):
                raise PolicyError(
                    "engine", f"policies[{index}]", f"expected a Policy (got {policy!r})"
                )
            problems = policy_problems(policy)
            if problems:
                path, expected = problems[0]
                raise PolicyError(f"policy {policy.name!r}", path, expected)
            if policy.name in seen:
                raise PolicyError(
                    f"policy {policy.name!r}",
                    "metadata.name",
                    "expected a unique name; it is used twice",
                )
            seen.add(policy.name)

        compiled = [_compile_policy(policy) for policy in chosen]
        everyone: list[int] = []
        buckets: dict[str, list[int]] = {}
        for index, policy in enumerate(chosen):
            if policy.selector is None:
                everyone.append(index)
            else:
                for spiffe_id in dict.fromkeys(policy.selector):
                    buckets.setdefault(spiffe_id, []).append(index)
        by_destination = {
            spiffe_id: _Selected.of(compiled[i] for i in sorted(everyone + indexes))
            for spiffe_id, indexes in buckets.items()
        }
        return cls(
            chosen,
            by_destination,
            _Selected.of(compiled[i] for i in everyone),
            trusted,
            default_posture,
            overrides,
            fail_closed=None,
        )

    @classmethod
    def deny_all(cls, reason: str) -> Engine:
        """An engine that denies everything and says why (a policy set that failed to load)."""
        verdict = Verdict(False, None, None, f"fail closed, denying everything: {reason}")
        empty = _Selected.of(())
        return cls((), {}, empty, frozenset(), Posture.DENY, {}, fail_closed=verdict)

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The policies this engine was compiled from, in order."""
        return self._policies

    def evaluate(self, request: Request) -> Verdict:
        """Decide ``request``. Never raises: an internal fault denies and names itself."""
        try:
            return self._evaluate(request)
        except Exception as err:  # fail closed: a fault must deny, never crash the proxy
            return Verdict(
                False, None, None, f"internal error, denied: {type(err).__name__}: {err}"
            )

    def posture_only(self, destination: str, principal: str | None) -> Verdict | None:
        """The verdict for any request to ``destination`` from ``principal`` when no policy
        selects that workload, so that the posture alone decides and nothing else of the
        request is read; None when a policy selects it (``evaluate`` then needs the request).
        A proxy asks this first, before it builds a ``Request``. Never raises, as
        ``evaluate``."""
        try:
            if self._fail_closed is not None:
                return self._fail_closed
            if not self._by_destination.get(destination, self._everyone).empty:
                return None
            return self._posture(destination, principal)
        except Exception as err:  # fail closed, as evaluate
            return Verdict(
                False, None, None, f"internal error, denied: {type(err).__name__}: {err}"
            )

    def _evaluate(self, request: Request) -> Verdict:
        if self._fail_closed is not None:
            return self._fail_closed
        selected = self._by_destination.get(request.destination, self._everyone)
        if selected.empty:  # nothing reads the request's attributes: no context to build
            return self._posture(request.destination, request.source_principal)
        ctx = _Ctx(request)
        l4 = request.is_l4
        verdict: Verdict | None = None
        denied_by_policy = False
        allow_matched = False
        for policy in selected.deny:
            index = policy.first_match(ctx, l4)
            if index is not None:
                verdict, denied_by_policy = policy.verdicts[index], True
                break
        if verdict is None:
            if not selected.allow:
                verdict = self._posture(request.destination, ctx.principal)
            else:
                verdict = selected.no_allow_matched
                for policy in selected.allow:
                    index = policy.first_match(ctx, l4)
                    if index is not None:
                        verdict, allow_matched = policy.verdicts[index], True
                        break
        if not selected.audit and not selected.dry_run:
            return verdict
        audit = tuple(
            PolicyMatch(policy.name, index)
            for policy in selected.audit
            if (index := policy.first_match(ctx, l4)) is not None
        )
        dry_run = tuple(
            _dry_run(
                policy,
                policy.first_match(ctx, l4),
                verdict,
                denied_by_policy,
                allow_matched,
                len(selected.allow),
            )
            for policy in selected.dry_run
        )
        return Verdict(
            verdict.allowed, verdict.policy, verdict.rule, verdict.reason, dry_run, audit
        )

    def _posture(self, destination: str, principal: str | None) -> Verdict:
        posture = self._postures.get(destination, self._default_posture)
        if posture is Posture.ALLOW:
            return _POSTURE_ALLOW
        if posture is Posture.DENY:
            return _POSTURE_DENY
        if principal is None:
            return _POSTURE_UNAUTHENTICATED
        trust_domain = _syntax.trust_domain_of(principal)
        allowed = self._posture_allowed.get(trust_domain or "")
        if allowed is not None:
            return allowed
        return Verdict(
            False,
            None,
            None,
            f"{_NO_ALLOW_SELECTS} all-authenticated refuses trust domain {trust_domain} "
            f"(trusted: {', '.join(sorted(self._trusted))})",
        )


_POSTURE_ALLOW = Verdict(True, None, None, f"{_NO_ALLOW_SELECTS} allow")
_POSTURE_DENY = Verdict(False, None, None, f"{_NO_ALLOW_SELECTS} deny")
_POSTURE_UNAUTHENTICATED = Verdict(
    False, None, None, f"{_NO_ALLOW_SELECTS} all-authenticated refuses a peer without an SVID"
)


def _dry_run(
    policy: _Compiled,
    index: int | None,
    enforced: Verdict,
    denied_by_policy: bool,
    allow_matched: bool,
    allow_count: int,
) -> DryRunResult:
    """The decision had ``policy`` been enforced together with the enforced set."""
    unchanged = f"decision unchanged: {enforced.reason}"
    by_rule = f'{policy.action} policy "{policy.name}" rule {index}'
    if policy.action is Action.DENY:
        if index is not None:
            return DryRunResult(
                policy.name, policy.action, index, False, f"would be denied by {by_rule}"
            )
        return DryRunResult(policy.name, policy.action, None, enforced.allowed, unchanged)
    if policy.action is Action.AUDIT or denied_by_policy:
        return DryRunResult(policy.name, policy.action, index, enforced.allowed, unchanged)
    if index is not None:
        return DryRunResult(
            policy.name, policy.action, index, True, f"would be allowed by {by_rule}"
        )
    if allow_matched:
        return DryRunResult(policy.name, policy.action, None, True, unchanged)
    return DryRunResult(
        policy.name,
        policy.action,
        None,
        False,
        f"no ALLOW policy would match: {allow_count + 1} considered",
    )


def _settings_check(path: str, value: str, check: Callable[[str], None]) -> None:
    try:
        check(value)
    except ValueError as err:
        raise PolicyError("engine", path, str(err)) from err
