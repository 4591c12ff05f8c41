"""Authority rotation: the pure planner, then the service stepped by an injected clock.

The service tests walk prepare → activate → taint → revoke and check at every step that each
SVID still inside its validity verifies against the bundle of that moment: no gap in trust.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from spiffe import JwtBundle, SpiffeId, TrustDomain

from ca.authority import (
    Activate,
    AuthorityKind,
    Expire,
    Prepare,
    Slot,
    Status,
    plan,
)
from ca.bundle import jwt_jwks
from ca.datastore import Datastore
from ca.errors import AuthorityUnavailable, Conflict
from ca.jwtsvid import validate_jwt_svid
from ca.keys import KeyType, MemoryKeyManager, generate_key
from ca.service import CaService, CaSettings, X509Request
from ca.validation import verify_chain

T0 = datetime(2030, 1, 1, tzinfo=UTC)
TTL = timedelta(hours=24)
X = AuthorityKind.X509
J = AuthorityKind.JWT


def slot(sid: str, status: Status, start: timedelta, kind: AuthorityKind = X) -> Slot:
    return Slot(sid, kind, status, T0 + start, T0 + start + TTL)


@pytest.mark.parametrize(
    ("slots", "at", "expected"),
    [
        ([], timedelta(0), [Prepare(X), Activate(None, X), Prepare(J), Activate(None, J)]),
        ([slot("a", Status.ACTIVE, timedelta(0))], timedelta(hours=11), []),
        ([slot("a", Status.ACTIVE, timedelta(0))], timedelta(hours=12), [Prepare(X)]),
        (
            [
                slot("a", Status.ACTIVE, timedelta(0)),
                slot("b", Status.PREPARED, timedelta(hours=12)),
            ],
            timedelta(hours=19, minutes=59),
            [],
        ),
        (
            [
                slot("a", Status.ACTIVE, timedelta(0)),
                slot("b", Status.PREPARED, timedelta(hours=12)),
            ],
            timedelta(hours=20),
            [Activate("b", X)],
        ),
        (
            [
                slot("a", Status.ACTIVE, timedelta(0)),
                slot("b", Status.PREPARED, timedelta(hours=12)),
            ],
            timedelta(hours=30),  # server was down past "a"'s life: the prepared one signs at once
            [Activate("b", X)],
        ),
        (
            [slot("a", Status.OLD, timedelta(0)), slot("b", Status.ACTIVE, timedelta(hours=12))],
            timedelta(hours=24),  # "b" is half-way too: its successor is prepared in the same pass
            [Prepare(X), Expire("a", X)],
        ),
        (
            [slot("a", Status.ACTIVE, timedelta(0))],
            timedelta(hours=25),  # down past the active one's life with nothing prepared
            [Prepare(X), Activate(None, X)],
        ),
    ],
    ids=[
        "first-start",
        "early",
        "prepare-at-half",
        "prepared-waits",
        "activate-at-one-sixth",
        "late-activation",
        "expire-old",
        "expired-active",
    ],
)
def test_planner(slots: list[Slot], at: timedelta, expected: list[object]) -> None:
    got = [a for a in plan(slots, T0 + at) if not (slots and a.kind == J)]
    assert got == expected


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(tmp_path: Path, clock: Clock) -> Iterator[CaService]:
    settings = CaSettings(
        trust_domain=TrustDomain("example.org"),
        server_id="s1",
        ca_ttl=TTL,
        x509_svid_ttl=timedelta(hours=10),
    )
    store = Datastore(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    svc = CaService(settings, store, MemoryKeyManager(), clock=clock)
    svc.start()
    yield svc
    store.close()


WORKLOAD = SpiffeId("spiffe://example.org/web")


def _sign(svc: CaService) -> tuple[x509.Certificate, ...]:
    [issued] = svc.sign_x509_svids(
        [X509Request(WORKLOAD, generate_key(KeyType.EC_P256).public_key())], "test"
    )
    return issued.chain


def _assert_no_gap(
    svc: CaService, svids: list[tuple[x509.Certificate, ...]], now: datetime
) -> None:
    roots = svc.bundle().x509_authorities
    for chain in svids:
        if chain[0].not_valid_after_utc > now:
            verify_chain(chain, roots, now=now)


def _status(svc: CaService, kind: AuthorityKind) -> dict[str, str]:
    return {a.id: a.status for a in svc.list_authorities(kind)}


def test_rotation_lifecycle_has_no_gap_in_trust(service: CaService, clock: Clock) -> None:
    svids = [_sign(service)]
    [first] = [a for a in service.list_authorities(X) if a.status == Status.ACTIVE]
    seq0 = service.bundle().sequence

    clock.advance(timedelta(hours=12))
    service.rotate()
    statuses = _status(service, X)
    [prepared] = [i for i, s in statuses.items() if s == Status.PREPARED]
    bundle = service.bundle()
    assert len(bundle.x509_authorities) == 2, "the next authority is published before it signs"
    assert bundle.sequence > seq0
    svids.append(_sign(service))
    assert svids[-1][0].issuer == svids[0][0].issuer, "still signed by the first authority"
    _assert_no_gap(service, svids, clock.now)

    clock.advance(timedelta(hours=8))  # 20 h: 1/6 of the lifetime left
    service.rotate()
    assert _status(service, X) == {first.id: Status.OLD, prepared: Status.ACTIVE}
    svids.append(_sign(service))
    assert svids[-1][0].issuer != svids[0][0].issuer
    _assert_no_gap(service, svids, clock.now)

    service.taint(X, first.id, "test")
    with pytest.raises(Conflict, match="stay valid until"):
        service.revoke(X, first.id, "test")
    _assert_no_gap(service, svids, clock.now)  # a refused revoke changes nothing

    clock.advance(timedelta(hours=3, minutes=1))  # every SVID of the first authority expired
    service.revoke(X, first.id, "test")
    assert len(service.bundle().x509_authorities) == 1
    _assert_no_gap(service, svids, clock.now)

    with service.store.read() as tx:
        kinds = [e.kind for e in tx.list_audit(limit=1000)]
    for kind in (
        "authority.prepared",
        "authority.activated",
        "authority.tainted",
        "authority.revoked",
    ):
        assert kind in kinds
    assert service.verify_audit().ok


def test_revoke_force_and_state_rules(service: CaService, clock: Clock) -> None:
    [active] = [a for a in service.list_authorities(X) if a.status == Status.ACTIVE]
    with pytest.raises(Conflict, match="only an old authority can be tainted"):
        service.taint(X, active.id, "test")
    with pytest.raises(Conflict, match="only a tainted old authority"):
        service.revoke(X, active.id, "test")
    _sign(service)
    nxt = service.prepare(X, "test")
    with pytest.raises(Conflict, match="already exists"):
        service.prepare(X, "test")
    service.activate(X, nxt.id, "test")
    service.taint(X, active.id, "test")
    with pytest.raises(Conflict, match="--force"):
        service.revoke(X, active.id, "test")
    revoked = service.revoke(X, active.id, "test", force=True)
    assert revoked.status == Status.REVOKED
    roots = service.bundle().x509_authorities
    assert all(r.public_key() != active.public_key for r in roots)
    assert len(roots) == 1


def test_jwt_key_published_before_signing(service: CaService, clock: Clock) -> None:
    token = service.mint_jwt_svid(str(WORKLOAD), ["db"], "test").token
    clock.advance(timedelta(hours=12))
    service.rotate()
    bundle = service.bundle()
    assert len(bundle.jwt_authorities) == 2
    clock.advance(timedelta(hours=8))
    service.rotate()
    newer = service.mint_jwt_svid(str(WORKLOAD), ["db"], "test").token
    keys = {"example.org": dict(service.bundle().jwt_authorities)}
    validate_jwt_svid(newer, "db", keys, now=clock.now)
    # the old token expired long ago, but its key is still trusted until the authority expires
    parsed = JwtBundle.parse(TrustDomain("example.org"), jwt_jwks(service.bundle()))
    assert len(parsed.jwt_authorities) == 2
    assert token != newer


def test_expired_server_recovers(service: CaService, clock: Clock) -> None:
    clock.advance(timedelta(days=3))  # the server was down for days
    with pytest.raises(AuthorityUnavailable):
        _sign(service)  # the cached signer expired: signing fails closed until rotation runs
    service.rotate()
    chain = _sign(service)
    verify_chain(chain, service.bundle().x509_authorities, now=clock.now)
    statuses = sorted(_status(service, X).values())
    assert statuses == [Status.ACTIVE, Status.EXPIRED]
