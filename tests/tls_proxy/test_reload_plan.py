"""``plan_reload``: what a new configuration changes, and what it cannot change live."""

from __future__ import annotations

from typing import Any

import pytest

from tls_proxy import parse_config
from tls_proxy.config import ProxyConfig
from tls_proxy.reload import plan_reload

WEB = {"name": "web", "listen": "127.0.0.1:18443", "forward": "127.0.0.1:18080"}
TO_WEB = {
    "name": "to-web",
    "listen": "127.0.0.1:18001",
    "upstream": ["127.0.0.1:18443"],
    "expect_ids": ["spiffe://example.org/web"],
}


def config(**sections: Any) -> ProxyConfig:
    base: dict[str, Any] = {
        "identity": {"cert": "c.pem", "key": "k.pem", "bundle": "b.pem"},
        "inbound": [WEB],
        "outbound": [TO_WEB],
    }
    return parse_config({**base, **sections}, "proxy.yaml")


def test_the_same_config_plans_nothing() -> None:
    plan = plan_reload(config(), config())
    assert plan.empty
    assert not plan.refused


def test_listeners_added_removed_moved_and_updated() -> None:
    old = config(inbound=[WEB, {**WEB, "name": "gone", "listen": "127.0.0.1:1"}])
    new = config(
        inbound=[
            {**WEB, "forward": "127.0.0.1:9090"},
            {**WEB, "name": "new", "listen": "127.0.0.1:2"},
        ],
        outbound=[{**TO_WEB, "listen": "127.0.0.1:18002"}],
    )
    plan = plan_reload(old, new)
    assert not plan.refused
    assert [c.name for c in plan.add] == ["new"]
    assert plan.remove == ("gone",)
    assert [c.name for c in plan.move] == ["to-web"]
    assert [(c.name, getattr(c, "forward", None)) for c in plan.update] == [
        ("web", "127.0.0.1:9090")
    ]
    assert plan.changed_keys == ()
    assert plan.summary()["moved"] == ["to-web"]


def test_a_listener_that_changes_direction_is_removed_and_added() -> None:
    new = config(inbound=[], outbound=[TO_WEB, {**TO_WEB, "name": "web", "listen": "127.0.0.1:3"}])
    plan = plan_reload(config(), new)
    assert plan.remove == ("web",)
    assert [c.name for c in plan.add] == ["web"]


@pytest.mark.parametrize(
    ("sections", "changed", "chain"),
    [
        ({"debug": True}, ("debug",), True),
        ({"access_log": {"path": None}}, ("access_log",), True),
        ({"default_posture": "deny"}, ("default_posture",), False),
        ({"policy": {"file": "other.yaml"}}, ("policy",), False),
        ({"timeouts": {"idle": 30}}, ("timeouts",), False),
        ({"http": {"max_headers": 50}}, ("http",), False),
        ({"log_level": "debug"}, ("log_level",), False),
        ({"jwt": {"bundle": "jwt.json"}}, ("jwt",), True),
    ],
)
def test_live_settings(sections: dict[str, Any], changed: tuple[str, ...], chain: bool) -> None:
    plan = plan_reload(config(), config(**sections))
    assert not plan.refused
    assert plan.changed_keys == changed
    assert plan.rebuild_chain is chain


@pytest.mark.parametrize(
    ("sections", "restart"),
    [
        ({"identity": {"cert": "other.pem", "key": "k.pem", "bundle": "b.pem"}}, ("identity",)),
        ({"admin": {"listen": "127.0.0.1:15001"}}, ("admin",)),
        ({"trust_domain": "example.com"}, ("trust_domain",)),
        ({"policy": {"server": "127.0.0.1:8081"}}, ("policy.server",)),
    ],
)
def test_what_needs_a_restart_refuses_the_whole_reload(
    sections: dict[str, Any], restart: tuple[str, ...]
) -> None:
    new = config(**sections, inbound=[])  # a listener change rides along: refused with it
    plan = plan_reload(config(), new)
    assert plan.refused
    assert plan.restart_keys == restart
