"""Known bypass shapes, run through the proxy's path normalizer and then the engine.

The policy sees the path the proxy forwards (``tls_proxy.path.normalize_path``), so every shape
that names ``/admin`` to the application is denied by a DENY on ``/admin``, or refused with 400
before policy is consulted. Path matching is case-sensitive, as in Istio: ``/ADMIN`` is another
path. An ALLOW list (deny by default) is immune to the spelling games that a DENY list must
anticipate, which is why the docs recommend it.
"""

from __future__ import annotations

import pytest

from authz import Engine, Request
from tests.authz._build import engine, http, policy, rule
from tls_proxy.path import EncodedSlashes, PathError, normalize_path

DENY_LIST = engine(
    [
        policy("open", rules=[{}]),
        policy("no-admin", "DENY", [rule(operation=[{"paths": ["/admin", "/admin/*"]}])]),
    ]
)
ALLOW_LIST = engine([policy("api-only", rules=[rule(operation=[{"paths": ["/api/*"]}])])])


def decide(policies: Engine, raw: str, mode: EncodedSlashes = "reject", **request: str) -> str:
    """What the proxy does: ``"400"`` when normalization refuses, else the decision."""
    try:
        path = normalize_path(raw, encoded_slashes=mode)
    except PathError:
        return "400"
    return policies.evaluate(http(path=path, **request)).decision


@pytest.mark.parametrize(
    ("raw", "mode", "outcome"),
    [
        pytest.param("/admin", "reject", "deny", id="plain"),
        pytest.param("/api/../admin", "reject", "deny", id="dot-dot"),
        pytest.param("/api/%2e%2e/admin", "reject", "deny", id="encoded-dot-dot"),
        pytest.param("/api/%2E%2e/admin", "reject", "deny", id="encoded-dot-dot-mixed-case"),
        pytest.param("/api/.%2e/admin", "reject", "deny", id="half-encoded-dot-dot"),
        pytest.param("/../../admin", "reject", "deny", id="above-root"),
        pytest.param("//admin", "reject", "deny", id="double-slash"),
        pytest.param("/./admin", "reject", "deny", id="dot"),
        pytest.param("/admin/", "reject", "deny", id="trailing-slash"),
        pytest.param("/admin/.", "reject", "deny", id="trailing-dot"),
        pytest.param("/admin?x=/api/", "reject", "deny", id="query-ignored"),
        pytest.param("/%61dmin", "reject", "deny", id="encoded-unreserved-letter"),
        pytest.param("/api%2F..%2Fadmin", "reject", "400", id="encoded-slash-rejected"),
        pytest.param("/api%5C..%5Cadmin", "reject", "400", id="encoded-backslash-rejected"),
        pytest.param("/api\\..\\admin", "reject", "400", id="raw-backslash-rejected"),
        pytest.param("/api%2F..%2Fadmin", "decode", "deny", id="encoded-slash-decoded"),
        pytest.param("/api%5c..%5cadmin", "decode", "deny", id="encoded-backslash-decoded"),
        pytest.param("/api/..;/admin", "reject", "400", id="tomcat-dot-dot-semicolon"),
        pytest.param("/admin%00", "reject", "400", id="encoded-nul"),
        pytest.param("/admin\x00", "reject", "400", id="raw-nul"),
        pytest.param("/admin\r\nx: y", "reject", "400", id="crlf"),
        pytest.param("/admin#frag", "reject", "400", id="fragment"),
        pytest.param("admin", "reject", "400", id="not-origin-form"),
        # Double encoding is decoded once: the app that decodes once more sees "%2e%2e" as data.
        pytest.param("/api/%252e%252e/admin", "reject", "allow", id="double-encoding-is-data"),
        # Case tricks: paths are case-sensitive (Istio too). A DENY list must spell each case...
        pytest.param("/ADMIN", "reject", "allow", id="case-deny-list-misses-other-case"),
        pytest.param("/Admin/x", "reject", "allow", id="case-deny-list-misses-mixed-case"),
    ],
)
def test_deny_list(raw: str, mode: EncodedSlashes, outcome: str) -> None:
    assert decide(DENY_LIST, raw, mode) == outcome


@pytest.mark.parametrize(
    ("raw", "outcome"),
    [
        pytest.param("/api/users", "allow", id="allowed-path"),
        pytest.param("/api/../admin", "deny", id="dot-dot-leaves-the-allowed-prefix"),
        pytest.param("/api/%2e%2e/admin", "deny", id="encoded-dot-dot"),
        pytest.param("//api/../admin", "deny", id="double-slash-dot-dot"),
        pytest.param("/ADMIN", "deny", id="case-allow-list-denies-other-case"),
        pytest.param("/API/users", "deny", id="case-allow-list-is-exact"),
        pytest.param("/admin;jsessionid=1", "deny", id="path-parameter"),
        pytest.param("/api%2Fusers", "400", id="encoded-slash"),
    ],
)
def test_allow_list(raw: str, outcome: str) -> None:
    assert decide(ALLOW_LIST, raw) == outcome


def test_keep_mode_forwards_encoded_slashes_as_data() -> None:
    # With "keep" the policy and the app both see one segment "api%2F..%2Fadmin"; safe only for
    # apps that never decode %2F into a separator. That is why "reject" is the default.
    assert normalize_path("/api%2F..%2Fadmin", encoded_slashes="keep") == "/api%2F..%2Fadmin"
    assert decide(DENY_LIST, "/api%2F..%2Fadmin", "keep") == "allow"
    assert decide(ALLOW_LIST, "/api%2F..%2Fadmin", "keep") == "deny"


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("admin.example.org", id="plain"),
        pytest.param("ADMIN.Example.ORG", id="upper-case"),
        pytest.param("admin.example.org:8443", id="with-port"),
        pytest.param("admin.example.org.", id="trailing-dot"),
        pytest.param("Admin.Example.Org.:443", id="all-at-once"),
    ],
)
def test_host_tricks_do_not_dodge_a_deny(host: str) -> None:
    policies = engine(
        [
            policy("open", rules=[{}]),
            policy("no-admin-host", "DENY", [rule(operation=[{"hosts": ["admin.example.org"]}])]),
        ]
    )
    assert policies.evaluate(http(host=host)).policy == "no-admin-host"


def test_method_case_is_exact_so_allow_lists_hold() -> None:
    get_only = engine([policy("get", rules=[rule(operation=[{"methods": ["GET"]}])])])
    assert get_only.evaluate(http(method="GET")).allowed
    assert not get_only.evaluate(http(method="get")).allowed


def test_identity_comes_from_the_peer_not_from_headers() -> None:
    only_frontend = engine(
        [policy("fe", rules=[rule(source=[{"principals": ["spiffe://example.org/frontend"]}])])]
    )
    forged = Request(
        destination="spiffe://example.org/web",
        source_principal="spiffe://example.org/batch",
        headers={"x-forwarded-client-cert": "URI=spiffe://example.org/frontend"},
        method="GET",
        path="/",
    )
    assert not only_frontend.evaluate(forged).allowed
