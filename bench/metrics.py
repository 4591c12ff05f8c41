"""Benchmark of the proxy's metrics: the per-increment cost on the request path, and the cost
of one ``/metrics`` scrape that totals several workers.

Counting is what every connection and request pays (``Counter.inc`` with labels, the active
gauge up and down, a duration observed); it is the same with one worker or many, since the
workers' totals are merged when scraped (``tls_proxy/worker_metrics.py``). The scrape side
times ``snapshot`` + JSON both ways + ``merge`` + ``render`` for N workers of a registry with
``--series`` label sets per metric, without the sockets.

Run: ``.venv/bin/python bench/metrics.py`` (``--increments N``, ``--workers N``).
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tls_proxy.metrics import ProxyMetrics, merge

REPEATS = 5  # the best of five runs: the least disturbed by other work on the machine


def per_call_ns(statement: str, namespace: dict[str, object], number: int) -> float:
    best = min(timeit.repeat(statement, globals=namespace, number=number, repeat=REPEATS))
    return best / number * 1e9


def filled(series: int) -> ProxyMetrics:
    metrics = ProxyMetrics()
    for i in range(series):
        labels = {"listener": f"listener-{i}", "direction": "inbound"}
        metrics.connections.inc(**labels, result="allowed")
        metrics.active.inc(**labels)
        metrics.bytes.inc(1024, **labels, flow="in")
        metrics.duration.observe(0.01 * i, **labels)
        metrics.http_requests.inc(**labels, result="allowed", status="200")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--increments", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--series", type=int, default=50, help="label sets per metric")
    args = parser.parse_args()

    metrics = ProxyMetrics()
    namespace: dict[str, object] = {"m": metrics}
    cases = {
        "counter inc (3 labels)": (
            "m.connections.inc(listener='web', direction='inbound', result='allowed')"
        ),
        "gauge inc + dec (2 labels)": (
            "m.active.inc(listener='web', direction='inbound');"
            "m.active.dec(listener='web', direction='inbound')"
        ),
        "histogram observe (2 labels)": (
            "m.duration.observe(0.2, listener='web', direction='inbound')"
        ),
    }
    print(f"per call, best of {REPEATS} x {args.increments}:")
    for name, statement in cases.items():
        print(f"  {name:32} {per_call_ns(statement, namespace, args.increments):8.0f} ns")

    workers = [filled(args.series) for _ in range(args.workers)]

    def scrape() -> str:
        own, *others = (w.registry.snapshot() for w in workers)
        wire = [json.loads(json.dumps(s)) for s in others]  # what the sockets carry
        return merge([own, *wire]).render()

    rounds = 20
    total = min(timeit.repeat(scrape, number=rounds, repeat=REPEATS)) / rounds
    alone = min(timeit.repeat(workers[0].registry.render, number=rounds, repeat=REPEATS)) / rounds
    print(
        f"one scrape, {args.series} series per metric: totalling {args.workers} workers "
        f"{total * 1e3:.2f} ms, one worker's render alone {alone * 1e3:.2f} ms "
        f"({len(scrape())} bytes of text)"
    )


if __name__ == "__main__":
    main()
