"""SyncEntries over real TLS: snapshots, changes as they happen, resume, bundles, cut-off."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from ca.authority import AuthorityKind
from ca.bundle import from_spiffe_json, to_spiffe_json
from ca.datastore import Datastore
from ca.datastore.models import EntryChangeRow, EntryRow
from ca.entries import EntrySpec
from ca.keys import MemoryKeyManager
from ca.nodeapi import node_pb2, node_pb2_grpc
from ca.nodeapi.sync import EntrySync
from ca.service import CaService, CaSettings
from tests.ca.nodeapi_support import (
    READ_TIMEOUT,
    SERVER_ID,
    TD,
    Agent,
    Harness,
    ProvisioningCa,
    attest,
    bulk_entries,
    join,
    read_update,
    run,
    running,
    upsert_ids,
)

NEW_ENTRY_DEADLINE = 1.0  # seconds: the bound for a new entry to reach the agent


def _sync(h: Harness, channel: grpc.aio.Channel, since: int = 0) -> Any:
    return node_pb2_grpc.NodeStub(channel).SyncEntries(
        node_pb2.SyncEntriesRequest(since_revision=since)
    )


async def _resume(h: Harness, agent: Agent, since: int) -> list[node_pb2.SyncEntriesResponse]:
    async with h.channel(agent) as channel:
        call = _sync(h, channel, since)
        update = await read_update(call)
        call.cancel()
        return update


def test_full_snapshot_then_changes_as_they_happen(tmp_path: Path, database_url: str) -> None:
    async def scenario() -> None:
        async with running(tmp_path, database_url) as h:
            agent = await join(h)
            other = await join(h)
            mine = await h.entry("web", agent.spiffe_id)
            await h.entry("db", other.spiffe_id)
            async with h.channel(agent) as channel:
                call = _sync(h, channel)
                [first] = await read_update(call)
                assert first.full and not first.more
                assert upsert_ids([first]) == {mine.id}
                assert first.revision >= mine.revision
                [entry] = first.upserts
                assert (entry.spiffe_id, entry.parent_id, list(entry.selectors)) == (
                    "spiffe://example.org/web",
                    agent.spiffe_id,
                    ["unix:uid:1000"],
                )
                bundle = from_spiffe_json(TD, first.bundle.spiffe_bundle)
                assert first.bundle.trust_domain == "example.org"
                assert bundle.x509_authorities == h.ca.bundle().x509_authorities
                assert first.federated_bundles_set and not first.federated_bundles

                # A new entry arrives without asking, well within a second.
                started = time.monotonic()
                created = await h.entry("api", agent.spiffe_id, dns_names=["api.example.org"])
                [update] = await read_update(call)
                assert time.monotonic() - started < NEW_ENTRY_DEADLINE
                assert not update.full and update.revision == created.revision
                assert [(e.id, list(e.dns_names)) for e in update.upserts] == [
                    (created.id, ["api.example.org"])
                ]
                assert not update.HasField("bundle") and not update.federated_bundles_set

                # Someone else's entry changes: nothing for this agent. Then an update, a move
                # away (no longer authorized) and a deletion.
                await h.entry("db2", other.spiffe_id)
                spec = EntrySpec("spiffe://example.org/api", agent.spiffe_id, ["unix:uid:7"])
                await h.in_thread(h.ca.update_entry, created.id, spec, "uid:0")
                [update] = await read_update(call)
                assert [list(e.selectors) for e in update.upserts] == [["unix:uid:7"]]
                moved = EntrySpec("spiffe://example.org/web", other.spiffe_id, ["unix:uid:1000"])
                await h.in_thread(h.ca.update_entry, mine.id, moved, "uid:0")
                [update] = await read_update(call)
                assert list(update.deleted_ids) == [mine.id] and not update.upserts
                deleted = await h.in_thread(h.ca.delete_entry, created.id, "uid:0")
                [update] = await read_update(call)
                assert list(update.deleted_ids) == [created.id]
                assert update.revision == deleted.revision
                call.cancel()

    run(scenario)


def test_changes_made_by_another_replica_arrive_by_polling(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            agent = await join(h)
            replica = CaService(
                CaSettings(trust_domain=TD, server_id="s2"),
                Datastore(h.ca.store.url),
                MemoryKeyManager(),
            )
            async with h.channel(agent) as channel:
                call = _sync(h, channel)
                await read_update(call)
                spec = EntrySpec("spiffe://example.org/remote", agent.spiffe_id, ["unix:uid:1"])
                started = time.monotonic()
                # No notification reaches this server from the other replica's service.
                created = await asyncio.to_thread(replica.create_entry, spec, "uid:0")
                [update] = await read_update(call)
                assert time.monotonic() - started < NEW_ENTRY_DEADLINE
                assert upsert_ids([update]) == {created.id}
                call.cancel()
            replica.store.close()

    run(scenario)


def test_resume_from_a_revision(tmp_path: Path, database_url: str) -> None:
    async def scenario() -> None:
        async with running(tmp_path, database_url) as h:
            agent = await join(h)
            first = await h.entry("a", agent.spiffe_id)
            [snapshot] = await _resume(h, agent, 0)
            revision = snapshot.revision
            # Only creates since: an incremental update with exactly the new entries.
            second = await h.entry("b", agent.spiffe_id)
            await h.entry("elsewhere", "spiffe://example.org/other-node")
            # (On PostgreSQL, entries changed shortly before the agent's revision come again:
            # one of them may have committed late. Sending an entry twice is harmless.)
            again = {first.id, second.id} if h.ca.store.backend == "postgresql" else set()
            [update] = await _resume(h, agent, revision)
            assert not update.full and not update.deleted_ids
            assert upsert_ids([update]) == {second.id} | (again & upsert_ids([update]))
            assert update.revision == second.revision + 1
            assert update.HasField("bundle") and update.federated_bundles_set
            # Up to date: nothing new.
            [update] = await _resume(h, agent, update.revision)
            assert not update.full and not update.deleted_ids
            assert upsert_ids([update]) <= again
            # An update or deletion since: a full snapshot (old versions are not kept).
            await h.in_thread(h.ca.delete_entry, first.id, "uid:0")
            [update] = await _resume(h, agent, revision)
            assert update.full and upsert_ids([update]) == {second.id}
            # A revision this server never reached: a full snapshot.
            [update] = await _resume(h, agent, update.revision + 1000)
            assert update.full

    run(scenario)


@pytest.mark.slow
def test_twenty_thousand_entries_sync_in_chunks(tmp_path: Path) -> None:
    count = 20_000

    async def scenario() -> None:
        async with running(tmp_path) as h:
            agent = await join(h)
            await asyncio.to_thread(bulk_entries, h.ca, agent.spiffe_id, count)
            async with h.channel(agent) as channel:
                call = _sync(h, channel)
                messages = await read_update(call)
                assert len(messages) == count // 1000
                assert all(m.full for m in messages)
                assert [m.more for m in messages] == [True] * (len(messages) - 1) + [False]
                assert all(len(m.upserts) <= 1000 for m in messages)
                assert len(upsert_ids(messages)) == count
                assert messages[0].HasField("bundle")
                # The stream stays live after the snapshot.
                created = await h.entry("one-more", agent.spiffe_id)
                [update] = await read_update(call)
                assert upsert_ids([update]) == {created.id}
                call.cancel()

    run(scenario)


def test_bundle_and_federated_bundle_changes_are_pushed(tmp_path: Path) -> None:
    partner = {
        "keys": [],
        "spiffe_sequence": 3,
        "spiffe_refresh_hint": 300,
    }

    async def scenario() -> None:
        async with running(tmp_path) as h:
            agent = await join(h)
            await h.entry("web", agent.spiffe_id, federates_with=["partner.org"])
            async with h.channel(agent) as channel:
                call = _sync(h, channel)
                [first] = await read_update(call)
                sequence = first.bundle.sequence
                assert first.federated_bundles_set and not first.federated_bundles
                # A federated bundle this agent's entries federate with.
                await h.in_thread(
                    h.ca.set_federated_bundle,
                    "partner.org",
                    json.dumps(partner).encode(),
                    "uid:0",
                )
                [update] = await read_update(call)
                assert update.federated_bundles_set
                assert [(b.trust_domain, b.sequence) for b in update.federated_bundles] == [
                    ("partner.org", 3)
                ]
                # One they do not federate with: nothing.
                await h.in_thread(
                    h.ca.set_federated_bundle,
                    "unrelated.org",
                    json.dumps(partner).encode(),
                    "uid:0",
                )
                # Rotation: the next authority is published; the new bundle follows.
                await h.in_thread(h.ca.prepare, AuthorityKind.X509, "uid:0")
                [update] = await read_update(call)
                assert update.bundle.sequence > sequence
                assert not update.federated_bundles_set
                pushed = from_spiffe_json(TD, update.bundle.spiffe_bundle)
                assert to_spiffe_json(pushed) == to_spiffe_json(h.ca.bundle())
                assert len(pushed.x509_authorities) == 2
                # Deleting the federated bundle empties the set.
                await h.in_thread(h.ca.delete_federated_bundle, "partner.org", "uid:0")
                [update] = await read_update(call)
                assert update.federated_bundles_set and not update.federated_bundles
                call.cancel()

    run(scenario)


def test_node_entries_and_aliases_sync_transitively(tmp_path: Path) -> None:
    root = ProvisioningCa.create()
    node = root.node("node-1", ("node-1.example.org",))

    async def scenario() -> None:
        async with running(tmp_path, provisioning_cas=[root.certificate]) as h:
            agent = await attest(h, "x509pop", node.pem(), answer=node.sign)
            aliased = await join(h, alias="spiffe://example.org/cluster/blue")
            fleet = await h.entry("fleet", SERVER_ID, "x509pop:subject:cn:node-1")
            other_fleet = await h.entry("other", SERVER_ID, "x509pop:subject:cn:node-2")
            via_fleet = await h.entry("fleet-app", "spiffe://example.org/fleet")
            via_alias = await h.entry("blue-app", "spiffe://example.org/cluster/blue")
            grandchild = await h.entry("blue-app-sidecar", "spiffe://example.org/blue-app")
            [snapshot] = await _resume(h, agent, 0)
            assert upsert_ids([snapshot]) == {fleet.id, via_fleet.id}
            [snapshot] = await _resume(h, aliased, 0)
            assert upsert_ids([snapshot]) == {via_alias.id, grandchild.id}
            del other_fleet

            # A node entry created while the agent syncs brings its subtree along.
            async with h.channel(agent) as channel:
                call = _sync(h, channel)
                await read_update(call)
                await h.entry("west", SERVER_ID, "x509pop:san:dns:node-1.example.org")
                [update] = await read_update(call)
                assert {e.spiffe_id for e in update.upserts} == {"spiffe://example.org/west"}
                child = await h.entry("west-app", "spiffe://example.org/west")
                [update] = await read_update(call)
                assert upsert_ids([update]) == {child.id}
                call.cancel()

    run(scenario)


@pytest.mark.parametrize("action", ["ban", "evict"])
def test_ban_and_evict_end_the_stream(tmp_path: Path, action: str) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            agent = await join(h)
            async with h.channel(agent) as channel:
                call = _sync(h, channel)
                await read_update(call)
                do = h.server.nodes.ban if action == "ban" else h.server.nodes.evict
                await h.in_thread(do, agent.spiffe_id, "uid:0")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(call.read(), READ_TIMEOUT)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await read_update(_sync(h, channel))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    run(scenario)


def test_stopping_the_server_ends_streams_with_unavailable(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            agent = await join(h)
            async with h.channel(agent) as channel:
                call = _sync(h, channel)
                await read_update(call)
                await h.server.stop(grace=2.0)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(call.read(), READ_TIMEOUT)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario)


def _insert_at(h: Harness, revision: int, path: str, parent: str) -> str:
    """An entry whose change row has exactly ``revision`` (as a late PostgreSQL commit has)."""
    entry_id = f"late-{revision}"
    now = h.ca.clock()
    with h.ca.store.write() as tx:
        tx.session.add(EntryChangeRow(revision=revision, entry_id=entry_id, op="create", at=now))
        row = EntryRow(id=entry_id, revision=revision, created_at=now, updated_at=now)
        row.spiffe_id, row.parent_id = f"spiffe://example.org/{path}", parent
        row.selectors, row.selectors_key = '["unix:uid:1"]', path
        row.x509_svid_ttl = row.jwt_svid_ttl = 0
        row.dns_names = row.federates_with = "[]"
        row.hint, row.admin, row.downstream, row.expires_at = "", False, False, None
        tx.session.add(row)
    return entry_id


def test_a_revision_committed_late_still_reaches_the_agent(tmp_path: Path) -> None:
    """PostgreSQL can commit revision r after r+1; the planner watches the gap until r shows."""

    async def scenario() -> None:
        async with running(tmp_path) as h:
            agent = await join(h)
            sync = EntrySync(h.server.nodes, track_gaps=True)
            caller = await h.in_thread(h.server.nodes.authenticate, agent.chain[0])
            state, first = sync.open(caller, 0)
            base = state.revision
            later = _insert_at(h, base + 2, "later", agent.spiffe_id)
            update = sync.update(state)
            assert [e.id for e in update.upserts] == [later]
            assert set(state.gaps) == {base + 1}
            late = _insert_at(h, base + 1, "late", agent.spiffe_id)
            update = sync.update(state)
            assert [e.id for e in update.upserts] == [late]
            assert not state.gaps and state.revision == base + 2
            del first

    run(scenario)


def test_entry_sync_defaults_to_gap_tracking_only_on_postgresql(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as h:
            assert EntrySync(h.server.nodes).track_gaps is False

    run(scenario)
