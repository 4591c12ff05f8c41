"""The decision procedure, row by row: each rule of the issue's semantics section is a row."""

from __future__ import annotations

import pytest

from authz import (
    Action,
    DryRunResult,
    Engine,
    Policy,
    PolicyError,
    PolicyMatch,
    Posture,
    Request,
    Rule,
    Source,
    Verdict,
)
from tests.authz._build import (
    BATCH,
    CI,
    DB,
    FRONTEND,
    PARTNER,
    STRANGER,
    WEB,
    engine,
    http,
    policy,
    rule,
    tcp,
)

ALLOW_FRONTEND = policy("frontend", rules=[rule(source=[{"principals": [FRONTEND]}])])
DENY_ADMIN = policy("no-admin", "DENY", [rule(operation=[{"paths": ["/admin", "/admin/*"]}])])

# (policies, request, allowed, deciding policy, rule index, fragment of the reason)
DECISIONS = [
    # -- order of evaluation ------------------------------------------------------------------
    pytest.param(
        [],
        http(),
        True,
        None,
        None,
        "no ALLOW policy selects the workload: default posture all-authenticated admits",
        id="no-policies-default-posture-decides",
    ),
    pytest.param(
        [ALLOW_FRONTEND],
        http(),
        True,
        "frontend",
        0,
        'allowed by ALLOW policy "frontend" rule 0',
        id="allow-matches",
    ),
    pytest.param(
        [ALLOW_FRONTEND],
        http(peer=BATCH),
        False,
        None,
        None,
        "no ALLOW policy matched: 1 considered",
        id="allow-selects-but-misses-denies",
    ),
    pytest.param(
        [ALLOW_FRONTEND, policy("batch", rules=[rule(source=[{"principals": [BATCH]}])])],
        http(peer=PARTNER),
        False,
        None,
        None,
        "no ALLOW policy matched: 2 considered",
        id="reason-counts-allow-policies-considered",
    ),
    pytest.param(
        [ALLOW_FRONTEND, DENY_ADMIN],
        http(path="/admin"),
        False,
        "no-admin",
        0,
        'denied by DENY policy "no-admin" rule 0',
        id="deny-wins-over-matching-allow",
    ),
    pytest.param(
        [DENY_ADMIN, ALLOW_FRONTEND],
        http(path="/api"),
        True,
        "frontend",
        0,
        "allowed by ALLOW",
        id="deny-misses-allow-decides",
    ),
    pytest.param(
        [DENY_ADMIN],
        http(path="/api"),
        True,
        None,
        None,
        "default posture all-authenticated",
        id="deny-policies-alone-leave-posture-in-charge",
    ),
    pytest.param(
        [policy("for-db", rules=[rule(source=[{"principals": [BATCH]}])], selector=[DB])],
        http(),
        True,
        None,
        None,
        "default posture",
        id="allow-for-another-workload-does-not-select",
    ),
    pytest.param(
        [policy("everyone", rules=[rule(source=[{"principals": [BATCH]}])], selector=None)],
        http(),
        False,
        None,
        None,
        "no ALLOW policy matched: 1 considered",
        id="selector-omitted-selects-every-workload",
    ),
    pytest.param(
        [
            policy("p1", rules=[rule(source=[{"principals": [BATCH]}])]),
            policy("p2", rules=[rule(source=[{"principals": [FRONTEND]}])]),
        ],
        http(),
        True,
        "p2",
        0,
        'ALLOW policy "p2" rule 0',
        id="first-matching-allow-is-named",
    ),
    pytest.param(
        [
            policy(
                "two-rules",
                rules=[rule(source=[{"principals": [BATCH]}]), rule(operation=[{"paths": ["/"]}])],
            )
        ],
        http(),
        True,
        "two-rules",
        1,
        "rule 1",
        id="rule-index-of-the-matching-rule",
    ),
    # -- empty rule, no rules -----------------------------------------------------------------
    pytest.param(
        [policy("all", rules=[{}])],
        http(peer=None),
        True,
        "all",
        0,
        "allowed by",
        id="empty-rule-allows-all",
    ),
    pytest.param(
        [policy("nothing", rules=None)],
        http(),
        False,
        None,
        None,
        "no ALLOW policy matched: 1 considered",
        id="allow-without-rules-allows-nothing",
    ),
    pytest.param(
        [policy("nothing", rules=[])],
        http(),
        False,
        None,
        None,
        "no ALLOW policy matched",
        id="allow-with-empty-rule-list-allows-nothing",
    ),
    pytest.param(
        [policy("deny-nothing", "DENY", rules=None)],
        http(),
        True,
        None,
        None,
        "default posture",
        id="deny-without-rules-has-no-effect",
    ),
    pytest.param(
        [ALLOW_FRONTEND, policy("deny-all", "DENY", rules=[{}])],
        http(),
        False,
        "deny-all",
        0,
        "denied by DENY",
        id="deny-empty-rule-denies-all",
    ),
    # -- ORs and ANDs -------------------------------------------------------------------------
    pytest.param(
        [policy("two", rules=[rule(source=[{"principals": [BATCH, FRONTEND]}])])],
        http(),
        True,
        "two",
        0,
        "",
        id="values-in-a-field-are-ored",
    ),
    pytest.param(
        [
            policy(
                "and",
                rules=[rule(source=[{"principals": [FRONTEND], "ip_blocks": ["192.0.2.0/24"]}])],
            )
        ],
        http(),
        False,
        None,
        None,
        "no ALLOW policy matched",
        id="fields-in-a-source-are-anded",
    ),
    pytest.param(
        [policy("and", rules=[rule(operation=[{"methods": ["GET"], "paths": ["/x"]}])])],
        http(path="/y"),
        False,
        None,
        None,
        "",
        id="fields-in-an-operation-are-anded",
    ),
    pytest.param(
        [
            policy(
                "or",
                rules=[rule(source=[{"principals": [BATCH]}, {"trust_domains": ["example.org"]}])],
            )
        ],
        http(),
        True,
        "or",
        0,
        "",
        id="from-entries-are-ored",
    ),
    pytest.param(
        [policy("or", rules=[rule(operation=[{"paths": ["/x"]}, {"methods": ["GET"]}])])],
        http(path="/y"),
        True,
        "or",
        0,
        "",
        id="to-entries-are-ored",
    ),
    pytest.param(
        [
            policy(
                "and",
                rules=[
                    rule(source=[{"principals": [FRONTEND]}], operation=[{"methods": ["POST"]}])
                ],
            )
        ],
        http(),
        False,
        None,
        None,
        "",
        id="from-and-to-are-anded",
    ),
    pytest.param(
        [
            policy(
                "when",
                rules=[
                    rule(
                        when=[
                            {"key": "request.headers[x-tenant]", "values": ["blue"]},
                            {"key": "source.ip", "values": ["192.0.2.0/24"]},
                        ]
                    )
                ],
            )
        ],
        http(headers={"x-tenant": "blue"}),
        False,
        None,
        None,
        "",
        id="when-conditions-are-anded",
    ),
    # -- string matching ----------------------------------------------------------------------
    pytest.param(
        [policy("p", rules=[rule(operation=[{"paths": ["/api/v1"]}])])],
        http(path="/api/v1/x"),
        False,
        None,
        None,
        "",
        id="exact-is-exact",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"paths": ["/api/*"]}])])],
        http(path="/api/v1/x"),
        True,
        "p",
        0,
        "",
        id="prefix-match",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"paths": ["*.js"]}])])],
        http(path="/static/app.js"),
        True,
        "p",
        0,
        "",
        id="suffix-match",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"principals": ["*"]}])])],
        http(peer=None),
        False,
        None,
        None,
        "",
        id="presence-needs-a-peer",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"principals": ["spiffe://example.org/front*"]}])])],
        http(),
        True,
        "p",
        0,
        "",
        id="principal-prefix",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"paths": ["/api"]}])])],
        http(path="/api?debug=1"),
        True,
        "p",
        0,
        "",
        id="query-string-ignored-by-paths",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"methods": ["GET"]}])])],
        http(method="get"),
        False,
        None,
        None,
        "",
        id="methods-are-case-sensitive",
    ),
    # -- not_* variants -----------------------------------------------------------------------
    pytest.param(
        [policy("p", rules=[rule(source=[{"not_principals": [BATCH]}])])],
        http(),
        True,
        "p",
        0,
        "",
        id="not-principals-other-peer",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"not_principals": [FRONTEND]}])])],
        http(),
        False,
        None,
        None,
        "",
        id="not-principals-listed-peer",
    ),
    pytest.param(
        [
            ALLOW_FRONTEND,
            policy("mtls", "DENY", [rule(source=[{"not_principals": ["*"]}])], selector=None),
        ],
        http(peer=None),
        False,
        "mtls",
        0,
        "",
        id="not-principals-star-denies-unauthenticated",
    ),
    pytest.param(
        [
            policy(
                "p",
                rules=[
                    rule(
                        source=[
                            {"principals": ["spiffe://example.org/*"], "not_principals": [FRONTEND]}
                        ]
                    )
                ],
            )
        ],
        http(),
        False,
        None,
        None,
        "",
        id="positive-and-negative-on-one-field",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"trust_domains": ["partner.org"]}])])],
        http(peer=PARTNER),
        True,
        "p",
        0,
        "",
        id="trust-domains",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"not_trust_domains": ["example.org"]}])])],
        http(),
        False,
        None,
        None,
        "",
        id="not-trust-domains",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"ip_blocks": ["10.0.0.0/8"]}])])],
        http(address="10.200.0.1"),
        True,
        "p",
        0,
        "",
        id="ip-blocks-cidr",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"ip_blocks": ["10.0.0.0/8"]}])])],
        http(address="::ffff:10.200.0.1"),
        True,
        "p",
        0,
        "",
        id="ip-blocks-ipv4-mapped-ipv6",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"ip_blocks": ["2001:db8::/32"]}])])],
        http(address="2001:db8::7"),
        True,
        "p",
        0,
        "",
        id="ip-blocks-ipv6",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"not_ip_blocks": ["10.0.0.0/8"]}])])],
        http(address="10.0.0.1"),
        False,
        None,
        None,
        "",
        id="not-ip-blocks",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"request_principals": [CI]}])])],
        http(jwt=CI),
        True,
        "p",
        0,
        "",
        id="request-principals",
    ),
    pytest.param(
        [policy("p", rules=[rule(source=[{"not_request_principals": ["*"]}])])],
        http(jwt=CI),
        False,
        None,
        None,
        "",
        id="not-request-principals",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"hosts": ["web.example.org"]}])])],
        http(host="WEB.Example.ORG:8443"),
        True,
        "p",
        0,
        "",
        id="hosts-case-insensitive-and-port-tolerant",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"hosts": ["web.example.org:80"]}])])],
        http(host="web.example.org:8443"),
        False,
        None,
        None,
        "",
        id="hosts-with-port-match-that-port",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"not_hosts": ["*.example.org"]}])])],
        http(host="web.example.org."),
        False,
        None,
        None,
        "",
        id="not-hosts-trailing-dot",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"ports": [8443]}])])],
        http(port=8443),
        True,
        "p",
        0,
        "",
        id="ports",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"not_ports": ["8443"]}])])],
        http(port=8443),
        False,
        None,
        None,
        "",
        id="not-ports",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"not_methods": ["DELETE"]}])])],
        http(method="DELETE"),
        False,
        None,
        None,
        "",
        id="not-methods",
    ),
    pytest.param(
        [policy("p", rules=[rule(operation=[{"not_paths": ["/admin*"]}])])],
        http(path="/admin/x"),
        False,
        None,
        None,
        "",
        id="not-paths",
    ),
    # -- when keys ----------------------------------------------------------------------------
    pytest.param(
        [
            policy(
                "p", rules=[rule(when=[{"key": "request.headers[X-Tenant]", "values": ["blue"]}])]
            )
        ],
        http(headers={"x-tenant": "blue"}),
        True,
        "p",
        0,
        "",
        id="when-header-name-case-insensitive",
    ),
    pytest.param(
        [policy("p", rules=[rule(when=[{"key": "request.headers[x-tenant]", "values": ["*"]}])])],
        http(),
        False,
        None,
        None,
        "",
        id="when-header-presence-absent",
    ),
    pytest.param(
        [
            policy(
                "p",
                rules=[rule(when=[{"key": "request.headers[x-tenant]", "not_values": ["red"]}])],
            )
        ],
        http(),
        True,
        "p",
        0,
        "",
        id="when-header-not-values-absent-header-matches",
    ),
    pytest.param(
        [
            policy(
                "p",
                rules=[
                    rule(
                        when=[
                            {
                                "key": "request.headers[x-tenant]",
                                "values": ["b*"],
                                "not_values": ["blue"],
                            }
                        ]
                    )
                ],
            )
        ],
        http(headers={"x-tenant": "blue"}),
        False,
        None,
        None,
        "",
        id="when-values-and-not-values-anded",
    ),
    pytest.param(
        [
            policy(
                "p",
                rules=[rule(when=[{"key": "request.auth.claims[groups]", "values": ["admins"]}])],
            )
        ],
        http(claims={"groups": ["dev", "admins"]}),
        True,
        "p",
        0,
        "",
        id="when-claim-list",
    ),
    pytest.param(
        [
            policy(
                "p",
                rules=[rule(when=[{"key": "request.auth.claims[realm][role]", "values": ["ops"]}])],
            )
        ],
        http(claims={"realm": {"role": "ops"}}),
        True,
        "p",
        0,
        "",
        id="when-claim-nested",
    ),
    pytest.param(
        [
            policy(
                "p", rules=[rule(when=[{"key": "request.auth.claims[admin]", "values": ["true"]}])]
            )
        ],
        http(claims={"admin": True}),
        False,
        None,
        None,
        "",
        id="when-claim-non-string-never-matches",
    ),
    pytest.param(
        [policy("p", rules=[rule(when=[{"key": "request.auth.principal", "values": [CI]}])])],
        http(jwt=CI),
        True,
        "p",
        0,
        "",
        id="when-request-auth-principal",
    ),
    pytest.param(
        [policy("p", rules=[rule(when=[{"key": "source.ip", "not_values": ["10.1.2.3"]}])])],
        http(address="10.1.2.3"),
        False,
        None,
        None,
        "",
        id="when-source-ip",
    ),
    pytest.param(
        [policy("p", rules=[rule(when=[{"key": "source.principal", "values": ["*/frontend"]}])])],
        http(peer=STRANGER),
        True,
        "p",
        0,
        "",
        id="when-source-principal-suffix",
    ),
    pytest.param(
        [
            policy(
                "p", rules=[rule(when=[{"key": "source.trust_domain", "values": ["partner.org"]}])]
            )
        ],
        http(peer=PARTNER),
        True,
        "p",
        0,
        "",
        id="when-source-trust-domain",
    ),
    pytest.param(
        [policy("p", rules=[rule(when=[{"key": "destination.port", "values": [8443]}])])],
        http(port=8443),
        True,
        "p",
        0,
        "",
        id="when-destination-port",
    ),
    # -- L4 connections -----------------------------------------------------------------------
    pytest.param(
        [
            policy(
                "http-allow",
                rules=[rule(source=[{"principals": [FRONTEND]}], operation=[{"paths": ["/"]}])],
            )
        ],
        tcp(),
        False,
        None,
        None,
        "no ALLOW policy matched: 1 considered",
        id="l4-allow-rule-with-http-fields-is-ignored",
    ),
    pytest.param(
        [
            policy(
                "tcp-allow",
                rules=[rule(source=[{"principals": [FRONTEND]}], operation=[{"ports": [5432]}])],
            )
        ],
        tcp(),
        True,
        "tcp-allow",
        0,
        "",
        id="l4-allow-rule-without-http-fields-applies",
    ),
    pytest.param(
        [
            policy(
                "mixed",
                rules=[rule(operation=[{"methods": ["GET"]}]), rule(operation=[{"ports": [5432]}])],
            )
        ],
        tcp(),
        True,
        "mixed",
        1,
        "rule 1",
        id="l4-allow-keeps-rule-indexes",
    ),
    pytest.param(
        [
            policy(
                "hdr-allow", rules=[rule(when=[{"key": "request.headers[x]", "not_values": ["y"]}])]
            )
        ],
        tcp(),
        False,
        None,
        None,
        "",
        id="l4-allow-rule-with-http-when-is-ignored",
    ),
    pytest.param(
        [
            policy("all", rules=[{}]),
            policy(
                "deny-batch-admin",
                "DENY",
                [rule(source=[{"principals": [BATCH]}], operation=[{"paths": ["/admin"]}])],
            ),
        ],
        tcp(peer=BATCH),
        False,
        "deny-batch-admin",
        0,
        "",
        id="l4-deny-drops-http-fields-and-applies-the-rest",
    ),
    pytest.param(
        [
            policy("all", rules=[{}]),
            policy(
                "deny-batch-admin",
                "DENY",
                [rule(source=[{"principals": [BATCH]}], operation=[{"paths": ["/admin"]}])],
            ),
        ],
        tcp(peer=FRONTEND),
        True,
        "all",
        0,
        "",
        id="l4-deny-rest-still-has-to-match",
    ),
    pytest.param(
        [
            policy("all", rules=[{}]),
            policy("deny-get", "DENY", [rule(operation=[{"methods": ["GET"]}])]),
        ],
        tcp(),
        False,
        "deny-get",
        0,
        "",
        id="l4-deny-http-only-rule-denies-every-connection",
    ),
    pytest.param(
        [
            policy("all", rules=[{}]),
            policy(
                "deny-jwt",
                "DENY",
                [
                    rule(
                        source=[{"request_principals": [CI]}],
                        when=[{"key": "request.headers[x]", "values": ["1"]}],
                    )
                ],
            ),
        ],
        tcp(),
        False,
        "deny-jwt",
        0,
        "",
        id="l4-deny-http-source-and-when-dropped",
    ),
    pytest.param(
        [policy("get-only", rules=[rule(operation=[{"methods": ["GET"]}])])],
        Request(WEB, FRONTEND, "10.1.2.3", 5432, is_l4=True, method="GET", path="/"),
        False,
        None,
        None,
        "",
        id="l4-ignores-http-attributes-on-the-request",
    ),
]


