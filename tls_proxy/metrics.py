"""A tiny in-process metrics registry rendered in the Prometheus text format (version 0.0.4).

Owns counters, gauges and histograms with labels and their exposition. Enough for ``/metrics``
without a dependency; values live in the process, guarded by one lock per metric so a
subscriber thread (identity rotation) may count too. It must not do I/O.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

LabelValues = tuple[str, ...]
# Connection durations span a millisecond health check to hours-long streams.
DURATION_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)


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

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name}: expected labels {self.labelnames}, got {sorted(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def dec(self, amount: float = 1.0, /, **labels: str) -> None:
        self.inc(-amount, **labels)

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

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        metric = Gauge(name, help_text, labelnames)
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
