"""The L7 codecs by wire protocol: the one place a new protocol is plugged in.

Owns ``CODECS``: ``http1`` (HTTP/1.1) and ``h2`` (HTTP/2 on h2, imported at first use), keyed
by what the listener detected on the connection (ALPN after TLS, else the first bytes:
``detect.sniff``).
Each codec serves an accepted, authenticated connection through ``l7.HttpSession`` and calls
the request filters with ``l7`` values, so listeners and filters do not change when a codec is
added. ``tcp`` has no codec: listeners splice its bytes. It must not hold per-connection state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from . import http1
from .l7 import Codec, HttpSession


async def _h2(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: HttpSession
) -> None:
    """``http2.serve``, imported with h2 at the first HTTP/2 connection: a sidecar that never
    sees one does not carry h2, hpack and hyperframe (about 1.2 MiB)."""
    from . import http2  # noqa: PLC0415

    await http2.serve(reader, writer, session)


CODECS: Mapping[str, Codec] = {"http1": http1.serve, "h2": _h2}