@pytest.mark.parametrize(
    ("policies", "request_", "allowed", "decided_by", "rule_index", "reason"), DECISIONS
)
def test_decision(
    policies: list[Policy],
    request_: Request,
    allowed: bool,
    decided_by: str | None,
    rule_index: int | None,
    reason: str,
) -> None:
    verdict = engine(policies).evaluate(request_)
    assert (verdict.allowed, verdict.policy, verdict.rule) == (allowed, decided_by, rule_index)
    assert reason in verdict.reason


# (default posture, per-workload overrides, request, allowed, fragment of the reason)
POSTURES = [
    pytest.param(Posture.DENY, {}, http(), False, "default posture deny", id="deny"),
    pytest.param(
        Posture.ALLOW, {}, http(peer=None), True, "default posture allow", id="allow-anyone"
    ),
    pytest.param(
        Posture.ALL_AUTHENTICATED,
        {},
        http(),
        True,
        "all-authenticated admits trust domain example.org",
        id="all-authenticated-own-trust-domain",
    ),
    pytest.param(
        Posture.ALL_AUTHENTICATED,
        {},
        http(peer=PARTNER),
        True,
        "admits trust domain partner.org",
        id="all-authenticated-federated",
    ),
    pytest.param(
        Posture.ALL_AUTHENTICATED,
        {},
        http(peer=STRANGER),
        False,
        "refuses trust domain evil.org (trusted: example.org, partner.org)",
        id="all-authenticated-foreign-trust-domain",
    ),
    pytest.param(
        Posture.ALL_AUTHENTICATED,
        {},
        http(peer=None),
        False,
        "refuses a peer without an SVID",
        id="all-authenticated-no-peer",
    ),
    pytest.param(
        Posture.ALLOW,
        {WEB: Posture.DENY},
        http(),
        False,
        "default posture deny",
        id="override-deny",
    ),
    pytest.param(
        Posture.DENY,
        {DB: Posture.ALLOW},
        http(),
        False,
        "default posture deny",
        id="override-for-another-workload",
    ),
    pytest.param(
        Posture.DENY, {WEB: Posture.ALLOW}, http(peer=None), True, "allow", id="override-allow"
    ),
]


