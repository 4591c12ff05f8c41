"""The L7 codecs by wire protocol: the one place a new protocol is plugged in.

Owns ``CODECS``: ``http1`` (HTTP/1.1 on h11) and ``h2`` (HTTP/2 on h2), keyed by what the
listener detected on the connection (ALPN after TLS, else the first bytes: ``detect.sniff``).
Each codec serves an accepted, authenticated connection through ``l7.HttpSession`` and calls
the request filters with ``l7`` values, so listeners and filters do not change when a codec is
added. ``tcp`` has no codec: listeners splice its bytes. It must not hold per-connection state.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import http1, http2
from .l7 import Codec

CODECS: Mapping[str, Codec] = {"http1": http1.serve, "h2": http2.serve}
