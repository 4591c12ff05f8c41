"""The proxy configuration: valid shapes and one-line errors naming file, key and expectation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tls_proxy import ConfigError, load_config, parse_config

GOOD: dict[str, Any] = {
    "identity": {"cert": "svid.pem", "key": "svid.key", "bundle": "bundle.pem"},
    "admin": {"listen": "127.0.0.1:15000"},
    "inbound": [{"name": "web", "listen": "127.0.0.1:18443", "forward": "127.0.0.1:18080"}],
    "outbound": [
        {
            "name": "to-web",
            "listen": "127.0.0.1:18001",
            "upstream": ["127.0.0.1:18443"],
            "expect_ids": ["spiffe://example.org/web"],
            "protocol": "tcp",
        }
    ],
    "policy": {"file": "policy.yaml"},
    "trust_domain": "example.org",
    "default_posture": "deny",
}


def test_the_issue_example_parses_and_resolves_files_next_to_the_config(tmp_path: Path) -> None:
    config = parse_config(GOOD, "proxy.yaml", tmp_path)
    assert config.identity.cert == tmp_path / "svid.pem"
    assert config.policy.file == tmp_path / "policy.yaml"
    assert config.outbound[0].expect_ids == ("spiffe://example.org/web",)
    assert config.default_posture == "deny"


def test_workload_api_identity_parses() -> None:
    config = parse_config({"identity": {"workload_api": "unix:///run/agent.sock"}}, "p.yaml")
    assert not config.identity.from_files


def _with(path: str, value: Any) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(GOOD)
    target: Any = data
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return data


_DELETE = object()
ERRORS = [
    ("bad-listen", "inbound.0.listen", "x", "inbound[0].listen: expected HOST:PORT"),
    ("missing-forward", "inbound.0.forward", _DELETE, "inbound[0].forward: required key"),
    ("bad-protocol", "inbound.0.protocol", "udp", "inbound[0].protocol: expected 'tcp', 'http'"),
    ("no-upstream", "outbound.0.upstream", [], "outbound[0].upstream: expected"),
    ("bad-id", "outbound.0.expect_ids", ["web"], "outbound[0].expect_ids: expected a SPIFFE ID"),
    ("unknown-key", "policy.files", "x", "policy.files: unknown key"),
    ("half-files", "identity.key", _DELETE, "identity: expected cert, key and bundle together"),
    ("bad-td", "trust_domain", "Example.ORG", "trust_domain: expected a lower-case"),
    ("bad-posture", "default_posture", "maybe", "default_posture: expected 'deny'"),
    ("bad-endpoint", "identity", {"workload_api": "/tmp/x"}, "identity.workload_api: expected"),
    ("dup-names", "outbound.0.name", "web", "expected unique listener names"),
    ("h2-connections", "http", {"h2_max_connections": 0}, "http.h2_max_connections: expected gre"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors_name_file_key_and_expectation(path: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_with(path, value), "proxy.yaml")
    text = str(caught.value)
    assert text.startswith("proxy.yaml: ")
    assert message in text
    assert "\n" not in text


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("admin:\n  listen: [unclosed\n")
    with pytest.raises(ConfigError, match=r"proxy\.yaml:\d+: <document>: expected valid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="<top level>: expected a mapping"):
        parse_config(["a"], "proxy.yaml")
