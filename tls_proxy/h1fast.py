"""The common HTTP/1.1 message shapes, parsed and rendered without h11: the proxy's fast path.

Owns ``parse_request`` and ``parse_response``: each reads one message head from the front of a
receive buffer and returns it, ``None`` (the head is not complete yet) or ``DECLINED``. They
accept only the shapes most traffic has, and accept them strictly:

- a request line ``token SP origin-form SP HTTP/1.1``, exactly one ``Host``, a body framed by at
  most one all-digit ``Content-Length`` (up to ``max_body``), no ``Transfer-Encoding``,
  ``Upgrade`` nor ``Expect``;
- a status line ``HTTP/1.1 NNN reason`` with a final status (200-599), a body framed by one
  ``Content-Length`` or by the status (204, 304) or the request (``HEAD``);
- CRLF line ends, field names that are tokens, field values of visible characters (obs-text
  allowed) with optional whitespace around, no obs-fold, and the head within its size and field
  count limits.

Every head that is not exactly such a shape is ``DECLINED``, never refused here: the codec hands
it to h11 and the hardening checks of ``l7``, which accept it with its full semantics or refuse it
with the precise reason. So what this module accepts is a subset of what the h11 path accepts,
and it is read the same way (``tests/tls_proxy/test_h1fast.py`` compares the two on generated
heads). While reading the fields it also keeps those to forward (``forward``: what
``l7.forward_headers`` would keep), as pairs and as the lines received (``kept``, which
``request_head`` and ``response_head`` join), so the hot path walks them once. Pure: bytes in,
values out; it must not do I/O. Its one state is a bounded memory of field lines already
parsed (``_SEEN``), which changes no result.
"""

from __future__ import annotations

import enum
import itertools
import re
from dataclasses import dataclass
from typing import Final, Literal

from .l7 import HOP_BY_HOP, NEVER_DROPPED, Header


class _Declined(enum.Enum):
    DECLINED = "declined"


Declined = Literal[_Declined.DECLINED]
DECLINED: Final = _Declined.DECLINED  # not a shape the fast path serves: h11's path takes it

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.1")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?")
# A field line ``name ":" OWS value OWS``: a value of visible characters and inner spaces or
# tabs, with optional whitespace around, is any run of those characters; stripped, the value.
_FIELD = re.compile(rb"(" + _TOKEN + rb"):([\t \x21-\x7e\x80-\xff]*)")
_OWS = b" \t"
# Field lines seen before, parsed: ((name, value), lower-case name). Services send the same
# lines over and over (Host, Content-Type, Server, Connection...), and a line found here costs
# one dict lookup instead of a match and three byte operations. It remembers a pure function of
# the exact bytes, so it changes no result; at most _SEEN_MAX lines of at most _SEEN_LINE bytes
# (about 150 KiB), emptied when full: long or ever-new lines from a client cost what they did.
_SEEN: dict[bytes, tuple[Header, bytes]] = {}
_SEEN_MAX = 512
_SEEN_LINE = 256
_DIGITS = re.compile(rb"[0-9]{1,18}")
_BLANK_LINE = re.compile(rb"\n\r?\n")  # where h11 ends a head, bare LF included
# Fields that send a message down h11's path: framing and protocol switches it handles itself.
_FRAMING_AND_SWITCHING = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
_NO_BODY_STATUS = frozenset({204, 304})
# Fields ``_fields`` looks at beyond forwarding them.
_SPECIAL = frozenset({b"host", b"content-length", b"connection"}) | _FRAMING_AND_SWITCHING
# Never forwarded (RFC 9110 §7.6.1), beside the fields a Connection token names; Content-Length
# and Host are never dropped, whatever a token says.
_DROPPED = HOP_BY_HOP - NEVER_DROPPED
_CONNECTION_OPTIONS = HOP_BY_HOP | {b""}


@dataclass(slots=True)
class Request:
    """A request head the fast path serves; the body is ``length`` bytes after ``size``."""

    method: bytes
    target: bytes
    lines: list[bytes]  # the head's lines, request line first
    forward: list[Header]  # without hop-by-hop fields, the Connection-named and ``strip`` ones
    kept: list[bytes]  # the lines of ``forward`` as received, which ``request_head`` renders
    host: bytes
    length: int  # Content-Length, 0 without one
    close: bool  # ``Connection: close``: the last request of the connection
    size: int  # bytes of the head, blank line included

    @property
    def headers(self) -> list[Header]:
        """The fields as received (the hot path reads ``forward`` only)."""
        return _as_received(self.lines)


@dataclass(slots=True)
class Response:
    """A final response head; ``length`` body bytes follow ``size`` bytes of head."""

    status: int
    lines: list[bytes]  # the head's lines, status line first
    forward: list[Header]  # without hop-by-hop fields and those Connection names
    kept: list[bytes]  # the lines of ``forward`` as received, which ``response_head`` renders
    length: int
    close: bool  # ``Connection: close``: the upstream connection ends after this response
    size: int

    @property
    def status_line(self) -> bytes:
        return self.lines[0]

    @property
    def headers(self) -> list[Header]:
        """The fields as received (the hot path reads ``forward`` only)."""
        return _as_received(self.lines)


def dropped(strip: frozenset[bytes] = frozenset()) -> frozenset[bytes]:
    """The fields never forwarded: the hop-by-hop ones and ``strip`` (lower-case), minus those
    that frame or route a message (``parse_request``'s ``drop``; computed once per codec)."""
    return (_DROPPED | strip) - NEVER_DROPPED


