"""The policy document format: what parses, what is refused, and how precisely it is reported."""

from __future__ import annotations

import json
import textwrap

import pytest

from authz import (
    Action,
    Condition,
    Operation,
    Policy,
    PolicyError,
    Rule,
    Source,
    parse_policies,
    parse_policy_dict,
    policy_to_dict,
)

HEADER = "apiVersion: meshid/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-read}\nspec:\n"
SPEC_FIRST_LINE = 5  # the first line of the text passed to ``doc``


def doc(spec: str) -> str:
    """A document whose ``spec`` body (dedented, then indented) starts on line 5."""
    return HEADER + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n"


EXAMPLE = doc(
    """
    selector: {spiffe_ids: ["spiffe://example.org/web"]}
    action: ALLOW
    dry_run: false
    rules:
      - from: [{source: {principals: ["spiffe://example.org/frontend"]}}]
        to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
        when: [{key: "request.headers[x-tenant]", values: ["blue"]}]
    """
)


def test_the_issue_example_parses() -> None:
    result = parse_policies(EXAMPLE, "web.yaml")
    assert result.policies == (
        Policy(
            name="web-read",
            selector=("spiffe://example.org/web",),
            action=Action.ALLOW,
            rules=(
                Rule(
                    from_=(Source(principals=("spiffe://example.org/frontend",)),),
                    to=(Operation(methods=("GET",), paths=("/api/*",)),),
                    when=(Condition("request.headers[x-tenant]", ("blue",)),),
                ),
            ),
            dry_run=False,
        ),
    )
    (warning,) = result.warnings
    assert str(warning) == (
        "web.yaml:9: spec.rules[0]: uses HTTP-only fields (methods, paths, "
        "request.headers[x-tenant]): on an L4 (TCP) connection this ALLOW rule never matches "
        "(Istio semantics)"
    )


def test_several_documents_and_empty_ones() -> None:
    second = EXAMPLE.replace("web-read", "web-deny").replace("action: ALLOW", "action: DENY")
    text = "# policies for web\n---\n" + EXAMPLE + "---\n---\n" + second
    result = parse_policies(text, "all.yaml")
    assert [p.name for p in result.policies] == ["web-read", "web-deny"]
    assert [p.action for p in result.policies] == [Action.ALLOW, Action.DENY]


def test_empty_text_has_no_policies() -> None:
    assert parse_policies("", "empty.yaml").policies == ()
    assert parse_policies("# nothing\n", "empty.yaml").policies == ()


def test_defaults() -> None:
    (policy,) = parse_policies(HEADER + "  {}\n", "min.yaml").policies
    assert policy == Policy("web-read", None, Action.ALLOW, (), False)


def test_ports_accept_numbers_and_digit_strings() -> None:
    text = doc("rules: [{to: [{operation: {ports: [8080, '9090'], not_ports: ['22']}}]}]")
    (policy,) = parse_policies(text, "p.yaml").policies
    assert policy.rules[0].to[0] == Operation(ports=(8080, 9090), not_ports=(22,))


def test_condition_values_accept_numbers() -> None:
    text = doc("rules: [{when: [{key: destination.port, values: [8443]}]}]")
    (policy,) = parse_policies(text, "p.yaml").policies
    assert policy.rules[0].when == (Condition("destination.port", ("8443",)),)


