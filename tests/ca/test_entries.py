"""Entry validation: a table of broken rules, and hypothesis over free-form IDs and selectors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe import SpiffeId, TrustDomain

from ca.entries import EntrySpec, Selector, parse_spiffe_id, validate_entry
from ca.errors import InvalidArgument

TD = TrustDomain("example.org")
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def spec(**overrides: object) -> EntrySpec:
    base: dict[str, object] = {
        "spiffe_id": "spiffe://example.org/web",
        "parent_id": "spiffe://example.org/node",
        "selectors": ["unix:uid:1000"],
    }
    base.update(overrides)
    return EntrySpec(**base)  # type: ignore[arg-type]


def test_valid_entry_normalises() -> None:
    e = validate_entry(
        spec(selectors=["unix:uid:1", "k8s:ns:default", "unix:uid:1"], dns_names=["Web.Local"]), TD
    )
    assert [str(s) for s in e.selectors] == ["k8s:ns:default", "unix:uid:1"]
    assert e.dns_names == ("web.local",)
    assert e.x509_svid_ttl is None


@pytest.mark.parametrize(
    ("overrides", "field", "rule"),
    [
        ({"spiffe_id": "spiffe://example.org"}, "spiffe_id", "must have a path"),
        ({"spiffe_id": "spiffe://Example.org/web"}, "spiffe_id", "lowercase"),
        ({"spiffe_id": "SPIFFE://example.org/web"}, "spiffe_id", "lowercase"),
        ({"spiffe_id": "spiffe://example.org/a//b"}, "spiffe_id", "empty segments"),
        ({"spiffe_id": "spiffe://example.org/a/../b"}, "spiffe_id", "are not allowed"),
        ({"spiffe_id": "spiffe://example.org/a%20b"}, "spiffe_id", "invalid character"),
        ({"spiffe_id": "spiffe://user@example.org/a"}, "spiffe_id", "invalid"),
        ({"spiffe_id": "spiffe://example.org:443/a"}, "spiffe_id", "invalid"),
        ({"spiffe_id": "spiffe://example.org/a?x=1"}, "spiffe_id", "invalid"),
        ({"spiffe_id": "https://example.org/a"}, "spiffe_id", "invalid"),
        ({"spiffe_id": "spiffe://example.org/" + "a" * 2048}, "spiffe_id", "2048 bytes"),
        ({"spiffe_id": "spiffe://other.org/a"}, "spiffe_id", "trust domain"),
        ({"spiffe_id": "spiffe://example.org/meshid/agent/x"}, "spiffe_id", "reserved"),
        ({"parent_id": "spiffe://other.org/node"}, "parent_id", "trust domain"),
        ({"parent_id": 7}, "parent_id", "string"),
        ({"selectors": []}, "selectors", "at least one"),
        ({"selectors": "unix:uid:1"}, "selectors", "at least one"),
        ({"selectors": ["unix"]}, "selectors", "type:value"),
        ({"selectors": ["Unix:uid:1"]}, "selectors", "type must match"),
        ({"selectors": ["unix:"]}, "selectors", "must not be empty"),
        ({"selectors": ["unix:a\nb"]}, "selectors", "control characters"),
        ({"selectors": ["unix:" + "x" * 1025]}, "selectors", "at most 1024"),
        ({"selectors": [f"unix:uid:{i}" for i in range(65)]}, "selectors", "at most 64"),
        ({"x509_svid_ttl": -1}, "x509_svid_ttl", r"0 \(server default\)"),
        ({"x509_svid_ttl": 31 * 86400}, "x509_svid_ttl", r"0 \(server default\)"),
        ({"jwt_svid_ttl": True}, "jwt_svid_ttl", "whole number"),
        ({"dns_names": ["-bad.example"]}, "dns_names", "RFC 1123"),
        ({"dns_names": ["a" * 64 + ".example"]}, "dns_names", "RFC 1123"),
        ({"hint": "has space"}, "hint", "printable"),
        ({"hint": "h" * 129}, "hint", "at most 128"),
        ({"federates_with": ["Bad Domain"]}, "federates_with", "invalid trust domain"),
        ({"federates_with": ["example.org"]}, "federates_with", "own trust domain"),
        ({"expires_at": datetime(2030, 1, 1)}, "expires_at", "time zone"),
        ({"expires_at": NOW - timedelta(seconds=1)}, "expires_at", "future"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_broken_rules_name_the_field(overrides: dict[str, object], field: str, rule: str) -> None:
    with pytest.raises(InvalidArgument, match=rule) as info:
        validate_entry(spec(**overrides), TD, now=NOW)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_as_spiffe_id_is_accepted_or_refused_cleanly(text: str) -> None:
    try:
        parsed = parse_spiffe_id(text, "spiffe_id")
    except InvalidArgument as err:
        assert err.field == "spiffe_id"
        return
    # whatever we accept is canonical and survives a round trip through py-spiffe
    assert str(parsed) == text
    assert SpiffeId(str(parsed)) == parsed


_segment = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", ".."))


@settings(max_examples=200, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=8))
def test_every_valid_path_is_accepted(segments: list[str]) -> None:
    sid = "spiffe://example.org/" + "/".join(segments)
    if sid.startswith("spiffe://example.org/meshid/"):
        return
    entry = validate_entry(spec(spiffe_id=sid), TD)
    assert str(entry.spiffe_id) == sid


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100))
def test_any_selector_text_parses_or_names_the_field(text: str) -> None:
    try:
        sel = Selector.parse(text)
    except InvalidArgument as err:
        assert err.field == "selectors"
        return
    assert str(sel) == text
    assert Selector.parse(str(sel)) == sel
