"""Protocol detection from a connection's first bytes: h2 preface, HTTP/1.x or opaque TCP.

Owns ``sniff`` (pure: bytes in, a verdict or "need more" out) and ``H2_PREFACE``. The listener
reads and times; this module only looks at what was read. It must not do I/O.
"""

from __future__ import annotations

import re
from typing import Literal

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4: a client's first bytes
SNIFF_LIMIT = 8 * 1024  # a request line longer than this is not worth waiting for: TCP

Detected = Literal["h2", "http1", "tcp"]

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" [^\s]+ HTTP/1\.[0-9]\r?\n")  # RFC 9112 §3
_REQUEST_LINE_START = re.compile(_TOKEN + rb"( [^\s]*( [HTP/1.0-9]*\r?)?)?")


def sniff(data: bytes, *, final: bool, http_only: bool = False) -> Detected | None:
    """What ``data`` starts: ``h2`` (the client preface), ``http1`` (an HTTP/1.x request line)
    or ``tcp``; None when more bytes could change the answer and ``final`` is False.

    With ``http_only`` (``protocol: http``), anything that is not the h2 preface is HTTP/1.1
    (the HTTP/1.1 codec then refuses what does not parse).
    """
    if data.startswith(H2_PREFACE):
        return "h2"
    if data and H2_PREFACE.startswith(data):
        if not final:
            return None
        return "http1" if http_only else "tcp"
    if http_only:
        return "http1" if data or final else None
    if _REQUEST_LINE.match(data):
        return "http1"
    if final or len(data) >= SNIFF_LIMIT or b"\n" in data:
        return "tcp"
    if not data or _REQUEST_LINE_START.fullmatch(data):
        return None
    return "tcp"
