"""Protocol-independent L7 values and rules, shared by every HTTP codec (``http1``, ``http2``).

Owns what a request-level filter sees (``RequestHead``) and may answer (``LocalResponse``), the
per-request record (``Exchange``) the access log and metrics read, the hardening checks that
h11 does not make itself (``check_raw_head``, ``check_fields``), header rewriting for forwarding
(hop-by-hop removal, identity headers, ``x-forwarded-client-cert``) and ``HttpSession``, the
values a codec is started with. Pure: values in, values out; it must not do socket I/O nor
know a wire format beyond the header-field rules of RFC 9110/9112.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from authz import Verdict

from .errors import ProxyError

if TYPE_CHECKING:
    import asyncio

    from .config import HttpConfig
    from .filters.base import Connection, FilterChain
    from .h2shared import SharedH2

Header = tuple[bytes, bytes]

# RFC 9110 §7.6.1: meaningful for one connection only; never forwarded. Transfer-Encoding is
# hop-by-hop too, but the codec re-frames bodies exactly as they came, so it is kept.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
# Headers a `Connection:` token must never remove: they frame the message or route it.
NEVER_DROPPED = frozenset({b"content-length", b"transfer-encoding", b"host"})
DENIED_BODY = b"RBAC: access denied"
DENIED_BY_HEADER = b"x-meshid-denied-by"
XFCC_HEADER = b"x-forwarded-client-cert"
_BLANK_LINE = re.compile(rb"\n\r?\n")  # where a head ends, as h11 finds it (bare LF included)


class HttpRejected(ProxyError):
    """A request the proxy refuses before it reaches the app: ``status``, a short ``reason``
    label for counters and logs, and a ``detail`` for the log only (peers get a terse body)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        super().__init__(f"{status} {reason}: {detail}")


class RequestHead(NamedTuple):
    """One request as filters see it: the normalized target and lower-cased header values
    (a repeated header joined with ``","``, RFC 9110 §5.3). Immutable; a named tuple rather
    than a frozen dataclass, as one is made per request and is cheaper to build."""

    method: str
    target: str  # normalized path with its query, exactly what is forwarded
    path: str | None  # the normalized path without the query; None for CONNECT
    host: str | None
    headers: Mapping[str, str]


@dataclass(frozen=True)
class LocalResponse:
    """An answer made by the proxy (a filter's 403, a 400 for a malformed request)."""

    status: int
    body: bytes = b""
    headers: tuple[Header, ...] = ()
    reason: str = ""  # why, for the log and the exchange record


class Exchange:
    """One request/response as the access log and metrics see it, filled in as it goes.

    A plain class whose defaults live on the class: one is made per request, and only what
    a request sets is stored on it."""

    method: str | None = None
    path: str | None = None
    host: str | None = None
    status: int | None = None
    result: str = "error"  # allowed | denied | rejected | error
    verdict: Verdict | None = None
    error: str | None = None
    detail: str | None = None
    bytes_in: int = 0  # request body bytes
    bytes_out: int = 0  # response body bytes

    def __init__(self, started: float | None = None) -> None:
        # now, or when the codec says (HTTP/1.1 makes one before the keep-alive wait and
        # stamps it at the request's first byte)
        self.started = time.monotonic() if started is None else started

    @property
    def started_at(self) -> datetime:
        """The wall-clock time of ``started``, worked out when asked (the access log)."""
        return datetime.now(UTC) - timedelta(seconds=time.monotonic() - self.started)

    def duration(self) -> float:
        return time.monotonic() - self.started


Upstream = tuple["asyncio.StreamReader", "asyncio.StreamWriter"]
UpstreamProtocol = Literal["http/1.1", "h2"]  # what the codec will speak on it (the ALPN offer)


@dataclass(frozen=True)
class HttpSession:
    """What a codec is started with, for one accepted (and authenticated) connection."""

    conn: Connection
    chain: FilterChain
    settings: HttpConfig
    idle: float  # seconds without a byte while a message is in flight
    # None: unreachable (or, over mTLS, the far side did not accept that protocol), logged
    open_upstream: Callable[[UpstreamProtocol], Awaitable[Upstream | None]]
    xfcc: bytes | None  # inbound: the x-forwarded-client-cert value to set; outbound: None
    prefix: bytes = b""  # bytes the listener read to detect the protocol, not yet consumed
    draining: asyncio.Event | None = None  # set when the listener drains: stop taking requests
    # HTTP/1.1 pooling (``pool.UpstreamPool``), None where the listener pools nothing:
    # ``checkout`` an idle upstream connection (None: open one with ``open_upstream``) and
    # ``checkin`` one whose last exchange completed in both directions.
    checkout: Callable[[], Upstream | None] | None = None
    checkin: Callable[[Upstream], None] | None = None
    # HTTP/2 (``h2pool.H2Pool``): a shared upstream connection with room for one more stream,
    # None when none could be opened (logged); raises ``h2pool.UpstreamBusy`` when all are full.
    h2_upstream: Callable[[], Awaitable[SharedH2 | None]] | None = None


class Codec(Protocol):
    """Serves one connection's requests until it ends; one module per protocol."""

    async def __call__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: HttpSession
    ) -> None: ...


