"""A tiny in-process metrics registry rendered in the Prometheus text format (version 0.0.4).

Owns counters, gauges and histograms with labels and their exposition. Enough for ``/metrics``
without a dependency; values live in the process, guarded by one lock per metric so a
subscriber thread (identity rotation) may count too. It must not do I/O.

It also owns the totals over worker processes (``runtime.workers``): ``Registry.snapshot``
turns a registry into plain JSON-able values and ``merge`` folds several workers' snapshots
into one registry: counters and histograms add up, each gauge by its ``aggregate`` (``sum``
for connections open now, ``min`` where every worker must agree, e.g. the policy revision in
force everywhere). Counting stays a dict update in the counting process: the merge costs the
scrape, not the request.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

LabelValues = tuple[str, ...]
Aggregate = Literal["sum", "min", "max"]  # how worker processes' values of a gauge combine
Snapshot = list[dict[str, Any]]  # ``Registry.snapshot``: one JSON-able dict per metric
# Connection durations span a millisecond health check to hours-long streams.
DURATION_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)


def _getter(names: tuple[str, ...]) -> Callable[[dict[str, str]], LabelValues]:
    """A function taking a label dict to its values in ``names`` order, as a tuple."""
    get = operator.itemgetter(*names)
    if len(names) == 1:
        return lambda labels: (get(labels),)
    return get


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        # the label values in ``labelnames`` order, in one C call (counting is on the hot path)
        self._values_of: Callable[[dict[str, str]], LabelValues] = (
            (lambda _: ()) if not labelnames else _getter(self.labelnames)
        )

    def _key(self, labels: dict[str, str]) -> LabelValues:
        try:
            key = self._values_of(labels)
        except KeyError:
            key = ()
        if len(labels) != len(self.labelnames) or len(key) != len(self.labelnames):
            raise ValueError(
                f"{self.name}: expected labels {self.labelnames}, got {sorted(labels)}"
            )
        return key  # label values are str (typed so at every call)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def _describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "help": self.help,
            "labelnames": list(self.labelnames),
        }


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        self.inc_values(self._key(labels), amount)

    def inc_values(self, values: LabelValues, amount: float = 1.0) -> None:
        """``inc`` with the label values as a tuple in ``labelnames`` order: the per-request
        counters take this way, without a keyword dict per call."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected values for {self.labelnames}, got {values}")
        with self._lock:
            self._values[values] = self._values.get(values, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            values = [[list(k), v] for k, v in self._values.items()]
        return {**self._describe(), "values": values}

    def _fold(self, key: LabelValues, value: float) -> None:
        self._values[key] = self._values.get(key, 0.0) + value


class Gauge(Counter):
    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        aggregate: Aggregate = "sum",
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.aggregate: Aggregate = aggregate

    def dec(self, amount: float = 1.0, /, **labels: str) -> None:
        self.inc(-amount, **labels)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "aggregate": self.aggregate}

    def _fold(self, key: LabelValues, value: float) -> None:
        if self.aggregate == "sum" or key not in self._values:
            super()._fold(key, value)
        else:
            pick = min if self.aggregate == "min" else max
            self._values[key] = pick(self._values[key], value)

    def set(self, value: float, /, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DURATION_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = (*tuple(sorted(buckets)), math.inf)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self.buckets))
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[index] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            counts = self._counts.get(self._key(labels))
        return 0 if counts is None else counts[-1]

    def samples(self) -> list[str]:
        lines = []
        with self._lock:
            items = sorted((k, list(v), self._sums[k]) for k, v in self._counts.items())
        for key, counts, total in items:
            for bound, count in zip(self.buckets, counts, strict=True):
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {count}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {counts[-1]}")
        return lines

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            values = [[list(k), list(v), self._sums[k]] for k, v in self._counts.items()]
        return {**self._describe(), "buckets": list(self.buckets[:-1]), "values": values}

    def _fold(self, key: LabelValues, counts: Sequence[int], total: float) -> None:
        if len(counts) != len(self.buckets):
            raise ValueError(
                f"{self.name}: expected {len(self.buckets)} bucket counts (got {len(counts)})"
            )
        mine = self._counts.setdefault(key, [0] * len(self.buckets))
        for index, count in enumerate(counts):
            mine[index] += int(count)
        self._sums[key] = self._sums.get(key, 0.0) + total


class Registry:
    """Metrics by name, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, labelnames)
        self._add(metric)
        return metric

    def gauge(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        aggregate: Aggregate = "sum",
    ) -> Gauge:
        """A gauge; ``aggregate`` says how worker processes' values combine (see ``merge``)."""
        metric = Gauge(name, help_text, labelnames, aggregate)
        self._add(metric)
        return metric

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DURATION_BUCKETS,
    ) -> Histogram:
        metric = Histogram(name, help_text, labelnames, buckets)
        self._add(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.header())
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"

    def snapshot(self) -> Snapshot:
        """Every metric's values as plain lists and numbers (JSON), in registration order."""
        return [metric.snapshot() for metric in self._metrics.values()]


