"""Request-path normalization: the one spelling of a path that policy sees and the app receives.

Owns ``normalize_path``. The proxy runs it on every HTTP request before authorization and
forwards the result, so a policy on ``/admin`` cannot be dodged with ``/api/../admin``,
``/%2e%2e/admin`` or ``//admin``. Pure: a string in, a string (or ``PathError``) out.

Rules, in order (RFC 3986 §6.2.2 plus the rules Envoy and Istio recommend for authorization):

1. The path must be origin-form (start with ``/``, RFC 9112 §3.2.1) and visible ASCII: NUL and
   control characters are refused raw or percent-encoded; raw space, non-ASCII and ``#`` are
   refused (escaped they are data: ``%20``, ``%C3%A9``, ``%23`` are kept).
2. Percent-escapes of unreserved characters are decoded (RFC 3986 §6.2.2.2); other escapes are
   kept with upper-case hex (§6.2.2.1). Decoding happens once: ``%252e`` stays ``%252E``.
3. ``%2F`` and ``%5C`` (and a raw ``\\``) follow ``encoded_slashes``: ``reject`` refuses the
   request, ``decode`` turns them into ``/``, ``keep`` forwards them as ``%2F``/``%5C`` data.
4. Slashes are merged, ``.`` and ``..`` segments are resolved (§5.2.4) and never climb above the
   root; a dot-segment carrying parameters (``..;x``, Tomcat's bypass shape) is refused.
5. The query string is forwarded unchanged (control characters are still refused).

Case is preserved: paths are case-sensitive (RFC 3986 §6.2.2.1), and so is policy matching.
"""

from __future__ import annotations

import re
import string
from typing import Literal

EncodedSlashes = Literal["reject", "decode", "keep"]

# RFC 3986 §2.3: escaping these changes nothing, so they are decoded to their one spelling.
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
HEX_DIGITS = frozenset(string.hexdigits)
SLASH_LIKE = {"/": "%2F", "\\": "%5C"}  # separators an app may split on, raw or escaped
FIRST_VISIBLE, LAST_VISIBLE = 0x21, 0x7E  # visible ASCII (RFC 5234 VCHAR): all a raw path holds
SPACE, DEL = 0x20, 0x7F  # below SPACE and DEL itself are control characters, refused everywhere


# Already normal: segments of unreserved and sub-delim characters (no '%', no backslash), none
# empty or starting with '.', and a query of visible ASCII. Such a target normalizes to itself
# (tests/tls_proxy/test_path.py checks that against the rules below).
_NORMAL = re.compile(r"(?=/)(?:/(?!\.)[A-Za-z0-9\-._~!$&'()*+,;=:@]+)*/?(?:\?[\x21-\x7e]*)?")


class PathError(ValueError):
    """The request path cannot be normalized safely; the proxy answers 400 Bad Request."""


def normalize_path(raw: str, *, encoded_slashes: EncodedSlashes = "reject") -> str:
    """Return the normalized form of the request target ``raw`` (path and optional query).

    Raises ``PathError`` naming the offending character or sequence.
    """
    if encoded_slashes not in ("reject", "decode", "keep"):
        raise ValueError(f"encoded_slashes must be reject, decode or keep, not {encoded_slashes!r}")
    if _NORMAL.fullmatch(raw):
        return raw  # nothing to decode, merge or resolve: the common case, checked in one pass
    path, question, query = raw.partition("?")
    for ch in query:
        if ord(ch) < SPACE or ord(ch) == DEL:
            raise PathError(f"control character {_show(ch)} in the query string")
    if not path.startswith("/"):
        raise PathError(f"request path must start with '/' (RFC 9112 §3.2.1), got {_clip(path)!r}")
    decoded = _decode(path, encoded_slashes)
    return _resolve(decoded) + question + query


def _decode(path: str, encoded_slashes: EncodedSlashes) -> str:
    out: list[str] = []
    index, length = 0, len(path)
    while index < length:
        ch = path[index]
        escape = ""
        if ch == "%":
            hex_part = path[index + 1 : index + 3]
            if len(hex_part) != 2 or not set(hex_part) <= HEX_DIGITS:
                raise PathError(f"'%' not followed by two hex digits at offset {index}")
            escape = "%" + hex_part.upper()
            ch = chr(int(hex_part, 16))
            index += 3
        else:
            index += 1
        code = ord(ch)
        if (
            code < SPACE
            or code == DEL
            or (not escape and not FIRST_VISIBLE <= code <= LAST_VISIBLE)
        ):
            # Escaped bytes >= 0x80 (UTF-8 text) are legitimate and stay escaped below.
            kind = "control character" if code < SPACE or code == DEL else "character"
            raise PathError(f"{kind} {_show(ch)} in the request path")
        if ch in SLASH_LIKE and (escape or ch == "\\"):
            if encoded_slashes == "reject":
                raise PathError(
                    f"{escape or repr(ch)} in the request path; encoded slashes are refused "
                    f"because the app may split on them after the policy has matched"
                )
            out.append("/" if encoded_slashes == "decode" else SLASH_LIKE[ch])
        elif ch == "#" and not escape:
            raise PathError("'#' in the request path; a fragment is never sent (RFC 9112 §3.2)")
        elif escape and ch not in UNRESERVED:
            out.append(escape)
        else:
            out.append(ch)
    return "".join(out)


def _resolve(path: str) -> str:
    """Merge slashes and remove dot-segments; ``path`` starts with ``/``."""
    segments = path.split("/")[1:]
    kept: list[str] = []
    trailing_slash = False
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        trailing_slash = index == last
        if segment in ("", "."):
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        if segment.partition(";")[0] in (".", ".."):
            raise PathError(f"dot-segment with parameters {segment!r} in the request path")
        kept.append(segment)
        trailing_slash = False
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing_slash else "")


def _show(ch: str) -> str:
    return f"U+{ord(ch):04X}"


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