@pytest.mark.parametrize(("default", "overrides", "request_", "allowed", "reason"), POSTURES)
def test_default_posture(
    default: Posture,
    overrides: dict[str, Posture],
    request_: Request,
    allowed: bool,
    reason: str,
) -> None:
    compiled = engine([], default_posture=default, postures=overrides)
    verdict = compiled.evaluate(request_)
    assert (verdict.allowed, verdict.policy, verdict.rule) == (allowed, None, None)
    assert reason in verdict.reason
    # No policy selects the workload: posture_only decides the same without the request.
    assert compiled.posture_only(request_.destination, request_.source_principal) == verdict


def test_posture_only_defers_to_evaluate_where_a_policy_selects_the_workload() -> None:
    compiled = engine([DENY_ADMIN], default_posture=Posture.ALLOW)
    assert compiled.posture_only(WEB, http().source_principal) is None
    failed = Engine.deny_all("bundle unreadable")
    assert failed.posture_only(WEB, None) == failed.evaluate(http())
    assert failed.posture_only(WEB, None) is not None


def test_shipped_default_posture_is_all_authenticated() -> None:
    compiled = Engine.compile([], trust_domain="example.org")
    assert compiled.evaluate(http()).allowed
    assert not compiled.evaluate(http(peer=None)).allowed
    assert not compiled.evaluate(http(peer=PARTNER)).allowed  # not federated here


