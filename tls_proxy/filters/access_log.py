"""The ``access_log`` filter: one JSON line per connection when it closes, or, on ``http``
listeners, one line per request when it ends (``"type": "request"``; a connection that ended
before any request, refused at TLS for example, still gets its connection line).

Fields: ``time`` (start, RFC 3339), ``listener``, ``direction``, ``peer_id``, ``local_id``,
``source``, ``upstream``, ``bytes_in``, ``bytes_out``, ``duration_ms``, ``result``,
``verdict`` with the deciding ``policy``/``rule``/``reason``, and ``error`` (a reject reason).
Request lines add ``method``, ``host``, ``path`` (normalized), ``status`` and the verdict's
``dry_run`` and ``audit`` results; ``bytes_in``/``bytes_out`` are then body bytes.
Configured by the ``access_log`` block: ``path: "-"`` is stdout, ``null`` turns it off.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import IO, Any

from authz import Verdict

from ..config import AccessLogConfig
from ..l7 import Exchange
from .base import Connection, Deny


def _verdict(verdict: Verdict | None, *, full: bool = False) -> dict[str, Any] | None:
    if verdict is None:
        return None
    out: dict[str, Any] = {
        "decision": verdict.decision,
        "policy": verdict.policy,
        "rule": verdict.rule,
        "reason": verdict.reason,
    }
    if full:
        out["dry_run"] = [r.as_dict() for r in verdict.dry_run]
        out["audit"] = [m.as_dict() for m in verdict.audit]
    return out


def access_record(conn: Connection) -> dict[str, Any]:
    """The JSON-ready access-log record of ``conn``."""
    return {
        "type": "connection",
        "time": conn.started_at.isoformat(),
        "listener": conn.listener,
        "direction": conn.direction,
        "peer_id": conn.peer_id,
        "local_id": conn.local_id,
        "source": conn.source,
        "upstream": conn.upstream,
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "duration_ms": round(conn.duration() * 1000, 3),
        "result": conn.result,
        "verdict": _verdict(conn.verdict),
        "error": conn.error,
    }


def request_record(conn: Connection, exchange: Exchange) -> dict[str, Any]:
    """The JSON-ready access-log record of one HTTP request on ``conn``."""
    return {
        "type": "request",
        "time": exchange.started_at.isoformat(),
        "listener": conn.listener,
        "direction": conn.direction,
        "peer_id": conn.peer_id,
        "local_id": conn.local_id,
        "source": conn.source,
        "upstream": conn.upstream,
        "method": exchange.method,
        "host": exchange.host,
        "path": exchange.path,
        "status": exchange.status,
        "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out,
        "duration_ms": round(exchange.duration() * 1000, 3),
        "result": exchange.result,
        "verdict": _verdict(exchange.verdict, full=True),
        "error": exchange.error,
    }


class AccessLogFilter:
    name = "access_log"

    def __init__(self, config: AccessLogConfig, stream: IO[str] | None = None) -> None:
        self._owned: IO[str] | None = None
        if stream is None and config.path not in (None, "-"):
            assert config.path is not None
            self._owned = open(config.path, "a", buffering=1)  # noqa: SIM115  closed in close()
            stream = self._owned
        self._stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()

    def on_connection(self, conn: Connection) -> Deny | None:
        return None

    def on_close(self, conn: Connection) -> None:
        if conn.requests == 0:
            self._write(access_record(conn))

    passes_requests = True  # on_request below lets everything through: the chain skips it

    async def on_request(self, conn: Connection, request: object, exchange: Exchange) -> None:
        return None

    def on_request_end(self, conn: Connection, exchange: Exchange) -> None:
        self._write(request_record(conn, exchange))

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
