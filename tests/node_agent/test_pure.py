"""The agent's pure core: renewal planning and applying the sync stream."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_agent.rotation import (
    JITTER_FRACTION,
    MIN_CHECK_INTERVAL,
    HeldSvid,
    WantedEntry,
    plan_renewals,
    renew_at,
)
from node_agent.sync_state import AgentEntry, BundleDoc, SyncState, SyncUpdate

T0 = datetime(2030, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def held(
    entry_id: str, revision: int = 1, start: datetime = T0, life: timedelta = HOUR
) -> HeldSvid:
    return HeldSvid(entry_id, revision, start, start + life, start + life / 2)


@pytest.mark.parametrize(
    ("svids", "wanted", "now", "sign", "drop"),
    [
        ({}, [WantedEntry("a", 1)], T0, ("a",), ()),
        ({"a": held("a")}, [WantedEntry("a", 1)], T0 + HOUR / 4, (), ()),
        ({"a": held("a")}, [WantedEntry("a", 1)], T0 + HOUR / 2, ("a",), ()),
        ({"a": held("a")}, [WantedEntry("a", 2)], T0, ("a",), ()),
        ({"a": held("a")}, [WantedEntry("a", 1)], T0 + 2 * HOUR, ("a",), ()),
        ({"a": held("a"), "b": held("b")}, [WantedEntry("a", 1)], T0, (), ("b",)),
    ],
    ids=["missing", "fresh", "half-life", "entry-changed", "expired", "entry-removed"],
)
def test_plan(
    svids: dict[str, HeldSvid],
    wanted: list[WantedEntry],
    now: datetime,
    sign: tuple[str, ...],
    drop: tuple[str, ...],
) -> None:
    plan = plan_renewals(svids, wanted, now)
    assert plan.sign == sign and plan.drop == drop
    assert plan.next_check >= now + MIN_CHECK_INTERVAL


def test_tainted_authority_renews_at_once() -> None:
    svid = HeldSvid("a", 1, T0, T0 + HOUR, T0 + HOUR / 2, authority_key_id=b"k1")
    plan = plan_renewals({"a": svid}, [WantedEntry("a", 1)], T0, tainted_authorities={b"k1"})
    assert plan.sign == ("a",)


def test_next_check_is_the_earliest_renewal() -> None:
    life = timedelta(seconds=40)  # renewals 20 s apart, inside the 30 s re-plan ceiling
    svids = {"a": held("a", life=life), "b": held("b", start=T0 - life / 4, life=life)}
    plan = plan_renewals(svids, [WantedEntry("a", 1), WantedEntry("b", 1)], T0)
    assert plan.next_check == svids["b"].renew_at
    assert plan_renewals({"a": held("a")}, [WantedEntry("a", 1)], T0).next_check == T0 + timedelta(
        seconds=30
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=10**7), st.integers(min_value=0, max_value=2**32))
def test_jitter_stays_within_ten_percent(seconds: int, seed: int) -> None:
    life = timedelta(seconds=seconds)
    at = renew_at(T0, T0 + life, random.Random(seed))
    assert abs((at - T0) / life - 0.5) <= JITTER_FRACTION + 1e-9


def entry(entry_id: str, revision: int = 1) -> AgentEntry:
    return AgentEntry(
        entry_id, f"spiffe://example.org/{entry_id}", "spiffe://example.org/agent",
        frozenset({"unix:uid:1"}), 0, 0, (), "", (), revision,
    )  # fmt: skip


def test_snapshot_in_chunks_applies_only_when_complete() -> None:
    state = SyncState()
    state.apply(SyncUpdate(revision=5, full=True, more=False, upserts=[entry("old")]))
    first = state.apply(SyncUpdate(revision=9, full=True, more=True, upserts=[entry("a")]))
    assert not first.complete and set(state.entries) == {"old"}, "half a snapshot changes nothing"
    done = state.apply(SyncUpdate(revision=9, full=True, more=False, upserts=[entry("b")]))
    assert done.complete and done.entries_changed
    assert set(state.entries) == {"a", "b"} and state.revision == 9


def test_changes_and_bundles() -> None:
    state = SyncState()
    state.apply(SyncUpdate(revision=1, full=True, more=False, upserts=[entry("a"), entry("b")]))
    applied = state.apply(
        SyncUpdate(
            revision=3, full=False, more=False, upserts=[entry("a", 3)], deleted_ids=["b", "nope"],
            bundle=BundleDoc("example.org", b"{}", 2), federated_bundles=[],
        )
    )  # fmt: skip
    assert applied.entries_changed and applied.bundles_changed
    assert state.entries["a"].revision == 3 and "b" not in state.entries
    same = state.apply(
        SyncUpdate(revision=4, full=False, more=False, bundle=BundleDoc("example.org", b"{}", 2))
    )
    assert not same.entries_changed and not same.bundles_changed and state.revision == 4