def xfcc_value(own_id: str, peer_id: str) -> bytes:
    """Envoy's ``x-forwarded-client-cert`` element for a verified peer: ``By=…;URI=…``."""
    return f"By={own_id};URI={peer_id}".encode("ascii")


def check_raw_head(raw: bytes) -> None:
    """Refuse a head (request line and fields up to the blank line) with shapes h11 accepts
    but an upstream may read differently: bare LF or CR line ends (RFC 9112 §2.2), obs-fold
    (§5.2) and a repeated or list-valued Content-Length (§6.3 rule 5)."""
    body = raw.lstrip(b"\r\n")
    match = _BLANK_LINE.search(body)
    head = body[: match.end()] if match else body
    for index, byte in enumerate(head):
        if byte == 0x0A and (index == 0 or head[index - 1] != 0x0D):
            raise HttpRejected(400, "bare_lf", "a line of the head ends with LF, not CRLF")
        if byte == 0x0D and (index + 1 < len(head) and head[index + 1] != 0x0A):
            raise HttpRejected(400, "bare_cr", "a CR in the head is not followed by LF")
    lengths = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HttpRejected(400, "obs_fold", "a header line is folded (obs-fold)")
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-length":
            lengths += 1
            if b"," in value:
                raise HttpRejected(400, "invalid_content_length", "a list in Content-Length")
    if lengths > 1:
        raise HttpRejected(400, "duplicate_content_length", f"{lengths} Content-Length fields")


def check_fields(headers: Sequence[Header], max_headers: int) -> None:
    """Refuse too many fields (431, RFC 6585 §5) and Content-Length with Transfer-Encoding
    (RFC 9112 §6.1: a request smuggling shape; h11 lets chunked win)."""
    if len(headers) > max_headers:
        raise HttpRejected(
            431, "too_many_headers", f"{len(headers)} header fields, limit {max_headers}"
        )
    names = {name.lower() for name, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        raise HttpRejected(
            400, "content_length_and_transfer_encoding", "both Content-Length and Transfer-Encoding"
        )


def classify_h11_error(message: str) -> str:
    """A short reason label for an h11 ``RemoteProtocolError`` message."""
    text = message.lower()
    for needle, label in (
        ("transfer-encoding", "invalid_transfer_encoding"),
        ("content-length", "invalid_content_length"),
        ("chunk", "invalid_chunk"),
        ("receive buffer too long", "header_too_large"),
        ("host", "invalid_host"),
        ("header line", "malformed_header"),
        ("request line", "malformed_request_line"),
    ):
        if needle in text:
            return label
    return "malformed"


def _connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }


def forward_headers(
    headers: Sequence[Header],
    *,
    upgrade: bool = False,
    strip: Iterable[bytes] = (),
    add: Sequence[Header] = (),
) -> list[Header]:
    """``headers`` as the next hop should get them: hop-by-hop fields and those a
    ``Connection`` token names removed (RFC 9110 §7.6.1), ``strip`` removed, ``add`` appended.
    With ``upgrade`` the ``Upgrade`` field is kept and ``Connection: upgrade`` re-added."""
    drop = set(HOP_BY_HOP | _connection_tokens(headers) | {n.lower() for n in strip})
    drop -= NEVER_DROPPED
    if upgrade:
        drop.discard(b"upgrade")
    out = [(name, value) for name, value in headers if name.lower() not in drop]
    if upgrade:
        out.append((b"connection", b"upgrade"))
    out.extend(add)
    return out


def wants_upgrade(headers: Sequence[Header]) -> bool:
    """Whether a message asks to switch protocols (``Connection: upgrade`` and ``Upgrade``)."""
    return b"upgrade" in _connection_tokens(headers) and any(
        name.lower() == b"upgrade" for name, _ in headers
    )


def wants_close(headers: Sequence[Header]) -> bool:
    """Whether a message says ``Connection: close`` (RFC 9112 §9.6)."""
    return b"close" in _connection_tokens(headers)


def authz_headers(headers: Sequence[Header]) -> dict[str, str]:
    """Lower-cased names to values, repeats joined with ``","`` (``authz.Request.headers``)."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        out[key] = f"{out[key]},{text}" if key in out else text
    return out


class LazyHeaders(Mapping[str, str]):
    """``authz_headers`` of a field list, built the first time a filter reads it: most
    requests meet no rule that looks at headers."""

    __slots__ = ("_fields", "_map")

    def __init__(self, fields: Sequence[Header]) -> None:
        self._fields = fields
        self._map: dict[str, str] | None = None

    def _built(self) -> dict[str, str]:
        if self._map is None:
            self._map = authz_headers(self._fields)
        return self._map

    def __getitem__(self, key: str) -> str:
        return self._built()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())


def denied_response(verdict: Verdict, *, debug: bool) -> LocalResponse:
    """The 403 of an L7 deny; ``x-meshid-denied-by`` names the deciding rule in debug only."""
    headers: tuple[Header, ...] = ()
    if debug:
        headers = ((DENIED_BY_HEADER, denied_by(verdict).encode("latin-1", "replace")),)
    return LocalResponse(403, DENIED_BODY, headers, reason="denied_by_authz")


def denied_by(verdict: Verdict) -> str:
    """``<policy>/<rule>``, or ``default: <reason>`` when no policy decided."""
    if verdict.policy is None:
        return f"default: {verdict.reason}"
    return f"{verdict.policy}/{verdict.rule}"