def test_deny_policy_applies_under_posture_allow() -> None:
    verdict = engine([DENY_ADMIN], default_posture=Posture.ALLOW).evaluate(http(path="/admin"))
    assert not verdict.allowed
    assert verdict.policy == "no-admin"


# -- AUDIT ------------------------------------------------------------------------------------

AUDIT_WRITES = policy("audit-writes", "AUDIT", [rule(operation=[{"methods": ["POST"]}])])


@pytest.mark.parametrize(
    ("policies", "request_", "allowed", "audit"),
    [
        pytest.param(
            [AUDIT_WRITES],
            http(method="POST"),
            True,
            (PolicyMatch("audit-writes", 0),),
            id="match-reported-posture-decides",
        ),
        pytest.param([AUDIT_WRITES], http(), True, (), id="no-match-not-reported"),
        pytest.param(
            [AUDIT_WRITES, policy("deny-post", "DENY", [rule(operation=[{"methods": ["POST"]}])])],
            http(method="POST"),
            False,
            (PolicyMatch("audit-writes", 0),),
            id="reported-on-denied-requests",
        ),
        pytest.param(
            [policy("audit-all", "AUDIT", [{}])],
            http(peer=None),
            False,
            (PolicyMatch("audit-all", 0),),
            id="audit-never-counts-as-allow",
        ),
        pytest.param(
            [policy("audit-get", "AUDIT", [rule(operation=[{"methods": ["GET"]}])])],
            tcp(),
            True,
            (PolicyMatch("audit-get", 0),),
            id="l4-audit-drops-http-fields-like-deny",
        ),
    ],
)
def test_audit(
    policies: list[Policy], request_: Request, allowed: bool, audit: tuple[PolicyMatch, ...]
) -> None:
    verdict = engine(policies).evaluate(request_)
    assert verdict.allowed is allowed
    assert verdict.audit == audit
    assert verdict.policy is None or not verdict.policy.startswith("audit")


