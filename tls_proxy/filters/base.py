"""The filter interface: what a filter sees of a connection and how it answers.

Owns ``Connection`` (per-connection state the listener fills in: peer identity, addresses,
bytes, verdict, error), ``Deny``, the ``ConnectionFilter`` protocol (``on_connection`` after the
peer is authenticated and before any byte is relayed; ``on_close`` once for every accepted
connection, refused ones included), the ``RequestFilter`` protocol every HTTP codec calls per
request (``on_request`` before the request is forwarded, ``on_request_end`` once it is over)
with codec-independent values from ``tls_proxy.l7``, and ``FilterChain``. Filters are built
once from their own frozen config block; state that belongs to one connection lives on the
``Connection``. It must not do socket I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from authz import Verdict

from ..l7 import Exchange, LocalResponse, RequestHead

log = logging.getLogger(__name__)

Direction = Literal["inbound", "outbound"]


@dataclass
class Connection:
    """One accepted connection as the filters see it."""

    listener: str
    direction: Direction
    source_address: str
    source_port: int
    destination_port: int
    protocol: str = "tcp"  # the listener's protocol: tcp | http
    local_id: str | None = None
    peer_id: str | None = None
    upstream: str | None = None
    bytes_in: int = 0  # from the initiator toward the far side
    bytes_out: int = 0  # back toward the initiator
    verdict: Verdict | None = None
    result: str = "error"  # allowed | denied | rejected | error, set by the listener
    error: str | None = None  # a RejectReason or a short failure label
    detail: str | None = None
    requests: int = 0  # HTTP requests seen (each one gets its own access-log line)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.monotonic)

    @property
    def source(self) -> str:
        return f"{self.source_address}:{self.source_port}"

    def duration(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True)
class Deny:
    """A filter's refusal: the listener closes the connection; ``reason`` goes to the log."""

    filter: str
    reason: str


class ConnectionFilter(Protocol):
    """A connection-level filter."""

    name: str

    def on_connection(self, conn: Connection) -> Deny | None:
        """Called once the peer is authenticated; return ``Deny`` to close the connection."""
        ...

    def on_close(self, conn: Connection) -> None:
        """Called once when the connection ends, however it ended."""
        ...


class RequestFilter(Protocol):
    """A request-level filter, called by every HTTP codec (HTTP/1.1 now, HTTP/2 later).

    ``on_request`` sees the normalized request head before it is forwarded and may record on
    ``exchange``; a ``LocalResponse`` returned ends the request there (the 403 of ``authz``),
    ``None`` passes it on. ``on_request_end`` runs once per request however it ended.
    """

    name: str

    async def on_request(
        self, conn: Connection, request: RequestHead, exchange: Exchange
    ) -> LocalResponse | None: ...

    def on_request_end(self, conn: Connection, exchange: Exchange) -> None: ...


def passes_every_request(item: RequestFilter) -> bool:
    """Whether ``item`` only observes (its class sets ``passes_requests = True``: its
    ``on_request`` returns None whatever comes), so the chain need not call ``on_request``."""
    return bool(getattr(item, "passes_requests", False))


class FilterChain:
    """Connection filters in order: the first ``Deny`` wins; ``on_close`` reaches every one.
    Request filters likewise: the first ``LocalResponse`` wins; ``on_request_end`` reaches all."""

    def __init__(
        self,
        filters: Sequence[ConnectionFilter],
        request_filters: Sequence[RequestFilter] = (),
    ) -> None:
        self.filters = tuple(filters)
        self.request_filters = tuple(request_filters)
        # on_request is awaited once per filter per request: observers are left out, and a
        # single deciding filter is called directly (one coroutine per request, not two)
        self._deciding = tuple(f for f in self.request_filters if not passes_every_request(f))
        self.on_request: Callable[
            [Connection, RequestHead, Exchange], Coroutine[Any, Any, LocalResponse | None]
        ] = self._deciding[0].on_request if len(self._deciding) == 1 else self._each

    async def _each(
        self, conn: Connection, request: RequestHead, exchange: Exchange
    ) -> LocalResponse | None:
        for item in self._deciding:
            response = await item.on_request(conn, request, exchange)
            if response is not None:
                return response
        return None

    def on_request_end(self, conn: Connection, exchange: Exchange) -> None:
        for item in self.request_filters:
            try:
                item.on_request_end(conn, exchange)
            except Exception:  # an observer's bug must not break the connection
                log.exception("filter on_request_end failed", extra={"filter": item.name})

    def on_connection(self, conn: Connection) -> Deny | None:
        for item in self.filters:
            deny = item.on_connection(conn)
            if deny is not None:
                return deny
        return None

    def on_close(self, conn: Connection) -> None:
        for item in self.filters:
            try:
                item.on_close(conn)
            except Exception:  # an observer's bug must not leak the connection's cleanup
                log.exception("filter on_close failed", extra={"filter": item.name})