def merge(snapshots: Sequence[Snapshot]) -> Registry:
    """One registry holding the totals of ``snapshots`` (one per worker process).

    Counters and histograms add up; a gauge combines by the ``aggregate`` it was registered
    with. Metrics come in the order the first snapshot that has them lists them. A metric
    whose kind, labels or buckets differ between snapshots is an error (the workers run one
    build, so it means a bug, not a value to guess).
    """
    merged = Registry()
    for snapshot in snapshots:
        for entry in snapshot:
            name = entry["name"]
            metric = merged._metrics.get(name)
            if metric is None:
                metric = _empty(entry)
                merged._add(metric)
            elif metric.kind != entry["kind"] or list(metric.labelnames) != entry["labelnames"]:
                raise ValueError(f"{name}: workers disagree on its kind or labels")
            for value in entry["values"]:
                key = tuple(value[0])
                if isinstance(metric, Histogram):
                    metric._fold(key, value[1], float(value[2]))
                elif isinstance(metric, Counter):
                    metric._fold(key, float(value[1]))
    return merged


def _empty(entry: dict[str, Any]) -> _Metric:
    name, help_text, labels = entry["name"], entry["help"], entry["labelnames"]
    if entry["kind"] == "counter":
        return Counter(name, help_text, labels)
    if entry["kind"] == "gauge":
        return Gauge(name, help_text, labels, entry.get("aggregate", "sum"))
    if entry["kind"] == "histogram":
        return Histogram(name, help_text, labels, entry["buckets"])
    raise ValueError(f"{name}: unknown metric kind {entry['kind']!r}")


class ProxyMetrics:
    """The proxy's metrics, registered once; filters and listeners count into them."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or Registry()
        r = self.registry
        self.connections = r.counter(
            "meshid_proxy_connections_total",
            "Connections accepted and how they ended (allowed, denied, rejected, error).",
            ("listener", "direction", "result"),
        )
        self.active = r.gauge(
            "meshid_proxy_active_connections", "Connections open now.", ("listener", "direction")
        )
        # The connections counted in ``active``: shared by every chain built on these metrics,
        # so one accepted before a reload is uncounted by the chain it closes under.
        self.open_connections: set[int] = set()
        self.config_reloads = r.counter(
            "meshid_proxy_config_reloads_total",
            "Configuration reloads (SIGHUP or a change of the file) by result.",
            ("result",),
        )
        self.tls_failures = r.counter(
            "meshid_proxy_tls_failures_total",
            "Peers that failed TLS or SPIFFE authentication, by reason.",
            ("listener", "direction", "reason"),
        )
        self.authz = r.counter(
            "meshid_proxy_authz_decisions_total",
            "L4 authorization decisions.",
            ("listener", "decision"),
        )
        self.http_requests = r.counter(
            "meshid_proxy_http_requests_total",
            "HTTP requests by how they ended (allowed, denied, rejected, error) and status.",
            ("listener", "direction", "result", "status"),
        )
        self.http_rejected = r.counter(
            "meshid_proxy_http_rejected_total",
            "HTTP requests refused before the app (400, 408, 431) by reason.",
            ("listener", "direction", "reason"),
        )
        self.http_authz = r.counter(
            "meshid_proxy_http_authz_decisions_total",
            "L7 authorization decisions by deciding policy and rule, or the default's reason.",
            ("listener", "decision", "policy", "rule"),
        )
        self.bytes = r.counter(
            "meshid_proxy_bytes_total",
            "Bytes relayed; in = from the connection's initiator, out = toward it.",
            ("listener", "direction", "flow"),
        )
        self.duration = r.histogram(
            "meshid_proxy_connection_duration_seconds",
            "Connection lifetime.",
            ("listener", "direction"),
        )
        # Set from the listeners' ``H2Pool`` when /metrics is rendered.
        self.h2_upstream_connections = r.gauge(
            "meshid_proxy_h2_upstream_connections",
            "Upstream HTTP/2 connections open, shared by the streams of every downstream one.",
            ("listener", "direction"),
        )
        self.h2_upstream_streams = r.gauge(
            "meshid_proxy_h2_upstream_streams",
            "Streams open on the shared upstream HTTP/2 connections.",
            ("listener", "direction"),
        )
        self.rotations = r.counter(
            "meshid_proxy_identity_rotations_total", "New SVIDs or bundles put into TLS use."
        )
        self.policy_reloads = r.counter(
            "meshid_proxy_policy_reloads_total",
            "Policy file reloads by result (ok, failed).",
            ("result",),
        )