# -- dry run ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policies", "request_", "allowed", "dry_run"),
    [
        pytest.param(
            [ALLOW_FRONTEND, policy("trial-deny", "DENY", [{}], dry_run=True)],
            http(),
            True,
            DryRunResult(
                "trial-deny",
                Action.DENY,
                0,
                False,
                'would be denied by DENY policy "trial-deny" rule 0',
            ),
            id="deny-would-deny-but-is-not-enforced",
        ),
        pytest.param(
            [
                ALLOW_FRONTEND,
                policy("trial-deny", "DENY", [rule(operation=[{"paths": ["/x"]}])], dry_run=True),
            ],
            http(),
            True,
            DryRunResult(
                "trial-deny",
                Action.DENY,
                None,
                True,
                'decision unchanged: allowed by ALLOW policy "frontend" rule 0',
            ),
            id="deny-no-match-unchanged",
        ),
        pytest.param(
            [policy("trial-allow", rules=[rule(source=[{"principals": [BATCH]}])], dry_run=True)],
            http(),
            True,
            DryRunResult(
                "trial-allow",
                Action.ALLOW,
                None,
                False,
                "no ALLOW policy would match: 1 considered",
            ),
            id="first-allow-would-end-the-default-posture",
        ),
        pytest.param(
            [
                policy(
                    "trial-allow", rules=[rule(source=[{"principals": [FRONTEND]}])], dry_run=True
                )
            ],
            http(),
            True,
            DryRunResult(
                "trial-allow",
                Action.ALLOW,
                0,
                True,
                'would be allowed by ALLOW policy "trial-allow" rule 0',
            ),
            id="allow-would-allow",
        ),
        pytest.param(
            [
                ALLOW_FRONTEND,
                policy("trial-allow", rules=[rule(source=[{"principals": [BATCH]}])], dry_run=True),
            ],
            http(),
            True,
            DryRunResult("trial-allow", Action.ALLOW, None, True, "decision unchanged: allowed by"),
            id="allow-no-match-another-allow-matched",
        ),
        pytest.param(
            [DENY_ADMIN, policy("trial-allow", rules=[{}], dry_run=True)],
            http(path="/admin"),
            False,
            DryRunResult(
                "trial-allow",
                Action.ALLOW,
                0,
                False,
                'decision unchanged: denied by DENY policy "no-admin"',
            ),
            id="allow-cannot-beat-an-enforced-deny",
        ),
        pytest.param(
            [policy("trial-audit", "AUDIT", [{}], dry_run=True)],
            http(),
            True,
            DryRunResult("trial-audit", Action.AUDIT, 0, True, "decision unchanged"),
            id="audit-dry-run-reports-match-only",
        ),
    ],
)
def test_dry_run(
    policies: list[Policy], request_: Request, allowed: bool, dry_run: DryRunResult
) -> None:
    verdict = engine(policies).evaluate(request_)
    assert verdict.allowed is allowed
    assert len(verdict.dry_run) == 1
    (result,) = verdict.dry_run
    assert (result.policy, result.action, result.rule, result.allowed) == (
        dry_run.policy,
        dry_run.action,
        dry_run.rule,
        dry_run.allowed,
    )
    assert result.matched is (dry_run.rule is not None)
    assert dry_run.reason in result.reason


