"""The CA service on both datastore backends: changes and their audit commit together."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain, X509Svid

from ca.bundle import to_spiffe_json
from ca.datastore import Datastore
from ca.entries import EntrySpec
from ca.errors import Conflict, InvalidArgument, NotFound
from ca.keys import KeyType, MemoryKeyManager, generate_key, private_key_pem
from ca.service import CaService, CaSettings, UpstreamCA, X509Request, token_hash
from ca.validation import verify_chain
from ca.x509svid import build_root_certificate

TD = TrustDomain("example.org")


def _spec(path: str = "web", uid: int = 1000) -> EntrySpec:
    return EntrySpec(
        spiffe_id=f"spiffe://example.org/{path}",
        parent_id="spiffe://example.org/node",
        selectors=[f"unix:uid:{uid}"],
    )


@pytest.fixture
def service(database_url: str) -> Iterator[CaService]:
    svc = CaService(
        CaSettings(trust_domain=TD, server_id="s1"), Datastore(database_url), MemoryKeyManager()
    )
    svc.start()
    yield svc
    svc.store.close()


def _head(svc: CaService) -> tuple[int, str]:
    with svc.store.read() as tx:
        return tx.audit_head()


def test_entry_changes_are_audited_in_the_same_transaction(service: CaService) -> None:
    before = _head(service)[0]
    entry = service.create_entry(_spec(), "uid:1")
    updated = service.update_entry(entry.id, _spec(uid=2000), "uid:1")
    service.delete_entry(entry.id, "uid:1")
    assert updated.revision > entry.revision
    with service.store.read() as tx:
        events = tx.list_audit(after_seq=before)
    assert [e.kind for e in events] == ["entry.created", "entry.updated", "entry.deleted"]
    assert all(e.actor == "uid:1" and e.spiffe_id == "spiffe://example.org/web" for e in events)
    assert service.verify_audit().ok


@pytest.mark.parametrize(
    "bad",
    [
        _spec(path="a/"),
        EntrySpec("spiffe://example.org/x", "spiffe://example.org/n", ["bad"]),
        EntrySpec(
            "spiffe://example.org/x", "spiffe://example.org/n", ["unix:uid:1"], x509_svid_ttl=-3
        ),
    ],
    ids=["bad-id", "bad-selector", "bad-ttl"],
)
def test_bad_input_writes_nothing(service: CaService, bad: EntrySpec) -> None:
    before = (_head(service), service.list_entries())
    with pytest.raises(InvalidArgument):
        service.create_entry(bad, "uid:1")
    assert (_head(service), service.list_entries()) == before


def test_duplicate_and_missing(service: CaService) -> None:
    service.create_entry(_spec(), "uid:1")
    head = _head(service)
    with pytest.raises(Conflict):
        service.create_entry(_spec(), "uid:1")
    with pytest.raises(NotFound):
        service.delete_entry("no-such-id", "uid:1")
    with pytest.raises(NotFound):
        service.update_entry("no-such-id", _spec(path="other"), "uid:1")
    assert _head(service) == head
    same_id_other_parent = EntrySpec(
        "spiffe://example.org/web", "spiffe://example.org/node2", ["unix:uid:1000"]
    )
    service.create_entry(same_id_other_parent, "uid:1")  # a different parent is a different entry


def test_signing_audits_serial_and_authority(service: CaService) -> None:
    key = generate_key(KeyType.EC_P384)
    [svid] = service.sign_x509_svids(
        [X509Request(SpiffeId("spiffe://example.org/web"), key.public_key(), timedelta(minutes=5))],
        "spiffe://example.org/meshid/agent/x",
    )
    with service.store.read() as tx:
        [event] = tx.list_audit(kind="x509_svid.issued")
    assert event.details["serial"] == f"{svid.serial:#x}"
    assert event.details["authority_id"] == svid.authority_id
    assert event.actor == "spiffe://example.org/meshid/agent/x"
    der = b"".join(c.public_bytes(serialization.Encoding.DER) for c in svid.chain)
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert str(X509Svid.parse_raw(der, pkcs8).spiffe_id) == "spiffe://example.org/web"
    with pytest.raises(InvalidArgument, match="trust domain"):
        service.sign_x509_svids(
            [X509Request(SpiffeId("spiffe://evil.org/web"), key.public_key())], "uid:0"
        )


def test_join_tokens_are_stored_hashed(service: CaService) -> None:
    issued = service.generate_token("uid:0", spiffe_id="spiffe://example.org/node/alias")
    assert str(issued.agent_id).startswith("spiffe://example.org/meshid/agent/join_token/")
    with service.store.write() as tx:
        assert tx.redeem_token(issued.token, datetime.now(UTC)) is None, "the secret is not stored"
        assert tx.redeem_token(token_hash(issued.token), datetime.now(UTC)) is not None
    with pytest.raises(InvalidArgument, match="ttl"):
        service.generate_token("uid:0", ttl=timedelta(days=30))


def test_federated_bundles(service: CaService) -> None:
    ours = to_spiffe_json(service.bundle())
    service.set_federated_bundle("other.org", ours, "uid:0")
    [fed] = service.federated_bundles()
    assert fed.trust_domain == TrustDomain("other.org")
    with pytest.raises(InvalidArgument, match="own trust domain"):
        service.set_federated_bundle("example.org", ours, "uid:0")
    with pytest.raises(InvalidArgument):
        service.set_federated_bundle("other.org", b"{not json", "uid:0")
    assert len(service.federated_bundles()) == 1, "a refused set keeps the stored bundle"
    service.delete_federated_bundle("other.org", "uid:0")
    assert service.federated_bundles() == []


def test_a_batch_audits_every_svid_in_one_transaction(service: CaService) -> None:
    before = _head(service)[0]
    ids = [SpiffeId(f"spiffe://example.org/w{i}") for i in range(3)]
    ttls = [timedelta(minutes=5), None, timedelta(minutes=7)]
    requests = [
        X509Request(spiffe_id, generate_key(KeyType.EC_P256).public_key(), ttl)
        for spiffe_id, ttl in zip(ids, ttls, strict=True)
    ]
    issued = service.sign_x509_svids(requests, "uid:0")
    with service.store.read() as tx:
        events = tx.list_audit(after_seq=before)
        latest = tx.latest_svid_not_after(issued[0].authority_id)
    assert [e.seq for e in events] == list(range(before + 1, before + 4))
    for svid, event, spiffe_id in zip(issued, events, ids, strict=True):
        assert svid.spiffe_id == spiffe_id and event.spiffe_id == str(spiffe_id)
        assert (event.kind, event.actor) == ("x509_svid.issued", "uid:0")
        assert event.details == {
            "serial": f"{svid.serial:#x}",
            "not_after": svid.not_after.isoformat(),
            "authority_id": svid.authority_id,
        }
    assert latest == max(svid.not_after for svid in issued)
    assert service.verify_audit().ok


def test_upstream_ca_makes_an_intermediate(tmp_path: object, database_url: str) -> None:
    now = datetime.now(UTC)
    up_key = generate_key(KeyType.EC_P256)
    up_root = build_root_certificate(
        up_key, TrustDomain("example.org"), not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=30), serial=99,
    )  # fmt: skip
    svc = CaService(
        CaSettings(trust_domain=TD, server_id="s1", upstream=UpstreamCA((up_root,), up_key)),
        Datastore(database_url),
        MemoryKeyManager(),
    )
    svc.start()
    try:
        assert svc.bundle().x509_authorities == (up_root,), "the upstream root anchors trust"
        key = generate_key(KeyType.EC_P256)
        [svid] = svc.sign_x509_svids(
            [X509Request(SpiffeId("spiffe://example.org/w"), key.public_key())], "uid:0"
        )
        assert len(svid.chain) == 2 and svid.chain[1].issuer == up_root.subject
        verify_chain(svid.chain, [up_root], now=now + timedelta(seconds=2))  # certs: 1 s precision
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)
        loaded = X509Svid.parse(pem, private_key_pem(key))
        assert isinstance(loaded.leaf, x509.Certificate)
    finally:
        svc.store.close()
