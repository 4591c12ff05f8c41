"""The node API's datastore parts on SQLite and PostgreSQL: attested nodes, entry-graph reads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from spiffe import TrustDomain

from ca.datastore import Datastore
from ca.datastore.entry_graph import (
    IN_CHUNK,
    changes_after,
    children_of,
    entries_by_id,
    max_revision,
    sync_marks,
)
from ca.datastore.models import Base
from ca.datastore.nodes import (
    AttestedNode,
    delete_node,
    find_token,
    get_node,
    list_nodes,
    nodes_revision,
    rotate_serial,
    save_node,
    set_banned,
)
from ca.entries import EntrySpec
from ca.keys import MemoryKeyManager
from ca.service import CaService, CaSettings, token_hash

NOW = datetime(2030, 1, 1, 12, tzinfo=UTC)
AGENT = "spiffe://example.org/meshid/agent/x509pop/abc"


@pytest.fixture
def service(database_url: str) -> Iterator[CaService]:
    svc = CaService(
        CaSettings(trust_domain=TrustDomain("example.org"), server_id="s1"),
        Datastore(database_url),
        MemoryKeyManager(),
    )
    svc.start()
    yield svc
    svc.store.close()


def _node(**changes: object) -> AttestedNode:
    node = AttestedNode(
        spiffe_id=AGENT,
        attestation_type="x509pop",
        selectors=("x509pop:subject:cn:n1",),
        aliases=(),
        serial=(1 << 127) + 5,
        previous_serial=None,
        expires_at=NOW + timedelta(hours=1),
        banned=False,
        created_at=NOW,
        attested_at=NOW,
        last_seen=NOW,
        sync_floor=3,
    )
    return replace(node, **changes)  # type: ignore[arg-type]


def test_the_migrated_schema_matches_the_models(service: CaService) -> None:
    with service.store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert [d for d in diff if "attested_nodes" in repr(d)] == []


def test_attested_node_lifecycle(service: CaService) -> None:
    store = service.store
    with store.read() as tx:
        start = nodes_revision(tx)
        assert get_node(tx, AGENT) is None
    with store.write() as tx:
        save_node(tx, _node())
    with store.read() as tx:
        assert get_node(tx, AGENT) == _node()
        assert list_nodes(tx) == [_node()]
        assert nodes_revision(tx) == start + 1
    with store.write() as tx:
        assert rotate_serial(tx, AGENT, 77, NOW + timedelta(hours=2), NOW + timedelta(minutes=5))
        assert not rotate_serial(tx, "spiffe://example.org/meshid/agent/none", 1, NOW, NOW)
    with store.read() as tx:
        node = get_node(tx, AGENT)
    assert node is not None
    assert (node.serial, node.previous_serial) == (77, (1 << 127) + 5)
    assert node.accepts_serial(77) and node.accepts_serial((1 << 127) + 5)
    assert not node.accepts_serial(78)
    assert node.expires_at == NOW + timedelta(hours=2)
    with store.write() as tx:
        assert set_banned(tx, AGENT, True)
    with store.read() as tx:
        banned = get_node(tx, AGENT)
        assert banned is not None and banned.banned
        assert nodes_revision(tx) == start + 2
    # Re-attestation replaces every field.
    with store.write() as tx:
        save_node(tx, _node(serial=9, selectors=("x509pop:subject:cn:n2",)))
    with store.read() as tx:
        assert get_node(tx, AGENT) == _node(serial=9, selectors=("x509pop:subject:cn:n2",))
    with store.write() as tx:
        assert delete_node(tx, AGENT)
        assert not delete_node(tx, AGENT)
        assert not set_banned(tx, AGENT, True)
    with store.read() as tx:
        assert get_node(tx, AGENT) is None
        assert nodes_revision(tx) == start + 4


def test_a_failed_transaction_leaves_no_node(service: CaService) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), service.store.write() as tx:
        save_node(tx, _node())
        raise Boom
    with service.store.read() as tx:
        assert get_node(tx, AGENT) is None


def test_find_token_reads_without_consuming(service: CaService) -> None:
    issued = service.generate_token("uid:0", spiffe_id="spiffe://example.org/alias")
    with service.store.read() as tx:
        found = find_token(tx, token_hash(issued.token))
        assert found is not None and found.used_at is None
        assert found.spiffe_id == "spiffe://example.org/alias"
        assert find_token(tx, token_hash("nope")) is None
    with service.store.write() as tx:
        assert tx.redeem_token(token_hash(issued.token), service.clock()) is not None


def test_entry_graph_reads(service: CaService) -> None:
    parents = [f"spiffe://example.org/p{i}" for i in range(IN_CHUNK + 20)]
    created = [
        service.create_entry(EntrySpec(f"spiffe://example.org/w{i}", p, ["unix:uid:1"]), "t")
        for i, p in enumerate(parents[:: IN_CHUNK // 4])
    ]
    created.append(
        service.create_entry(
            EntrySpec("spiffe://example.org/last", parents[-1], ["unix:uid:1"]), "t"
        )
    )
    with service.store.read() as tx:
        found = children_of(tx, parents)
        assert {e.id for e in found} == {e.id for e in created}
        assert set(entries_by_id(tx, [e.id for e in created] + ["missing"])) == {
            e.id for e in created
        }
        newest = max_revision(tx)
        assert newest == created[-1].revision
        marks = sync_marks(tx)
        changes = changes_after(tx, created[1].revision, also=[created[0].revision])
    assert [c.entry_id for c in changes] == [e.id for e in created[:1] + created[2:]]
    assert all(c.op == "create" for c in changes)
    service.delete_entry(created[0].id, "t")
    service.set_federated_bundle("partner.org", b'{"keys": []}', "t")
    with service.store.read() as tx:
        later = sync_marks(tx)
        [change] = changes_after(tx, newest)
    assert change.op == "delete" and change.entry_id == created[0].id
    assert later.entry_revision == newest + 1 and later.federated[0] == 1
    assert later != marks