def test_dry_run_policy_for_another_workload_is_not_reported() -> None:
    trial = policy("trial", "DENY", [{}], selector=[DB], dry_run=True)
    assert engine([trial]).evaluate(http()).dry_run == ()


# -- the engine's own contract ----------------------------------------------------------------


def test_deny_all_fails_closed_and_says_why() -> None:
    verdict = Engine.deny_all("policies.yaml:3: spec: expected a mapping").evaluate(http())
    assert verdict == Verdict(
        False,
        None,
        None,
        "fail closed, denying everything: policies.yaml:3: spec: expected a mapping",
    )


def test_evaluate_never_raises_even_on_a_wrong_argument() -> None:
    verdict = engine([ALLOW_FRONTEND]).evaluate(None)  # type: ignore[arg-type]
    assert not verdict.allowed
    assert verdict.reason.startswith("internal error, denied: AttributeError")


def test_verdict_as_dict_is_the_cli_json_shape() -> None:
    trial = policy("trial", "DENY", [{}], dry_run=True)
    verdict = engine([ALLOW_FRONTEND, trial, AUDIT_WRITES]).evaluate(http(method="POST"))
    assert verdict.as_dict() == {
        "decision": "allow",
        "policy": "frontend",
        "rule": 0,
        "reason": 'allowed by ALLOW policy "frontend" rule 0',
        "dry_run": [
            {
                "policy": "trial",
                "action": "DENY",
                "rule": 0,
                "decision": "deny",
                "reason": 'would be denied by DENY policy "trial" rule 0',
            }
        ],
        "audit": [{"policy": "audit-writes", "rule": 0}],
    }


