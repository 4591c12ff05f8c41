"""The ``metrics`` filter: counts connections, bytes, durations and failures as they close,
HTTP requests (by result and status, refusals by reason) as they end, and the connections open
now (from the moment the chain sees them, once authenticated, until they close)."""

from __future__ import annotations

from ..l7 import Exchange
from ..metrics import ProxyMetrics
from .base import Connection, Deny


class MetricsFilter:
    name = "metrics"

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._m = metrics

    def on_connection(self, conn: Connection) -> Deny | None:
        if id(conn) not in self._m.open_connections:
            self._m.open_connections.add(id(conn))
            self._m.active.inc(listener=conn.listener, direction=conn.direction)
        return None

    def on_close(self, conn: Connection) -> None:
        m = self._m
        labels = {"listener": conn.listener, "direction": conn.direction}
        if id(conn) in m.open_connections:
            m.open_connections.discard(id(conn))
            m.active.dec(**labels)
        m.connections.inc(result=conn.result, **labels)
        m.bytes.inc(conn.bytes_in, flow="in", **labels)
        m.bytes.inc(conn.bytes_out, flow="out", **labels)
        m.duration.observe(conn.duration(), **labels)
        if conn.result == "rejected" and conn.error is not None:
            m.tls_failures.inc(reason=conn.error, **labels)

    passes_requests = True  # on_request below lets everything through: the chain skips it

    async def on_request(self, conn: Connection, request: object, exchange: Exchange) -> None:
        return None

    def on_request_end(self, conn: Connection, exchange: Exchange) -> None:
        status = "none" if exchange.status is None else str(exchange.status)
        self._m.http_requests.inc_values((conn.listener, conn.direction, exchange.result, status))
        if exchange.result == "rejected" and exchange.error is not None:
            self._m.http_rejected.inc_values((conn.listener, conn.direction, exchange.error))
