"""The metrics registry's snapshots and their merge (the totals over worker processes), and the
worker sockets that carry them (real Unix sockets in a private directory)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tls_proxy.metrics import ProxyMetrics, Registry, merge
from tls_proxy.worker_metrics import WorkerMetrics, socket_path


def _worker(connections: int, active: int, revision: int, durations: list[float]) -> Registry:
    registry = Registry()
    total = registry.counter("conns_total", "Connections.", ("listener",))
    total.inc(connections, listener="web")
    registry.gauge("active", "Open now.", ("listener",)).inc(active, listener="web")
    registry.gauge("revision", "Policy revision.", aggregate="min").inc(revision)
    registry.gauge("newest", "Newest.", aggregate="max").inc(revision)
    histogram = registry.histogram("duration_seconds", "Lifetime.", buckets=(0.1, 1.0))
    for value in durations:
        histogram.observe(value)
    return registry


def _sample(text: str, series: str) -> str:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{series} not in:\n{text}"
    return found.group(1)


def test_counters_and_histograms_add_up_and_gauges_combine_by_their_aggregate() -> None:
    one = _worker(connections=3, active=2, revision=7, durations=[0.05, 0.5])
    two = _worker(connections=4, active=1, revision=5, durations=[5.0])
    text = merge([one.snapshot(), two.snapshot()]).render()
    assert _sample(text, 'conns_total{listener="web"}') == "7"
    assert _sample(text, 'active{listener="web"}') == "3"  # sum: open in either worker
    assert _sample(text, "revision") == "5"  # min: the oldest set a worker still enforces
    assert _sample(text, "newest") == "7"
    assert _sample(text, 'duration_seconds_bucket{le="0.1"}') == "1"
    assert _sample(text, 'duration_seconds_bucket{le="1"}') == "2"
    assert _sample(text, 'duration_seconds_bucket{le="+Inf"}') == "3"
    assert _sample(text, "duration_seconds_count") == "3"
    assert _sample(text, "duration_seconds_sum") == "5.55"
    assert text.index("# TYPE conns_total counter") < text.index("# TYPE duration_seconds")


def test_counting_by_value_tuple_is_counting_by_keywords() -> None:
    registry = Registry()
    total = registry.counter("requests_total", "Requests.", ("listener", "status"))
    total.inc(listener="web", status="200")
    total.inc_values(("web", "200"), 2)
    total.inc_values(("web", "503"))
    assert total.value(listener="web", status="200") == 3
    assert total.value(listener="web", status="503") == 1
    with pytest.raises(ValueError, match=r"requests_total: expected values for \('listener', "):
        total.inc_values(("web",))
    assert _sample(registry.render(), 'requests_total{listener="web",status="200"}') == "3"


def test_series_only_some_workers_have_are_kept() -> None:
    one, two = Registry(), Registry()
    one.counter("reqs_total", "Requests.", ("status",)).inc(status="200")
    two.counter("reqs_total", "Requests.", ("status",)).inc(2, status="503")
    two.counter("late_total", "Only worker two registered it.").inc()
    text = merge([one.snapshot(), two.snapshot()]).render()
    assert _sample(text, 'reqs_total{status="200"}') == "1"
    assert _sample(text, 'reqs_total{status="503"}') == "2"
    assert _sample(text, "late_total") == "1"


def test_a_snapshot_survives_json_and_one_worker_merges_to_itself() -> None:
    metrics = ProxyMetrics()
    metrics.connections.inc(listener="web", direction="inbound", result="allowed")
    metrics.active.inc(listener="web", direction="inbound")
    metrics.active.dec(listener="web", direction="inbound")  # a gauge back at 0 stays a series
    metrics.duration.observe(0.2, listener="web", direction="inbound")
    snapshot = json.loads(json.dumps(metrics.registry.snapshot()))
    assert merge([snapshot]).render() == metrics.registry.render()


DISAGREEMENTS = [
    ("kind", lambda r: r.gauge("x", "X."), "workers disagree on its kind or labels"),
    ("labels", lambda r: r.counter("x", "X.", ("a",)), "workers disagree on its kind or labels"),
]


@pytest.mark.parametrize(
    ("register", "message"), [d[1:] for d in DISAGREEMENTS], ids=[d[0] for d in DISAGREEMENTS]
)
def test_workers_that_disagree_on_a_metric_are_an_error(register: object, message: str) -> None:
    one, two = Registry(), Registry()
    one.counter("x", "X.")
    assert callable(register)
    register(two)
    with pytest.raises(ValueError, match=message):
        merge([one.snapshot(), two.snapshot()])


@given(st.lists(st.lists(st.integers(0, 1000), min_size=3, max_size=3), min_size=1, max_size=5))
def test_merged_counters_are_the_sum_over_workers(per_worker: list[list[int]]) -> None:
    snapshots = []
    for counts in per_worker:
        registry = Registry()
        counter = registry.counter("c_total", "C.", ("k",))
        for key, count in zip("abc", counts, strict=True):
            if count:
                counter.inc(count, k=key)
        snapshots.append(registry.snapshot())
    merged = merge(snapshots).render()
    for index, key in enumerate("abc"):
        total = sum(counts[index] for counts in per_worker)
        if total:
            assert _sample(merged, f'c_total{{k="{key}"}}') == str(total)


# --- the worker sockets -----------------------------------------------------------------------


@pytest.fixture
def workers_dir() -> Iterator[Path]:
    """A private directory as the parent makes it (short: Unix socket paths are limited)."""
    directory = Path(tempfile.mkdtemp(prefix="mw-"))
    try:
        yield directory
    finally:
        for item in directory.iterdir():
            item.unlink()
        directory.rmdir()


def test_every_worker_answers_the_totals_and_a_gone_one_leaves_no_gauge(workers_dir: Path) -> None:
    async def main() -> None:
        registries = [_worker(1, 1, 3, []), _worker(2, 2, 3, []), _worker(4, 4, 3, [])]
        workers = [WorkerMetrics(workers_dir, i, 3, r) for i, r in enumerate(registries)]
        for worker in workers:
            await worker.start()
        assert oct(workers_dir.stat().st_mode & 0o777) == "0o700"
        assert oct(socket_path(workers_dir, 0).stat().st_mode & 0o777) == "0o600"
        try:
            for worker in workers:  # the same totals whichever worker is scraped
                text = await worker.render()
                assert _sample(text, 'conns_total{listener="web"}') == "7"
                assert _sample(text, 'active{listener="web"}') == "7"
                assert _sample(text, "meshid_proxy_workers") == "3"
                assert _sample(text, "meshid_proxy_workers_reporting") == "3"
            await workers[2].stop()  # exited: its socket is gone
            assert not socket_path(workers_dir, 2).exists()
            text = await workers[0].render()
            assert _sample(text, 'active{listener="web"}') == "3"
            assert _sample(text, "meshid_proxy_workers_reporting") == "2"
            # Killed: its socket file stays, but nobody listens on it.
            server = workers[1]._server
            assert server is not None
            server.close()
            await server.wait_closed()
            assert socket_path(workers_dir, 1).exists()
            text = await workers[0].render()
            assert _sample(text, 'active{listener="web"}') == "1"
            assert _sample(text, "meshid_proxy_workers_reporting") == "1"
            # A worker started again in its place takes over the stale socket file.
            again = WorkerMetrics(workers_dir, 1, 3, _worker(0, 5, 3, []))
            await again.start()
            workers[1] = again
            text = await workers[0].render()
            assert _sample(text, 'active{listener="web"}') == "6"
        finally:
            for worker in workers:
                await worker.stop()
        assert not os.listdir(workers_dir)

    asyncio.run(main())