# (id, text, line, key path, fragment of what was expected)
ERRORS = [
    pytest.param(
        EXAMPLE.replace("meshid/v1", "security.istio.io/v1"),
        1,
        "apiVersion",
        "expected 'meshid/v1' (got 'security.istio.io/v1')",
        id="api-version",
    ),
    pytest.param(
        EXAMPLE.replace("kind: AuthorizationPolicy", "kind: PeerAuthentication"),
        2,
        "kind",
        "expected 'AuthorizationPolicy'",
        id="kind",
    ),
    pytest.param(
        EXAMPLE.replace("metadata: {name: web-read}", "metadata: {}"),
        3,
        "metadata",
        "expected the key 'name'",
        id="name-missing",
    ),
    pytest.param(
        EXAMPLE.replace("name: web-read", "name: Web_Read"),
        3,
        "metadata.name",
        "expected a name of lower-case letters",
        id="name-invalid",
    ),
    pytest.param(
        EXAMPLE.replace("metadata: {name: web-read}", "metadata: {name: web-read, namespace: x}"),
        3,
        "metadata.namespace",
        "unknown key 'namespace'; expected one of name",
        id="metadata-unknown-key",
    ),
    pytest.param(
        EXAMPLE + "status: {}\n",
        12,
        "status",
        "unknown key 'status'; expected one of apiVersion, kind, metadata, spec",
        id="top-level-unknown-key",
    ),
    pytest.param(
        HEADER.replace("spec:\n", "spec: [1]\n"),
        4,
        "spec",
        "expected a mapping (got a list)",
        id="spec-not-a-mapping",
    ),
    pytest.param(
        HEADER.replace("spec:\n", ""),
        1,
        "",
        "expected the key 'spec'",
        id="spec-missing",
    ),
    pytest.param(
        doc("dryRun: true"),
        5,
        "spec.dryRun",
        "unknown key 'dryRun'; expected one of selector, action, dry_run, rules (keys are "
        "snake_case: did you mean 'dry_run'?)",
        id="camel-case-key-hint",
    ),
    pytest.param(
        doc("actoin: DENY"),
        5,
        "spec.actoin",
        "(did you mean 'action'?)",
        id="typo-hint",
    ),
    pytest.param(
        doc("selector: {spiffe_ids: []}"),
        5,
        "spec.selector.spiffe_ids",
        "expected a non-empty list; omit the key instead",
        id="selector-empty",
    ),
    pytest.param(
        doc("selector: {}"),
        5,
        "spec.selector",
        "expected the key 'spiffe_ids'",
        id="selector-without-ids",
    ),
    pytest.param(
        doc(
            """
            selector:
              spiffe_ids:
                - spiffe://example.org/web
                - spiffe://Example.org/db
            """
        ),
        8,
        "spec.selector.spiffe_ids[1]",
        "trust domain 'Example.org' has 'E'; SPIFFE-ID §2.1 allows lower-case",
        id="selector-invalid-spiffe-id",
    ),
    pytest.param(
        doc("selector: {spiffe_ids: ['spiffe://example.org/web/*']}"),
        5,
        "spec.selector.spiffe_ids[0]",
        "has '*' in its path",
        id="selector-no-patterns",
    ),
    pytest.param(
        doc("action: allow"),
        5,
        "spec.action",
        "expected ALLOW, DENY or AUDIT (got 'allow')",
        id="action-case",
    ),
    pytest.param(
        doc("action: CUSTOM"),
        5,
        "spec.action",
        "expected ALLOW, DENY or AUDIT (got 'CUSTOM')",
        id="action-unsupported",
    ),
    pytest.param(
        doc("dry_run: 'yes please'"),
        5,
        "spec.dry_run",
        "expected true or false (got 'yes please', a string)",
        id="dry-run-not-bool",
    ),
    pytest.param(
        doc("rules: {from: []}"),
        5,
        "spec.rules",
        "expected a list (got a mapping)",
        id="rules-not-a-list",
    ),
    pytest.param(
        doc(
            """
            rules:
              - form: [{source: {principals: ["*"]}}]
            """
        ),
        6,
        "spec.rules[0].form",
        "unknown key 'form'; expected one of from, to, when (did you mean 'from'?)",
        id="rule-unknown-key",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from: []
            """
        ),
        6,
        "spec.rules[0].from",
        "expected a non-empty list; omit the key instead",
        id="from-empty",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from:
                  - principals: ["*"]
            """
        ),
        7,
        "spec.rules[0].from[0].principals",
        "unknown key 'principals'; expected one of source",
        id="from-entry-without-source",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from:
                  - source: {}
            """
        ),
        7,
        "spec.rules[0].from[0].source",
        "expected at least one of principals, not_principals",
        id="source-empty",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from:
                  - source:
                      notPrincipals: ["*"]
            """
        ),
        8,
        "spec.rules[0].from[0].source.notPrincipals",
        "(keys are snake_case: did you mean 'not_principals'?)",
        id="source-istio-spelling",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from:
                  - source:
                      namespaces: [default]
            """
        ),
        8,
        "spec.rules[0].from[0].source.namespaces",
        "unknown key 'namespaces'",
        id="source-unknown-field",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from:
                  - source:
                      principals:
                        - spiffe://example.org/frontend
                        - cluster.local/ns/default/sa/frontend
            """
        ),
        10,
        "spec.rules[0].from[0].source.principals[1]",
        "expected a SPIFFE ID like spiffe://example.org/web, got 'cluster.local/ns/default/sa/",
        id="principal-not-a-spiffe-id",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from:
                  - source:
                      principals: [42]
            """
        ),
        8,
        "spec.rules[0].from[0].source.principals[0]",
        "expected a string (got 42, an integer); quote it",
        id="principal-not-a-string",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from:
                  - source:
                      principals: ["frontend*"]
            """
        ),
        8,
        "spec.rules[0].from[0].source.principals[0]",
        "a principal prefix must start with 'spiffe://'",
        id="principal-prefix-never-matches",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from:
                  - source:
                      trust_domains: ["Example.ORG"]
            """
        ),
        8,
        "spec.rules[0].from[0].source.trust_domains[0]",
        "SPIFFE-ID §2.1 allows lower-case letters",
        id="trust-domain-upper-case",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from:
                  - source:
                      ip_blocks: [10.1.2.3/8]
            """
        ),
        8,
        "spec.rules[0].from[0].source.ip_blocks[0]",
        "has host bits set); did you mean 10.0.0.0/8?",
        id="ip-block-host-bits",
    ),
    pytest.param(
        doc(
            """
            rules:
              - to:
                  - operation:
                      ports: [80, 70000]
            """
        ),
        8,
        "spec.rules[0].to[0].operation.ports[1]",
        "expected a port number 1-65535, got 70000",
        id="port-out-of-range",
    ),
    pytest.param(
        doc(
            """
            rules:
              - to:
                  - operation:
                      ports: ["http"]
            """
        ),
        8,
        "spec.rules[0].to[0].operation.ports[0]",
        "expected a port number 1-65535, got 'http'",
        id="port-not-a-number",
    ),
    pytest.param(
        doc(
            """
            rules:
              - to:
                  - operation:
                      methods: ["*ET*"]
            """
        ),
        8,
        "spec.rules[0].to[0].operation.methods[0]",
        "'*' may only be the whole value or its first or last character",
        id="pattern-star-inside",
    ),
    pytest.param(
        doc(
            """
            rules:
              - to:
                  - operation:
                      paths: ["api/*"]
            """
        ),
        8,
        "spec.rules[0].to[0].operation.paths[0]",
        "a path starts with '/'",
        id="path-relative",
    ),
    pytest.param(
        doc(
            """
            rules:
              - to:
                  - operation:
                      paths: ["/api/../admin"]
            """
        ),
        8,
        "spec.rules[0].to[0].operation.paths[0]",
        "is not normalized",
        id="path-not-normalized",
    ),
    pytest.param(
        doc(
            """
            rules:
              - to:
                  - operation:
                      paths: ["/files/a%2fb"]
            """
        ),
        8,
        "spec.rules[0].to[0].operation.paths[0]",
        "the normalizer upper-cases escapes (RFC 3986 §6.2.2.1), so write %2F",
        id="path-lower-case-escape",
    ),
    pytest.param(
        doc(
            """
            rules:
              - to:
                  - operation:
                      paths: ["/%61dmin"]
            """
        ),
        8,
        "spec.rules[0].to[0].operation.paths[0]",
        "escapes 'a' as %61; the normalizer decodes it",
        id="path-escaped-unreserved",
    ),
    pytest.param(
        doc(
            """
            rules:
              - to:
                  - operation:
                      paths: ["/search?q=*"]
            """
        ),
        8,
        "spec.rules[0].to[0].operation.paths[0]",
        "paths are matched without the query",
        id="path-with-query",
    ),
    pytest.param(
        doc(
            """
            rules:
              - when:
                  - values: ["blue"]
            """
        ),
        7,
        "spec.rules[0].when[0]",
        "expected the key 'key'",
        id="when-without-key",
    ),
    pytest.param(
        doc(
            """
            rules:
              - when:
                  - key: request.header[x-tenant]
                    values: ["blue"]
            """
        ),
        7,
        "spec.rules[0].when[0].key",
        "expected one of request.headers[NAME], request.auth.principal",
        id="when-unknown-key",
    ),
    pytest.param(
        doc(
            """
            rules:
              - when:
                  - key: "request.headers[x tenant]"
                    values: ["blue"]
            """
        ),
        7,
        "spec.rules[0].when[0].key",
        "expected request.headers[NAME] with a header name",
        id="when-bad-header-name",
    ),
    pytest.param(
        doc(
            """
            rules:
              - when:
                  - key: source.ip
            """
        ),
        7,
        "spec.rules[0].when[0]",
        "expected values or not_values",
        id="when-without-values",
    ),
    pytest.param(
        doc(
            """
            rules:
              - when:
                  - key: source.ip
                    not_values: ["10.0.0.0/8", "localhost"]
            """
        ),
        8,
        "spec.rules[0].when[0].not_values[1]",
        "expected an IP address or CIDR block",
        id="when-source-ip-value",
    ),
    pytest.param(
        doc(
            """
            rules:
              - when:
                  - key: destination.port
                    values: [https]
            """
        ),
        8,
        "spec.rules[0].when[0].values[0]",
        "expected a port number",
        id="when-port-value",
    ),
    pytest.param(
        doc(
            """
            action: DENY
            action: ALLOW
            """
        ),
        6,
        "action",
        "expected each key once; it is repeated",
        id="duplicate-key",
    ),
    pytest.param(
        doc(
            """
            rules:
              - from: [{source: {principals: ["*"]}}
            """
        ),
        7,
        "",
        "expected valid YAML",
        id="yaml-syntax",
    ),
    pytest.param(
        doc(
            """
            selector: {spiffe_ids: &ids ["spiffe://example.org/web"]}
            rules:
              - from: [{source: {principals: *ids}}]
            """
        ),
        7,
        "",
        "expected no YAML aliases",
        id="yaml-alias",
    ),
    pytest.param(
        doc("? [a]\n: b"),
        5,
        "",
        "expected string keys (got a list)",
        id="non-string-key",
    ),
    pytest.param(
        EXAMPLE + "---\n" + EXAMPLE,
        15,
        "metadata.name",
        "expected a unique name; 'web-read' is already used in this source",
        id="duplicate-policy-name",
    ),
    pytest.param(
        "apiVersion: meshid/v1\x07\n",
        1,
        "",
        "expected printable text",
        id="control-character",
    ),
    pytest.param(
        doc("rules: " + "[" * 40 + "]" * 40),
        5,
        "",
        "expected at most 32 nested levels",
        id="too-deep",
    ),
]