def test_policy_order_decides_which_deny_is_named() -> None:
    first = policy("a-deny", "DENY", [{}])
    second = policy("b-deny", "DENY", [{}])
    assert engine([second, first]).evaluate(http()).policy == "b-deny"


def test_index_only_touches_selecting_policies() -> None:
    compiled = engine([ALLOW_FRONTEND, policy("db", rules=[{}], selector=[DB])])
    assert compiled.evaluate(http(dest=DB, peer=None)).policy == "db"
    assert compiled.evaluate(http(dest="spiffe://example.org/unknown")).policy is None
    assert [p.name for p in compiled.policies] == ["frontend", "db"]


@pytest.mark.parametrize(
    ("policies", "settings", "message"),
    [
        pytest.param(
            [ALLOW_FRONTEND, ALLOW_FRONTEND],
            {},
            r"policy 'frontend': metadata.name: expected a unique name",
            id="duplicate-name",
        ),
        pytest.param(
            [Policy("bad", rules=(Rule(from_=(Source(ip_blocks=("10.0.0.1/8",)),)),))],
            {},
            r"policy 'bad': spec.rules\[0\].from\[0\].source.ip_blocks\[0\]: "
            r".*did you mean 10.0.0.0/8",
            id="invalid-model-built-in-code",
        ),
        pytest.param(
            [Policy("bad", rules=(Rule(from_=(Source(),)),))],
            {},
            r"spec.rules\[0\].from\[0\].source: expected at least one of principals",
            id="empty-source-built-in-code",
        ),
        pytest.param(
            [],
            {"trust_domain": "Example.org"},
            r"engine: trust_domain: trust domain 'Example.org'",
            id="bad-trust-domain",
        ),
        pytest.param(
            [],
            {"postures": {"web": Posture.DENY}},
            r"engine: postures\['web'\]: expected a SPIFFE ID",
            id="bad-override-key",
        ),
        pytest.param(
            [],
            {"default_posture": "open"},
            r"engine: default_posture: expected one of deny, all-authenticated, allow",
            id="bad-posture",
        ),
    ],
)
def test_compile_refuses(policies: list[Policy], settings: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"trust_domain": "example.org", **settings}
    with pytest.raises(PolicyError, match=message):
        Engine.compile(policies, **arguments)  # type: ignore[arg-type]
