"""The node agent end to end: a real ``meshid server run --bind`` and real ``meshid agent run``
processes, and this process as the workload on the agent's Workload API socket.

Three figures, each from its own agent (a fresh data dir and join token), one server throughout:

1. **Entry create → SVID in a waiting stream.** One raw ``FetchX509SVID`` stream (grpcio, with the
   ``workload.spiffe.io: true`` header: what py-spiffe's ``X509Source`` holds, without its
   thread hops) is open and waiting. For each of ``--entries-latency`` entries, one at a time, an
   entry with a new SPIFFE ID that this process matches (``unix:uid:<our uid>``) is created
   through the admin API in-process (``meshid.client.AdminClient``: no CLI start-up time); the
   clock runs from just before that call until the stream delivers a message holding the new ID
   (every message carries all of the caller's SVIDs). p50/p99/max beside SPIRE's reference point,
   its 5 s agent sync interval.
2. **Sync of ``--sync-entries`` entries.** The entries, parented by a join-token agent that has not
   started yet, are written with ``ca.service.CaService`` straight into the server's SQLite file
   *before the server starts* (setup only: about 3.5x faster than the admin API, which creates
   one entry per request and transaction, ~280/s here, and it keeps 10,000 wake-ups of the
   entry-sync streams out of the other figures). Their selector is a uid nobody here runs as, so
   the agent syncs and signs them but serves them to no one. Then the agent starts and the clock
   runs until its ``SVIDs signed count=N`` log lines add up to every entry; the agent's RSS
   (VmRSS, VmHWM from ``/proc``) is read at that moment. The server-side signing rate comes from
   the audit log (``x509_svid.issued`` events of that agent; an event's time is when its batch
   began, so the rate is counted over the batches before the last) and from the server's CPU
   seconds in the same window.
3. **``--streams`` concurrent ``FetchX509SVID`` streams on one agent, one rotation.** One entry with
   a ``--rotation-ttl`` s X.509 TTL matches this process; the streams are opened over a few
   grpcio asyncio channels (``STREAMS_PER_CHANNEL`` each), and the bench waits until every one has
   its first SVID, then until every one receives a message with a new leaf serial (the agent
   renews at about half the TTL). Success means every stream got the rotation.

Speed is printed, never asserted. Everything runs under /tmp (Unix socket paths stay short) and
is stopped and removed on the way out, failure or not.

Run: ``.venv/bin/python bench/agent.py`` (defaults: 200 / 10,000 / 1,000; a quick run:
``--entries-latency 50 --sync-entries 1000 --streams 100``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from cryptography import x509
from grpc import aio
from spiffe import TrustDomain

from ca.datastore import Datastore
from ca.entries import EntrySpec
from ca.keys import MemoryKeyManager
from ca.service import CaService, CaSettings
from meshid.client import AdminClient
from tests.support.processes import AgentProcess, ServerProcess, free_port
from workload_api._messages import X509SVIDRequest, X509SVIDResponse

TD = "example.org"
FETCH_X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
WORKLOAD_HEADER = (("workload.spiffe.io", "true"),)  # Workload API spec: required on every call
SPIRE_SYNC_INTERVAL_S = 5.0  # SPIRE's agent polls its server for entry changes this often
SYNC_PATH = "/bench/sync/"  # SPIFFE IDs of figure 2's entries
NOBODY_UID = 3_999_999_999  # a uid no process here runs as: synced SVIDs are held, not served
# The Workload API server (grpclib on h2) advertises h2's default SETTINGS_MAX_CONCURRENT_STREAMS
# of 100 per connection; grpcio holds further streams back until one ends, so the bench opens
# one connection per 100 streams.
STREAMS_PER_CHANNEL = 100
LATENCY_TIMEOUT_S = 10.0  # one entry not delivered within this counts as missing
SYNC_TIMEOUT_S = 240.0  # the whole sync of figure 2
FIRST_SVID_TIMEOUT_S = 60.0  # every stream's first message in figure 3
ROTATION_MARGIN_S = 30.0  # beyond the TTL, for the rotation to reach every stream
POLL_S = 0.02  # watching another process's log lines or audit log: no event crosses over
SIGNED_LINE = re.compile(r"SVIDs signed .*\bcount=(\d+)")
SYNCED_LINE = re.compile(r"entries synced .*\bentries=(\d+)")


def progress(message: str) -> None:
    print(f"[bench/agent {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``pct`` % at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def leaf_serial(chain: bytes) -> int:
    """Serial of the first certificate of a concatenated DER chain (X509SVID.x509_svid)."""
    # The leaf is one DER SEQUENCE: tag 0x30, then a short or long-form length.
    first = chain[1]
    if first < 0x80:
        end = 2 + first
    else:
        size = first & 0x7F
        end = 2 + size + int.from_bytes(chain[2 : 2 + size], "big")
    return x509.load_der_x509_certificate(chain[:end]).serial_number


# -- the mesh -----------------------------------------------------------------------------------


@dataclass
class Mesh:
    root: Path
    server: ServerProcess
    node_api: str
    bundle: Path
    admin: AdminClient
    stack: contextlib.ExitStack
    agents: int = 0

    def token(self) -> tuple[str, str]:
        out = self.admin.json("POST", "/v1/tokens", json={"ttl": 3600})
        return str(out["token"]), str(out["agent_id"])

    def start_agent(self, token: str, *, wait_ready: bool = True) -> AgentProcess:
        self.agents += 1
        agent = AgentProcess(
            self.root / f"agent{self.agents}",
            self.root / f"wl{self.agents}" / "api.sock",
            [self.node_api],
            self.bundle,
            trust_domain=TD,
            join_token=token,
        )
        agent.start(wait_ready=wait_ready)  # stops the process itself if it never gets ready
        self.stack.callback(_stop_quietly, agent)
        return agent

    def create_entry(self, path: str, selectors: Sequence[str], parent: str, ttl: int = 0) -> None:
        self.admin.json(
            "POST",
            "/v1/entries",
            json={
                "spiffe_id": f"spiffe://{TD}/{path}",
                "parent_id": parent,
                "selectors": list(selectors),
                "x509_svid_ttl": ttl,
            },
        )


def _stop_quietly(agent: AgentProcess) -> None:
    if agent.proc is not None and agent.proc.returncode is None:
        agent.stop()


def seed_sync_entries(data_dir: Path, count: int) -> tuple[str, str]:
    """Write ``count`` entries and a join token into the server's database before it starts.

    Setup only, and through the service (validation, revisions, audit), not raw SQL; the admin
    API would create the same rows one request and one transaction at a time.
    """
    data_dir.mkdir(mode=0o700, parents=True)
    store = Datastore(f"sqlite:///{data_dir / 'datastore.sqlite3'}")
    try:
        store.migrate()
        service = CaService(
            CaSettings(trust_domain=TrustDomain(TD), server_id="bench-seed"),
            store,
            MemoryKeyManager(),  # never used: creating entries and tokens signs nothing
        )
        actor = f"uid:{os.getuid()}"
        issued = service.generate_token(actor, ttl=timedelta(hours=1))
        parent = str(issued.agent_id)
        for i in range(count):
            spec = EntrySpec(
                spiffe_id=f"spiffe://{TD}{SYNC_PATH}{i}",
                parent_id=parent,
                selectors=[f"unix:uid:{NOBODY_UID}"],
            )
            service.create_entry(spec, actor)
    finally:
        store.close()
    return issued.token, parent


# -- figure 1: entry create -> SVID in a waiting stream ------------------------------------------


class WaitingStream:
    """One FetchX509SVID stream read on a thread; remembers when each SPIFFE ID first arrived."""

    def __init__(self, socket: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        fetch = self._channel.unary_stream(
            FETCH_X509_SVID,
            request_serializer=X509SVIDRequest.SerializeToString,
            response_deserializer=X509SVIDResponse.FromString,
        )
        self._call: Any = fetch(X509SVIDRequest(), metadata=WORKLOAD_HEADER)
        self._seen: dict[str, float] = {}
        self._changed = threading.Condition()
        self.error: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                now = time.perf_counter()
                with self._changed:
                    for svid in message.svids:
                        self._seen.setdefault(svid.spiffe_id, now)
                    self._changed.notify_all()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = err
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, spiffe_id: str, timeout: float) -> float | None:
        """When ``spiffe_id`` first arrived (perf_counter), or None after ``timeout``."""
        with self._changed:
            self._changed.wait_for(
                lambda: spiffe_id in self._seen or not self._reader.is_alive(), timeout
            )
            return self._seen.get(spiffe_id)

    def close(self) -> None:
        self._call.cancel()
        self._reader.join(timeout=10)
        self._channel.close()


@dataclass
class LatencyResult:
    samples_ms: list[float]
    missing: int


def bench_latency(mesh: Mesh, count: int) -> LatencyResult:
    token, agent_id = mesh.token()
    agent = mesh.start_agent(token)
    uid = os.getuid()
    # A stream needs one identity before it opens (else PermissionDenied): a base entry.
    base = f"spiffe://{TD}/bench/latency/base"
    mesh.create_entry("bench/latency/base", [f"unix:uid:{uid}"], agent_id)
    stream = _open_waiting_stream(agent.socket, base)
    samples: list[float] = []
    missing = 0
    try:
        for i in range(count):
            path = f"bench/latency/{i}"
            started = time.perf_counter()
            mesh.create_entry(path, [f"unix:uid:{uid}"], agent_id)
            arrived = stream.wait_for(f"spiffe://{TD}/{path}", LATENCY_TIMEOUT_S)
            if arrived is None:
                missing += 1
                if stream.error is not None:
                    raise RuntimeError(f"the waiting stream ended: {stream.error}")
            else:
                samples.append((arrived - started) * 1000)
            if (i + 1) % 50 == 0:
                progress(f"figure 1: {i + 1}/{count} entries delivered")
    finally:
        stream.close()
        agent.stop()
    return LatencyResult(samples, missing)


def _open_waiting_stream(socket: Path, base: str) -> WaitingStream:
    deadline = time.monotonic() + LATENCY_TIMEOUT_S * 3
    while True:
        stream = WaitingStream(socket)
        if stream.wait_for(base, LATENCY_TIMEOUT_S) is not None:
            return stream
        stream.close()  # PermissionDenied until the base SVID is signed: open again
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SVID for {base} on {socket}: {stream.error}")
        time.sleep(0.1)


# -- figure 2: sync of many entries ---------------------------------------------------------------


@dataclass
class SyncResult:
    entries: int
    signed: int
    refused: int
    ready_s: float
    synced_s: float | None
    all_signed_s: float | None
    rss_kib: int
    hwm_kib: int
    agent_cpu_s: float
    server_cpu_s: float
    audit_svids: int
    audit_batches: int
    audit_rate: float | None


def bench_sync(mesh: Mesh, count: int, token: str, agent_id: str) -> SyncResult:
    assert mesh.server.proc is not None
    server_pid = mesh.server.proc.pid
    since = datetime.now(UTC) - timedelta(seconds=1)
    server_cpu0 = cpu_seconds(server_pid)
    started = time.perf_counter()
    agent = mesh.start_agent(token, wait_ready=False)
    assert agent.proc is not None
    ready_s = synced_s = all_signed_s = None
    signed = refused = 0
    seen = 0
    deadline = started + SYNC_TIMEOUT_S
    next_note = 0
    while all_signed_s is None and time.perf_counter() < deadline:
        lines = agent.output[seen:]
        seen += len(lines)
        now = time.perf_counter() - started
        for line in lines:
            if ready_s is None and "meshid agent ready" in line:
                ready_s = now
            if (m := SYNCED_LINE.search(line)) and synced_s is None and int(m[1]) >= count:
                synced_s = now
            if m := SIGNED_LINE.search(line):
                signed += int(m[1])
            if "server refused an SVID" in line:
                refused += 1
        if signed >= count:
            all_signed_s = now
            break
        if agent.proc.poll() is not None:
            raise RuntimeError("the agent exited during the sync:\n" + "".join(agent.output[-20:]))
        if signed >= next_note:
            progress(f"figure 2: {signed}/{count} SVIDs signed after {now:.1f} s")
            next_note = signed + max(count // 5, 1)
        time.sleep(POLL_S)
    status = proc_status(agent.proc.pid)
    agent_cpu = cpu_seconds(agent.proc.pid)
    server_cpu = cpu_seconds(server_pid) - server_cpu0
    events = _audit_issued(mesh.admin, agent_id, since)
    agent.stop()
    batches: dict[str, int] = {}
    for event in events:
        batches[event["at"]] = batches.get(event["at"], 0) + 1
    rate = None
    if len(batches) > 1:
        times = sorted(batches)
        span = (
            datetime.fromisoformat(times[-1]) - datetime.fromisoformat(times[0])
        ).total_seconds()
        rate = (len(events) - batches[times[-1]]) / span if span > 0 else None
    return SyncResult(
        entries=count,
        signed=signed,
        refused=refused,
        ready_s=ready_s if ready_s is not None else float("nan"),
        synced_s=synced_s,
        all_signed_s=all_signed_s,
        rss_kib=status["VmRSS"],
        hwm_kib=status["VmHWM"],
        agent_cpu_s=agent_cpu,
        server_cpu_s=server_cpu,
        audit_svids=len(events),
        audit_batches=len(batches),
        audit_rate=rate,
    )


def _audit_issued(admin: AdminClient, actor: str, since: datetime) -> list[dict[str, Any]]:
    """Every ``x509_svid.issued`` event with ``actor`` since ``since``, paged by sequence."""
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = admin.json(
            "GET",
            "/v1/audit",
            params={
                "kind": "x509_svid.issued",
                "since": since.isoformat(),
                "after": after,
                "limit": 10_000,
            },
        )
        if not page:
            return events
        # The agent's own SVID (attestation) is audited too: only the synced entries count.
        events += [e for e in page if e["actor"] == actor and SYNC_PATH in (e["spiffe_id"] or "")]
        after = page[-1]["seq"]


# -- figure 3: many streams, one rotation --------------------------------------------------------


@dataclass
class StreamState:
    first_at: float | None = None
    first_serial: int | None = None
    rotated_at: float | None = None
    rotated_serial: int | None = None
    error: str | None = None


@dataclass
class StreamsResult:
    streams: int
    channels: int
    all_first_s: float | None
    got_first: int
    rotated: int
    spread_s: float | None
    first_serials: int
    rotated_serials: int
    errors: dict[str, int]
    rss_kib: int
    agent_cpu_s: float


@dataclass
class _Fleet:
    states: list[StreamState]
    first_done: asyncio.Event = field(default_factory=asyncio.Event)
    rotation_done: asyncio.Event = field(default_factory=asyncio.Event)
    firsts: int = 0
    rotations: int = 0
    ended_before_first: int = 0
    ended_before_rotation: int = 0

    def settle(self) -> None:
        """Wake the waiters once every stream has its answer or can no longer get it."""
        n = len(self.states)
        if self.firsts + self.ended_before_first >= n:
            self.first_done.set()
        if self.rotations + self.ended_before_rotation >= n:
            self.rotation_done.set()


async def _hold_stream(method: Any, state: StreamState, fleet: _Fleet) -> None:
    serials: dict[bytes, int] = {}
    call = method(X509SVIDRequest(), metadata=WORKLOAD_HEADER)
    try:
        async for message in call:
            now = time.perf_counter()
            chain = message.svids[0].x509_svid
            serial = serials.get(chain)
            if serial is None:
                serial = serials[chain] = leaf_serial(chain)
            if state.first_at is None:
                state.first_at, state.first_serial = now, serial
                fleet.firsts += 1
            elif state.rotated_at is None and serial != state.first_serial:
                state.rotated_at, state.rotated_serial = now, serial
                fleet.rotations += 1
            fleet.settle()
    except aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            state.error = f"{err.code().name}: {err.details()}"
    except asyncio.CancelledError:
        call.cancel()
        raise
    finally:  # this stream delivers nothing more
        fleet.ended_before_first += state.first_at is None
        fleet.ended_before_rotation += state.rotated_at is None
        fleet.settle()


async def _streams(socket: Path, count: int, rotation_wait: float) -> tuple[_Fleet, float, int]:
    channels = [
        # A local subchannel pool per channel: grpcio would otherwise share one connection.
        aio.insecure_channel(f"unix://{socket}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(math.ceil(count / STREAMS_PER_CHANNEL))
    ]
    fleet = _Fleet([StreamState() for _ in range(count)])
    methods = [
        c.unary_stream(
            FETCH_X509_SVID,
            request_serializer=X509SVIDRequest.SerializeToString,
            response_deserializer=X509SVIDResponse.FromString,
        )
        for c in channels
    ]
    opened = time.perf_counter()
    tasks = [
        asyncio.create_task(_hold_stream(methods[i % len(methods)], state, fleet))
        for i, state in enumerate(fleet.states)
    ]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fleet.first_done.wait(), FIRST_SVID_TIMEOUT_S)
        progress(f"figure 3: {fleet.firsts}/{count} streams have their first SVID")
        if fleet.firsts:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fleet.rotation_done.wait(), rotation_wait)
        progress(f"figure 3: {fleet.rotations}/{count} streams received the rotation")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return fleet, opened, len(channels)


def bench_streams(mesh: Mesh, count: int, ttl: int) -> StreamsResult:
    token, agent_id = mesh.token()
    agent = mesh.start_agent(token)
    assert agent.proc is not None
    mesh.create_entry("bench/rotating", [f"unix:uid:{os.getuid()}"], agent_id, ttl=ttl)
    _open_waiting_stream(agent.socket, f"spiffe://{TD}/bench/rotating").close()
    rss: list[int] = []

    async def run() -> tuple[_Fleet, float, int]:
        task = asyncio.create_task(_streams(agent.socket, count, ttl + ROTATION_MARGIN_S))
        # While the streams are held: the agent's RSS, sampled until the bench is done.
        while not task.done():
            assert agent.proc is not None
            rss.append(proc_status(agent.proc.pid)["VmRSS"])
            await asyncio.wait({task}, timeout=0.5)
        return task.result()

    try:
        fleet, opened, channels = asyncio.run(run())
        agent_cpu = cpu_seconds(agent.proc.pid)
    finally:
        agent.stop()
    states = fleet.states
    firsts = [s.first_at for s in states if s.first_at is not None]
    rotations = [s.rotated_at for s in states if s.rotated_at is not None]
    errors: dict[str, int] = {}
    for s in states:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    return StreamsResult(
        streams=count,
        channels=channels,
        all_first_s=max(firsts) - opened if len(firsts) == count else None,
        got_first=len(firsts),
        rotated=len(rotations),
        spread_s=max(rotations) - min(rotations) if rotations else None,
        first_serials=len({s.first_serial for s in states if s.first_serial is not None}),
        rotated_serials=len({s.rotated_serial for s in states if s.rotated_serial is not None}),
        errors=errors,
        rss_kib=max(rss) if rss else 0,
        agent_cpu_s=agent_cpu,
    )


# -- report --------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def report_latency(result: LatencyResult, count: int) -> None:
    print(
        f"1. entry create -> SVID in a waiting FetchX509SVID stream "
        f"({count} entries, one at a time)"
    )
    if result.samples_ms:
        s = result.samples_ms
        print(
            f"   p50 {percentile(s, 50):.1f} ms   p99 {percentile(s, 99):.1f} ms   "
            f"max {max(s):.1f} ms   (SPIRE: up to {SPIRE_SYNC_INTERVAL_S:.0f} s sync interval)"
        )
    if result.missing:
        print(
            f"   MISSING: {result.missing}/{count} not delivered within {LATENCY_TIMEOUT_S:.0f} s"
        )


def report_sync(r: SyncResult) -> None:
    print(f"2. fresh agent syncing {r.entries} entries")
    ok = r.all_signed_s is not None
    print(
        f"   start -> ready {r.ready_s:.2f} s, -> all entries synced {_s(r.synced_s)}, "
        f"-> all {r.entries} SVIDs held {_s(r.all_signed_s)}"
        + ("" if ok else f"   INCOMPLETE: {r.signed}/{r.entries} signed")
    )
    if r.refused:
        print(f"   the server refused {r.refused} SVIDs")
    print(
        f"   agent RSS {r.rss_kib / 1024:.0f} MiB (peak {r.hwm_kib / 1024:.0f} MiB), "
        f"agent CPU {r.agent_cpu_s:.1f} s"
    )
    rate = f"{r.audit_rate:.0f} SVIDs/s" if r.audit_rate else "n/a"
    per_cpu = f"{r.audit_svids / r.server_cpu_s:.0f}" if r.server_cpu_s else "n/a"
    print(
        f"   server signing: {r.audit_svids} SVIDs audited in {r.audit_batches} batches, "
        f"{rate} (audit times), server CPU {r.server_cpu_s:.1f} s = {per_cpu} SVIDs per CPU-s "
        "(includes attestation and the entry sync)"
    )


def report_streams(r: StreamsResult, ttl: int) -> None:
    print(
        f"3. {r.streams} concurrent FetchX509SVID streams on one agent "
        f"({r.channels} connection{'s' if r.channels > 1 else ''}), entry X.509 TTL {ttl} s"
    )
    print(
        f"   all {r.streams} first SVIDs after {_s(r.all_first_s)}"
        if r.all_first_s is not None
        else f"   first SVID on {r.got_first}/{r.streams} streams only"
    )
    print(
        f"   rotation received by {r.rotated}/{r.streams} streams, spread first->last "
        f"{_s(r.spread_s)}"
    )
    print(
        f"   agent RSS while holding them {r.rss_kib / 1024:.0f} MiB, "
        f"agent CPU {r.agent_cpu_s:.1f} s"
    )
    if r.first_serials > 1 or r.rotated_serials > 1:
        print(
            f"   note: streams saw {r.first_serials} first serials and {r.rotated_serials} "
            "rotated serials (they opened across a rotation: raise --rotation-ttl)"
        )
    for error, n in sorted(r.errors.items()):
        print(f"   {n} streams ended with {error}")
    success = r.rotated == r.streams and r.rotated_serials == 1 and r.first_serials == 1
    print(
        f"   {'SUCCESS' if success else 'FAILURE'}: {r.rotated}/{r.streams} received the rotation"
    )


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries-latency", type=int, default=200)
    parser.add_argument("--sync-entries", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=1_000)
    parser.add_argument("--rotation-ttl", type=int, default=20, help="seconds (figure 3)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # figures, progress in order
    root = Path(tempfile.mkdtemp(prefix="mb-", dir="/tmp"))
    began = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            progress(f"seeding {args.sync_entries} entries for figure 2 into the server database")
            t = time.perf_counter()
            sync_token, sync_agent = seed_sync_entries(root / "srv", args.sync_entries)
            progress(f"seeded in {time.perf_counter() - t:.1f} s; starting the server")
            port = free_port()
            server = ServerProcess(
                root / "srv",
                root / "adm" / "s.sock",
                trust_domain=TD,
                extra_args=["--bind", f"127.0.0.1:{port}"],
            ).start()
            stack.callback(server.stop)
            admin = stack.enter_context(AdminClient(server.socket))
            bundle = root / "bundle.pem"
            bundle.write_bytes(admin.request("GET", "/v1/bundle").content)
            mesh = Mesh(root, server, f"127.0.0.1:{port}", bundle, admin, stack)

            progress("figure 1: entry create -> SVID")
            latency = bench_latency(mesh, args.entries_latency)
            report_latency(latency, args.entries_latency)
            progress(f"figure 2: fresh agent, {args.sync_entries} entries")
            sync = bench_sync(mesh, args.sync_entries, sync_token, sync_agent)
            report_sync(sync)
            progress(f"figure 3: {args.streams} streams")
            streams = bench_streams(mesh, args.streams, args.rotation_ttl)
            report_streams(streams, args.rotation_ttl)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    progress(f"done in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