def parse_request(
    buf: bytes | bytearray,
    *,
    max_bytes: int,
    max_headers: int,
    max_body: int,
    drop: frozenset[bytes] = _DROPPED,
) -> Request | Declined | None:
    """The request head at the front of ``buf``; ``None`` while it is incomplete. Fields
    named in ``drop`` (see ``dropped``) are left out of ``Request.forward``."""
    head = _head_lines(buf, max_bytes)
    if not isinstance(head, tuple):
        return head
    lines, size = head
    if len(lines) - 1 > max_headers:
        return DECLINED
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return DECLINED
    fields = _fields(lines, drop)
    if fields is None:
        return DECLINED
    forward, kept, length, close, hosts, host, other = fields
    if hosts != 1 or length > max_body or other or line[1] == b"CONNECT":
        return DECLINED
    return Request(line[1], line[2], lines, forward, kept, host, max(length, 0), close, size)


def parse_response(
    buf: bytes | bytearray, *, max_bytes: int, head_request: bool
) -> Response | Declined | None:
    """The final response head at the front of ``buf``; ``None`` while it is incomplete."""
    head = _head_lines(buf, max_bytes)
    if not isinstance(head, tuple):
        return head
    lines, size = head
    line = _STATUS_LINE.fullmatch(lines[0])
    if line is None:
        return DECLINED
    fields = _fields(lines, _DROPPED)
    if fields is None:
        return DECLINED
    forward, kept, length, close, _, _, other = fields
    if other:
        return DECLINED  # chunked, or a protocol switch: h11 frames those
    status = int(line[1])
    if head_request or status in _NO_BODY_STATUS:
        length = 0
    elif length < 0:
        return DECLINED  # no Content-Length: read until close; h11 re-frames that
    return Response(status, lines, forward, kept, length, close, size)


def _head_lines(
    buf: bytes | bytearray, max_bytes: int
) -> tuple[list[bytes], int] | Declined | None:
    """The lines of the head at the front of ``buf`` and its size, blank line included; None
    while it is incomplete, ``DECLINED`` when it is too large."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return _incomplete(buf, max_bytes)
    if end + 4 > max_bytes:
        return DECLINED
    return bytes(buf[:end]).split(b"\r\n"), end + 4


def _incomplete(buf: bytes | bytearray, max_bytes: int) -> Declined | None:
    """No CRLF CRLF yet: wait for more, unless h11 would see the head end already (a blank
    line with a bare LF) or the head is too large."""
    if len(buf) > max_bytes or _BLANK_LINE.search(buf):
        return DECLINED
    return None


def _fields(
    lines: list[bytes], drop: frozenset[bytes]
) -> tuple[list[Header], list[bytes], int, bool, int, bytes, set[bytes]] | None:
    """The header lines after the first: (the fields to forward (not in ``drop`` nor named
    by a Connection token), their lines, Content-Length or -1, ``close``, the number of Host
    fields and the last one's value, which of Transfer-Encoding, Upgrade and Expect are
    present); None when a line is not a plain field, or Content-Length is repeated or not one
    run of digits."""
    forward: list[Header] = []
    kept: list[bytes] = []
    length = -1
    hosts = 0
    host = b""
    tokens: set[bytes] = set()
    other: set[bytes] = set()
    seen = _SEEN
    for raw in itertools.islice(lines, 1, None):
        parsed = seen.get(raw) or _field(raw)
        if parsed is None:
            return None
        field, lower = parsed
        if lower not in drop:
            forward.append(field)
            kept.append(raw)
        if lower not in _SPECIAL:
            continue
        value = field[1]
        if lower == b"host":
            hosts += 1
            host = value
        elif lower == b"content-length":
            if length >= 0 or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
        elif lower == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
        elif lower in _FRAMING_AND_SWITCHING:
            other.add(lower)
    named = tokens - _CONNECTION_OPTIONS - NEVER_DROPPED
    if named:  # Connection names fields of its own: they are not forwarded either
        pairs = [(f, k) for f, k in zip(forward, kept, strict=True) if f[0].lower() not in named]
        forward, kept = [f for f, _ in pairs], [k for _, k in pairs]
    return forward, kept, length, b"close" in tokens, hosts, host, other


def _field(raw: bytes) -> tuple[Header, bytes] | None:
    """A field line parsed, and remembered in ``_SEEN`` if short; None when it is not a plain
    field."""
    match = _FIELD.fullmatch(raw)
    if match is None:
        return None
    name = match[1]
    parsed = (name, match[2].strip(_OWS)), name.lower()
    if len(raw) <= _SEEN_LINE:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        _SEEN[raw] = parsed
    return parsed


def _as_received(lines: list[bytes]) -> list[Header]:
    """The fields of a head ``parse_request`` or ``parse_response`` accepted, as received."""
    out: list[Header] = []
    for raw in lines[1:]:
        name, _, value = raw.partition(b":")
        out.append((name, value.strip(_OWS)))
    return out


def response_head(status_line: bytes, lines: list[bytes]) -> bytes:
    """A response head toward the client: its status line and field lines (as received, or
    made with ``field_line``)."""
    if not lines:
        return status_line + b"\r\n\r\n"
    return b"%s\r\n%s\r\n\r\n" % (status_line, b"\r\n".join(lines))


def request_head(method: bytes, target: bytes, lines: list[bytes]) -> bytes:
    """A request head toward the upstream: its request line and field lines."""
    if not lines:
        return b"%s %s HTTP/1.1\r\n\r\n" % (method, target)
    return b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, target, b"\r\n".join(lines))


def field_line(name: bytes, value: bytes) -> bytes:
    """A field line the proxy adds, for the renderers."""
    return b"%s: %s" % (name, value)
