"""The ``metrics`` filter: counts connections, bytes, durations and failures as they close."""

from __future__ import annotations

from ..metrics import ProxyMetrics
from .base import Connection, Deny


class MetricsFilter:
    name = "metrics"

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._m = metrics

    def on_connection(self, conn: Connection) -> Deny | None:
        return None

    def on_close(self, conn: Connection) -> None:
        m = self._m
        labels = {"listener": conn.listener, "direction": conn.direction}
        m.connections.inc(result=conn.result, **labels)
        m.bytes.inc(conn.bytes_in, flow="in", **labels)
        m.bytes.inc(conn.bytes_out, flow="out", **labels)
        m.duration.observe(conn.duration(), **labels)
        if conn.result == "rejected" and conn.error is not None:
            m.tls_failures.inc(reason=conn.error, **labels)
