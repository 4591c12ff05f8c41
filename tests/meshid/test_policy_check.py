"""``meshid policy check``: the real CLI in a subprocess, policy files in a temporary folder.

The engine's semantics are tested in ``tests/authz``; here the shell around it: reading files,
normalizing the path as the proxy does, printing the verdict and its explanation, and the exit
status scripts rely on (0 allowed, 2 denied, 1 error).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import meshid

pytestmark = pytest.mark.slow

TD = "example.org"
WEB = f"spiffe://{TD}/web"
DB = f"spiffe://{TD}/db"
CACHE = f"spiffe://{TD}/cache"  # no ALLOW policy selects it: its posture decides
FRONTEND = f"spiffe://{TD}/frontend"
BATCH = f"spiffe://{TD}/batch"

WEB_POLICIES = f"""\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: web-read}}
spec:
  selector: {{spiffe_ids: ["{WEB}"]}}
  rules:
    - from: [{{source: {{principals: ["{FRONTEND}"]}}}}]
      to: [{{operation: {{methods: ["GET"], paths: ["/api/*"]}}}}]
---
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin}}
spec:
  selector: {{spiffe_ids: ["{WEB}"]}}
  action: DENY
  rules:
    - to: [{{operation: {{paths: ["/admin", "/admin/*"]}}}}]
"""

TRIAL_POLICIES = f"""\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: deny-legacy}}
spec:
  selector: {{spiffe_ids: ["{WEB}"]}}
  action: DENY
  dry_run: true
  rules:
    - to: [{{operation: {{paths: ["/api/legacy/*"]}}}}]
---
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: audit-web}}
spec:
  selector: {{spiffe_ids: ["{WEB}"]}}
  action: AUDIT
  rules: [{{}}]
"""

DB_POLICIES = f"""\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: db-access}}
spec:
  selector: {{spiffe_ids: ["{DB}"]}}
  rules:
    - from: [{{source: {{principals: ["{FRONTEND}"]}}}}]
      to: [{{operation: {{ports: [5432]}}}}]
    - from: [{{source: {{principals: ["{BATCH}"]}}}}]
      to: [{{operation: {{methods: ["GET"]}}}}]
"""

JWT_POLICIES = f"""\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: web-jwt}}
spec:
  selector: {{spiffe_ids: ["{WEB}"]}}
  rules:
    - from: [{{source: {{request_principals: ["{BATCH}"]}}}}]
      when: [{{key: "request.auth.claims[aud]", values: ["reports"]}}]
"""

BAD_POLICY = f"""\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: web-read}}
spec:
  rules:
    - from: [{{source: {{notPrincipals: ["{BATCH}"]}}}}]
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, text in [
        ("web", WEB_POLICIES),
        ("trial", TRIAL_POLICIES),
        ("db", DB_POLICIES),
        ("jwt", JWT_POLICIES),
        ("bad", BAD_POLICY),
    ]:
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(text)
    return out


def check(
    files: dict[str, Path], *args: str, using: tuple[str, ...] = ("web", "trial", "db")
) -> subprocess.CompletedProcess[str]:
    file_args = [arg for name in using for arg in ("--file", str(files[name]))]
    return meshid("policy", "check", *file_args, *args)


def lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip() for line in result.stdout.splitlines()]


