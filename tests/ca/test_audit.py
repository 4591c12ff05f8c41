"""The audit chain's hash format (ca.audit): pinned, because every stored hash depends on it."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ca.audit import GENESIS_HASH, canonical_details, event_hash

AT = datetime(2026, 1, 1, 0, 0, 0, 250, tzinfo=UTC)


def _reference_hash(
    seq: int, at: datetime, kind: str, actor: str, spiffe_id: str | None, details: dict[str, Any]
) -> str:
    """The format as first written: json.dumps with these exact options, then SHA-256."""
    details_json = json.dumps(details, sort_keys=True, separators=(",", ":"), default=str)
    body = json.dumps(
        [GENESIS_HASH, seq, at.isoformat(), kind, actor, spiffe_id, details_json],
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()


def test_known_answers() -> None:
    details = {
        "serial": "0x1f",
        "not_after": "2026-01-01T01:00:00+00:00",
        "authority_id": "x509-1",
        "n": 3,
        "l": ["b", "a"],
        "u": "é",
    }
    details_json = canonical_details(details)
    assert details_json == (
        '{"authority_id":"x509-1","l":["b","a"],"n":3,"not_after":"2026-01-01T01:00:00+00:00",'
        '"serial":"0x1f","u":"\\u00e9"}'
    )
    assert (
        event_hash(
            seq=7,
            at=AT,
            kind="x509_svid.issued",
            actor="uid:0",
            spiffe_id="spiffe://example.org/web",
            details_json=details_json,
            prev_hash="ab" * 32,
        )
        == "16e9ec307247748cb150e7877ba26ef73227338dbb9086feae0f6011b8d41ee2"
    )
    assert (
        event_hash(
            seq=1,
            at=datetime(2026, 1, 1, tzinfo=UTC),
            kind="admin.login",
            actor="uid:0",
            spiffe_id=None,
            details_json=canonical_details({}),
            prev_hash=GENESIS_HASH,
        )
        == "1d74797aa1368fb562194f19b128a51ff21981dac1fd9a3961124a55e2e5aa9d"
    )


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    seq=st.integers(min_value=1, max_value=2**62),
    offset_minutes=st.integers(min_value=-720, max_value=720),
    kind=st.text(),
    actor=st.text(),
    spiffe_id=st.none() | st.text(),
    details=st.dictionaries(st.text(), _JSON_VALUES | st.datetimes(), max_size=4),
)
def test_hash_matches_the_reference_format(
    seq: int,
    offset_minutes: int,
    kind: str,
    actor: str,
    spiffe_id: str | None,
    details: dict[str, Any],
) -> None:
    at = AT.astimezone(timezone(timedelta(minutes=offset_minutes)))
    got = event_hash(
        seq=seq,
        at=at,
        kind=kind,
        actor=actor,
        spiffe_id=spiffe_id,
        details_json=canonical_details(details),
        prev_hash=GENESIS_HASH,
    )
    assert got == _reference_hash(seq, at, kind, actor, spiffe_id, details)
