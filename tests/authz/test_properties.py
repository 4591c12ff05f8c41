"""Properties of the engine and the parser over generated policies and requests."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from authz import (
    Action,
    Condition,
    Engine,
    Operation,
    Policy,
    PolicyError,
    Posture,
    Request,
    Rule,
    Source,
    Verdict,
    parse_policies,
    parse_policy_dict,
    policy_to_dict,
)
from authz.model import OPERATION_FIELDS, SOURCE_FIELDS
from tests.authz._build import BATCH, CI, DB, FEDERATED, FRONTEND, PARTNER, STRANGER, TD, WEB

# Enough examples to find the interesting corners, few enough that the suite stays fast.
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OTHER = "spiffe://example.org/other"
PEERS = [FRONTEND, BATCH, PARTNER, STRANGER, CI]
PRINCIPALS = [FRONTEND, BATCH, PARTNER, "spiffe://example.org/*", "*", "*/frontend"]
TRUST_DOMAINS = ["example.org", "partner.org", "evil.org", "*.org", "*"]
IP_BLOCKS = ["10.0.0.0/8", "10.1.2.3/32", "::1/128", "2001:db8::/32"]
POOLS: dict[str, list[Any]] = {
    "principals": PRINCIPALS,
    "trust_domains": TRUST_DOMAINS,
    "ip_blocks": IP_BLOCKS,
    "request_principals": [CI, "*"],
    "hosts": ["web.example.org", "*.example.org", "web*", "*"],
    "ports": [80, 443, 5432, 8443],
    "methods": ["GET", "POST", "*", "DEL*"],
    "paths": ["/", "/admin", "/admin/*", "/api/*", "*.js", "*"],
}
CONDITIONS: dict[str, list[str]] = {
    "request.headers[x-tenant]": ["blue", "red", "*", "b*"],
    "request.auth.claims[groups]": ["admins", "*"],
    "request.auth.principal": [CI, "*"],
    "source.ip": IP_BLOCKS,
    "source.principal": PRINCIPALS,
    "source.trust_domain": TRUST_DOMAINS,
    "destination.port": ["80", "5432", "8443"],
}


def _values(pool: list[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True).map(tuple)


def _fields(names: tuple[str, ...]) -> st.SearchStrategy[dict[str, tuple[Any, ...]]]:
    """One to three fields of a source or operation (static strategies: no flatmap, fast)."""
    one_field = st.one_of(
        [st.tuples(st.just(name), _values(POOLS[name.removeprefix("not_")])) for name in names]
    )
    return st.lists(one_field, min_size=1, max_size=3, unique_by=lambda kv: kv[0]).map(dict)


def _condition(key: str) -> st.SearchStrategy[Condition]:
    values = _values(CONDITIONS[key])
    return st.one_of(
        st.builds(Condition, st.just(key), values),
        st.builds(Condition, st.just(key), st.just(()), values),
        st.builds(Condition, st.just(key), values, values),
    )


sources = _fields(SOURCE_FIELDS).map(lambda kw: Source(**kw))
operations = _fields(OPERATION_FIELDS).map(lambda kw: Operation(**kw))
conditions = st.one_of([_condition(key) for key in sorted(CONDITIONS)])
rules = st.builds(
    Rule,
    from_=st.lists(sources, max_size=2).map(tuple),
    to=st.lists(operations, max_size=2).map(tuple),
    when=st.lists(conditions, max_size=2).map(tuple),
)
selectors = st.one_of(
    st.none(), st.lists(st.sampled_from([WEB, DB]), min_size=1, max_size=2, unique=True).map(tuple)
)


def _policy(name: str) -> st.SearchStrategy[Policy]:
    return st.builds(
        Policy,
        name=st.just(name),
        selector=selectors,
        action=st.sampled_from(Action),
        rules=st.lists(rules, max_size=3).map(tuple),
        dry_run=st.booleans(),
    )


policy_sets = st.lists(_policy("p"), max_size=6).map(
    lambda drawn: [replace(p, name=f"p{i}") for i, p in enumerate(drawn)]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.just("admins"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)
# Requests a mesh actually sees: they hit the policy pools, so rules match often.
requests = st.builds(
    Request,
    destination=st.sampled_from([WEB, DB, OTHER]),
    source_principal=st.sampled_from([*PEERS, None]),
    source_address=st.sampled_from(["10.1.2.3", "10.9.9.9", "::1", "::ffff:10.1.2.3", "192.0.2.7"]),
    destination_port=st.sampled_from([80, 443, 5432, 8443]),
    is_l4=st.booleans(),
    method=st.sampled_from(["GET", "POST", "DELETE"]),
    host=st.sampled_from(["web.example.org", "WEB.example.org:80", "db.internal"]),
    path=st.sampled_from(["/", "/admin", "/admin/x", "/api/v1", "/app.js", "/x?y"]),
    headers=st.sampled_from([{}, {"x-tenant": "blue"}, {"x-tenant": "red"}]),
    request_principal=st.sampled_from([CI, None]),
    claims=st.sampled_from([{}, {"groups": ["admins", "dev"]}, {"groups": "dev"}]),
)
# Anything the types allow, including values no proxy would produce.
wild_requests = st.builds(
    Request,
    destination=st.sampled_from([WEB, DB, OTHER]) | st.text(max_size=30),
    source_principal=st.none() | st.sampled_from(PEERS) | st.text(max_size=30),
    source_address=st.none() | st.sampled_from(["fe80::1%eth0", "[::1]"]) | st.text(max_size=20),
    destination_port=st.none() | st.integers(),
    is_l4=st.booleans(),
    method=st.none() | st.text(max_size=10),
    host=st.none() | st.sampled_from(["[::1]:80", "[::1", "x.", ":"]) | st.text(max_size=20),
    path=st.none() | st.text(max_size=20),
    headers=st.dictionaries(
        st.sampled_from(["x-tenant", "other"]) | st.text(max_size=10), st.text(max_size=10)
    ),
    request_principal=st.none() | st.text(max_size=20),
    claims=st.dictionaries(st.sampled_from(["groups", "realm"]) | st.text(max_size=5), json_values),
)
postures = st.sampled_from(Posture)


def _engine(policies: list[Policy], posture: Posture) -> Engine:
    return Engine.compile(
        policies, trust_domain=TD, federated_trust_domains=[FEDERATED], default_posture=posture
    )


@PROPERTY
@given(policy_sets, requests | wild_requests, postures)
def test_evaluate_never_raises_and_explains_itself(
    policies: list[Policy], request: Request, posture: Posture
) -> None:
    verdict = _engine(policies, posture).evaluate(request)
    assert isinstance(verdict, Verdict)
    assert not verdict.reason.startswith("internal error"), verdict.reason
    actions = {p.name: p for p in policies}
    if verdict.policy is not None:
        decider = actions[verdict.policy]
        assert not decider.dry_run
        assert decider.action is (Action.ALLOW if verdict.allowed else Action.DENY)
        assert verdict.rule is not None
        assert 0 <= verdict.rule < len(decider.rules)
    for result in verdict.dry_run:
        assert actions[result.policy].dry_run
    for match in verdict.audit:
        assert actions[match.policy].action is Action.AUDIT


def _matching_rules(request: Request) -> list[Rule]:
    """Rules that match ``request`` by construction."""
    found = [Rule()]
    if request.source_principal in PEERS:
        found.append(Rule(from_=(Source(principals=(request.source_principal,)),)))
    if request.destination_port in {80, 5432, 8443}:
        port = request.destination_port
        found.append(
            Rule(
                to=(Operation(ports=(port,)),),
                when=(Condition("source.ip", (), ("203.0.113.0/24",)),),
            )
        )
    return found


@PROPERTY
@given(policy_sets, requests, postures, st.data())
def test_a_matching_deny_always_wins(
    policies: list[Policy], request: Request, posture: Posture, data: st.DataObject
) -> None:
    deny = Policy(
        "zz-deny",
        data.draw(st.sampled_from([None, (request.destination,)])),
        Action.DENY,
        (data.draw(st.sampled_from(_matching_rules(request))),),
    )
    position = data.draw(st.integers(min_value=0, max_value=len(policies)))
    verdict = _engine([*policies[:position], deny, *policies[position:]], posture).evaluate(request)
    assert not verdict.allowed
    deciders = {p.name for p in policies if p.action is Action.DENY and not p.dry_run}
    assert verdict.policy in deciders | {"zz-deny"}


@PROPERTY
@given(policy_sets, requests, postures, _policy("zz-allow"), st.data())
def test_adding_an_allow_never_turns_an_allow_into_a_deny(
    policies: list[Policy], request: Request, posture: Posture, extra: Policy, data: st.DataObject
) -> None:
    if data.draw(st.booleans()):  # half the time, make sure some ALLOW already allows it
        rule = data.draw(st.sampled_from(_matching_rules(request)))
        policies = [*policies, Policy("base-allow", (request.destination,), Action.ALLOW, (rule,))]
    extra = Policy(extra.name, extra.selector, Action.ALLOW, extra.rules, dry_run=False)
    before = _engine(policies, posture).evaluate(request)
    after = _engine([*policies, extra], posture).evaluate(request)
    event(f"before: {'allowed by a policy' if before.policy and before.allowed else 'other'}")
    if before.allowed and before.policy is not None:
        assert after.allowed
    # The one exception is by design (Istio): the first ALLOW policy selecting a workload ends its
    # default posture. Dry-run shows it ahead of time; the next property checks that it does.


@PROPERTY
@given(policy_sets, requests, postures, _policy("zz-trial"))
def test_dry_run_predicts_enforcement_and_enforces_nothing(
    policies: list[Policy], request: Request, posture: Posture, trial: Policy
) -> None:
    as_dry_run = Policy(trial.name, trial.selector, trial.action, trial.rules, dry_run=True)
    enforced = Policy(trial.name, trial.selector, trial.action, trial.rules, dry_run=False)
    without = _engine(policies, posture).evaluate(request)
    trying = _engine([*policies, as_dry_run], posture).evaluate(request)
    after = _engine([*policies, enforced], posture).evaluate(request)
    assert (trying.allowed, trying.policy, trying.rule) == (
        without.allowed,
        without.policy,
        without.rule,
    )
    results = [r for r in trying.dry_run if r.policy == trial.name]
    if trial.selects(request.destination):
        (result,) = results
        event(f"trial {trial.action} flips the decision: {result.allowed is not without.allowed}")
        assert result.allowed is after.allowed
    else:
        assert results == []


@PROPERTY
@given(policy_sets, requests, postures, _policy("zz-audit"))
def test_audit_never_changes_the_decision(
    policies: list[Policy], request: Request, posture: Posture, audit: Policy
) -> None:
    audit = Policy(audit.name, audit.selector, Action.AUDIT, audit.rules, audit.dry_run)
    before = _engine(policies, posture).evaluate(request)
    after = _engine([*policies, audit], posture).evaluate(request)
    assert (after.allowed, after.policy, after.rule) == (before.allowed, before.policy, before.rule)


@PROPERTY
@given(_policy("p"))
def test_document_round_trip(policy: Policy) -> None:
    assert parse_policy_dict(policy_to_dict(policy), "stored").policies == (policy,)


EXAMPLE = """apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {name: web-read}
spec:
  selector: {spiffe_ids: ["spiffe://example.org/web"]}
  rules:
    - from: [{source: {principals: ["spiffe://example.org/frontend"]}}]
      to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
"""


@PROPERTY
@given(
    st.one_of(
        st.text(),
        st.tuples(
            st.integers(0, len(EXAMPLE)), st.integers(0, len(EXAMPLE)), st.text(max_size=12)
        ).map(lambda cut: EXAMPLE[: cut[0]] + cut[2] + EXAMPLE[cut[1] :]),
    )
)
def test_parser_raises_only_policy_error(text: str) -> None:
    try:
        parse_policies(text, "fuzz.yaml")
    except PolicyError as err:
        assert str(err).startswith("fuzz.yaml")


@PROPERTY
@given(json_values)
def test_dict_parser_raises_only_policy_error(data: object) -> None:
    try:
        parse_policy_dict(data, "stored")
    except PolicyError as err:
        assert str(err).startswith("stored")
