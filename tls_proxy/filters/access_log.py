"""The ``access_log`` filter: one JSON line per connection when it closes.

Fields: ``time`` (start, RFC 3339), ``listener``, ``direction``, ``peer_id``, ``local_id``,
``source``, ``upstream``, ``bytes_in``, ``bytes_out``, ``duration_ms``, ``result``,
``verdict`` with the deciding ``policy``/``rule``/``reason``, and ``error`` (a reject reason).
Configured by the ``access_log`` block: ``path: "-"`` is stdout, ``null`` turns it off.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import IO, Any

from ..config import AccessLogConfig
from .base import Connection, Deny


def access_record(conn: Connection) -> dict[str, Any]:
    """The JSON-ready access-log record of ``conn``."""
    verdict = conn.verdict
    return {
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
        "verdict": None
        if verdict is None
        else {
            "decision": verdict.decision,
            "policy": verdict.policy,
            "rule": verdict.rule,
            "reason": verdict.reason,
        },
        "error": conn.error,
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
        line = json.dumps(access_record(conn), separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