@pytest.mark.parametrize(("text", "line", "path", "expected"), ERRORS)
def test_parse_error_names_source_line_key_and_expectation(
    text: str, line: int, path: str, expected: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policies(text, "web.yaml")
    err = caught.value
    assert (err.source, err.line, err.path) == ("web.yaml", line, path)
    assert expected in err.expected
    assert str(err).startswith(f"web.yaml:{line}: {path or '<document>'}: ")


# (id, spec, line, key path, fragment of the warning)
WARNINGS = [
    pytest.param(
        """
        action: DENY
        rules:
          - from: [{source: {principals: ["spiffe://example.org/batch"]}}]
            to: [{operation: {paths: ["/admin"]}}]
        """,
        7,
        "spec.rules[0]",
        "uses HTTP-only fields (paths): on an L4 (TCP) connection they are ignored and the rule "
        "denies on its other fields alone",
        id="deny-with-http-fields",
    ),
    pytest.param(
        """
        action: DENY
        rules:
          - to: [{operation: {methods: ["POST"]}}]
        """,
        7,
        "spec.rules[0]",
        "and nothing else: on an L4 (TCP) connection they are ignored, so this rule denies every "
        "L4 connection",
        id="deny-http-only",
    ),
    pytest.param(
        """
        action: AUDIT
        rules:
          - from: [{source: {request_principals: ["*"]}}]
        """,
        7,
        "spec.rules[0]",
        "so this rule audits every L4 connection",
        id="audit-http-only",
    ),
    pytest.param(
        "action: DENY",
        5,
        "spec",
        "a DENY policy without rules matches nothing and has no effect",
        id="deny-without-rules",
    ),
    pytest.param(
        """
        rules:
          - to: [{operation: {ports: [80], methods: ["get"]}}]
        """,
        6,
        "spec.rules[0].to[0].operation.methods[0]",
        "method 'get' is not upper-case; methods are case-sensitive (RFC 9110 §9.1)",
        id="lower-case-method",
    ),
]


@pytest.mark.parametrize(("spec", "line", "path", "message"), WARNINGS)
def test_warnings_are_located(spec: str, line: int, path: str, message: str) -> None:
    result = parse_policies(doc(spec), "web.yaml")
    matching = [w for w in result.warnings if w.path == path]
    assert len(matching) == 1
    assert matching[0].line == line
    assert message in matching[0].message


def test_no_warning_for_l4_only_allow_rules() -> None:
    text = doc("rules: [{from: [{source: {principals: ['*']}}], to: [{operation: {ports: [80]}}]}]")
    assert parse_policies(text, "web.yaml").warnings == ()


def test_dict_input_reports_key_path_without_line() -> None:
    document = json.loads(json.dumps(policy_to_dict(parse_policies(EXAMPLE, "x").policies[0])))
    document["spec"]["rules"][0]["from"][0]["source"]["ip_blocks"] = ["10.0.0.0/33"]
    with pytest.raises(PolicyError) as caught:
        parse_policy_dict(document, "stored:web-read")
    assert caught.value.line is None
    assert str(caught.value).startswith(
        "stored:web-read: spec.rules[0].from[0].source.ip_blocks[0]: expected an IP address"
    )


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        pytest.param([], "", "expected a mapping (got a list)", id="not-a-mapping"),
        pytest.param({1: "x"}, "", "expected string keys (got 1, an integer)", id="int-key"),
        pytest.param(
            {
                "apiVersion": "meshid/v1",
                "kind": "AuthorizationPolicy",
                "metadata": None,
                "spec": {},
            },
            "metadata",
            "expected a mapping (got None, nothing)",
            id="null-metadata",
        ),
    ],
)
def test_dict_input_errors(data: object, path: str, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy_dict(data, "stored")
    assert (caught.value.path, caught.value.expected) == (path, expected)


def test_json_round_trip() -> None:
    (policy,) = parse_policies(EXAMPLE, "web.yaml").policies
    stored = json.dumps(policy_to_dict(policy))
    assert parse_policy_dict(json.loads(stored), "stored").policies == (policy,)


def test_spec_first_line_constant_matches_the_helper() -> None:
    assert doc("action: DENY").splitlines()[SPEC_FIRST_LINE - 1] == "  action: DENY"
