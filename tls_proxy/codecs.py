"""The L7 codecs by listener ``protocol``: the one place a new protocol is plugged in.

Owns ``CODECS``. Each codec module (``http1``; ``http2`` later) serves an accepted,
authenticated connection through ``l7.HttpSession`` and calls the request filters with
``l7`` values, so listeners and filters do not change when a codec is added. ``tcp`` has no
codec: listeners splice its bytes. It must not hold per-connection state.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import http1
from .l7 import Codec

CODECS: Mapping[str, Codec] = {"http": http1.serve}