def assert_one_error_line(result: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("meshid: ")
    for part in parts:
        assert part in result.stderr


def test_allowed_names_the_policy_and_rule(files: dict[str, Path]) -> None:
    result = check(files, "--source", FRONTEND, "--destination", WEB, "--path", "/api/items")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = lines(result)
    assert out[0] == "ALLOW by policy web-read rule 0"
    assert f"request: GET /api/items to {WEB}" in out
    assert f"source:  {FRONTEND}" in out
    assert "audit:   audit-web rule 0 matched" in out
    # No normalization happened, so no path line.
    assert not any(line.startswith("path:") for line in out)


def test_denied_by_a_deny_policy_names_it(files: dict[str, Path]) -> None:
    result = check(files, "--source", FRONTEND, "--destination", WEB, "--path", "/admin/users")
    assert result.returncode == 2, result.stderr
    assert lines(result)[0] == "DENY by policy no-admin rule 0"


@pytest.mark.parametrize(
    ("args", "headline"),
    [
        pytest.param(
            ["--source", FRONTEND, "--posture", "deny"],
            "DENY: no ALLOW policy selects the workload: default posture deny",
            id="posture-deny",
        ),
        pytest.param(
            ["--source", "none"],  # the shipped default posture, all-authenticated
            "DENY: no ALLOW policy selects the workload: default posture all-authenticated "
            "refuses a peer without an SVID",
            id="all-authenticated-no-svid",
        ),
    ],
)
def test_denied_by_the_default_posture(
    files: dict[str, Path], args: list[str], headline: str
) -> None:
    result = check(files, "--destination", CACHE, *args)
    assert result.returncode == 2, result.stderr
    assert lines(result)[0] == headline


def test_dry_run_is_reported_and_not_enforced(files: dict[str, Path]) -> None:
    result = check(files, "--source", FRONTEND, "--destination", WEB, "--path", "/api/legacy/x")
    assert result.returncode == 0, result.stderr
    out = lines(result)
    assert out[0] == "ALLOW by policy web-read rule 0"
    assert (
        "dry-run: deny-legacy (DENY, rule 0 matched) would deny: "
        'would be denied by DENY policy "deny-legacy" rule 0' in out
    )


@pytest.mark.parametrize(
    ("source", "status", "headline"),
    [
        pytest.param(FRONTEND, 0, "ALLOW by policy db-access rule 0", id="port-rule-applies"),
        # Istio: an ALLOW rule with HTTP-only fields (methods) never matches a TCP connection.
        pytest.param(
            BATCH, 2, "DENY: no ALLOW policy matched: 1 considered", id="http-rule-ignored"
        ),
    ],
)
def test_l4_connection(files: dict[str, Path], source: str, status: int, headline: str) -> None:
    result = check(files, "--source", source, "--destination", DB, "--l4", "--port", "5432")
    assert result.returncode == status, result.stderr
    out = lines(result)
    assert out[0] == headline
    assert f"request: TCP connection to {DB} port 5432" in out
    assert any(
        line.startswith(f"warning: {files['db']}:9: spec.rules[1]:") and "never matches" in line
        for line in out
    ), out


def test_l4_refuses_http_attributes(files: dict[str, Path]) -> None:
    result = check(files, "--destination", DB, "--l4", "--path", "/x")
    assert_one_error_line(result, "--l4", "--path")


def test_parse_error_is_one_precise_line(files: dict[str, Path]) -> None:
    result = check(files, "--destination", WEB, using=("web", "bad"))
    assert_one_error_line(
        result,
        f"{files['bad']}:6: spec.rules[0].from[0].source.notPrincipals: unknown key",
        "did you mean 'not_principals'?",
    )


def test_bypass_path_is_judged_normalized(files: dict[str, Path]) -> None:
    # Unnormalized, /api/../admin would match web-read's /api/*; the proxy forwards /admin.
    result = check(files, "--source", FRONTEND, "--destination", WEB, "--path", "/api/../admin")
    assert result.returncode == 2, result.stderr
    out = lines(result)
    assert out[0] == "DENY by policy no-admin rule 0"
    assert f"request: GET /admin to {WEB}" in out
    assert any(line.startswith("path:    /api/../admin is normalized to /admin;") for line in out)


def test_encoded_slash_is_refused_as_the_proxy_would(files: dict[str, Path]) -> None:
    result = check(files, "--destination", WEB, "--path", "/api%2F..%2Fadmin")
    assert_one_error_line(result, "'/api%2F..%2Fadmin'", "400 Bad Request", "%2F")


def test_json_output(files: dict[str, Path]) -> None:
    result = check(
        files,
        "--source", FRONTEND, "--destination", WEB, "--path", "/api/legacy/./x?q=1",
        "--header", "X-Tenant=blue", "--output", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert list(data)[:4] == ["decision", "policy", "rule", "reason"]
    assert data["decision"] == "allow"
    assert data["policy"] == "web-read"
    assert data["rule"] == 0
    assert data["reason"] == 'allowed by ALLOW policy "web-read" rule 0'
    assert data["dry_run"] == [
        {
            "policy": "deny-legacy",
            "action": "DENY",
            "rule": 0,
            "decision": "deny",
            "reason": 'would be denied by DENY policy "deny-legacy" rule 0',
        }
    ]
    assert data["audit"] == [{"policy": "audit-web", "rule": 0}]
    assert {(w["source"], w["line"], w["path"]) for w in data["warnings"]} >= {
        (str(files["web"]), 7, "spec.rules[0]"),
        (str(files["db"]), 9, "spec.rules[1]"),
    }
    assert data["normalized_path"] == "/api/legacy/x?q=1"
    assert data["request"]["headers"] == {"x-tenant": "blue"}
    assert data["request"]["l4"] is False


def test_usage_error_exits_1_not_2(files: dict[str, Path]) -> None:
    # 2 means "denied"; click's own usage status must not be mistaken for it.
    result = check(files, "--source", FRONTEND)
    assert result.returncode == 1
    assert "--destination" in result.stderr


def test_a_jwt_svid_is_given_as_request_principal_and_claims(files: dict[str, Path]) -> None:
    base = ("--source", FRONTEND, "--destination", WEB)
    allowed = check(
        files,
        *base,
        "--request-principal",
        BATCH,
        "--claims",
        '{"aud": ["reports"]}',
        using=("jwt",),
    )
    assert allowed.returncode == 0, allowed.stderr
    assert lines(allowed)[0] == "ALLOW by policy web-jwt rule 0"
    assert f"jwt:     {BATCH} (validated JWT-SVID)" in lines(allowed)
    # without the claim, or without a token, the ALLOW policy does not match
    assert check(files, *base, "--request-principal", BATCH, using=("jwt",)).returncode == 2
    denied = check(files, *base, "--output", "json", using=("jwt",))
    assert denied.returncode == 2
    assert json.loads(denied.stdout)["request"]["request_principal"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--claims", "{}"), "--claims: give --request-principal too"),
        (("--request-principal", BATCH, "--claims", "[1]"), "--claims: expected a JSON object"),
        (("--request-principal", BATCH, "--claims", "{x"), "--claims: expected a JSON object"),
        (("--request-principal", "batch"), "--request-principal"),
        (("--l4", "--request-principal", BATCH), "drop --request-principal"),
    ],
)
def test_bad_jwt_options_are_one_line(
    files: dict[str, Path], args: tuple[str, ...], message: str
) -> None:
    result = check(files, "--source", FRONTEND, "--destination", WEB, *args, using=("jwt",))
    assert_one_error_line(result, message)
