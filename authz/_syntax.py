"""The grammar of policy values: string patterns, SPIFFE IDs, paths, ports, IP blocks, keys.

Owns the rules a single value must follow and the one way to read it, shared by validation (which
turns a ``ValueError`` into a located ``PolicyError``) and by the engine (which compiles values
already validated). Every function is pure; none touches the network or the file system.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import string
from enum import Enum

from authz.model import CONDITION_KEYS

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SPIFFE_SCHEME = "spiffe://"
# SPIFFE-ID §2.1: a trust domain name uses lower-case letters, digits, '.', '-' and '_' only.
TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
# SPIFFE-ID §2.2: path segments use letters, digits, '.', '-' and '_' only.
PATH_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
MAX_TRUST_DOMAIN_LENGTH = 255  # SPIFFE-ID §2.1 caps a trust domain name at 255 bytes
MAX_SPIFFE_ID_LENGTH = 2048  # SPIFFE-ID §2.3 requires support up to 2048 bytes; refuse longer
MAX_PORT = 65535  # TCP port numbers are 16-bit (RFC 9293 §3.1)
# RFC 3986 §2.3: the normalizer decodes these, so an escaped unreserved character never matches.
UNRESERVED_CHARS = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 9110 §5.6.2: a header field name is a token.
TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
HEX_DIGITS = frozenset(string.hexdigits)
POLICY_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")  # a DNS subdomain, as in k8s
_CLAIM_PART = re.compile(r"\[([^\[\]]+)\]")


class PatternKind(Enum):
    """How a string value matches: exactly, by prefix, by suffix, or by presence."""

    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


def split_pattern(value: str) -> tuple[PatternKind, str]:
    """Return the kind of ``value`` and its literal part (without the ``*``)."""
    if not value:
        raise ValueError("expected a non-empty string")
    if value == "*":
        return PatternKind.PRESENCE, ""
    stars = value.count("*")
    if stars == 0:
        return PatternKind.EXACT, value
    if stars == 1 and value.startswith("*"):
        return PatternKind.SUFFIX, value[1:]
    if stars == 1 and value.endswith("*"):
        return PatternKind.PREFIX, value[:-1]
    raise ValueError(
        f"'*' may only be the whole value or its first or last character "
        f"(exact, 'prefix*', '*suffix' or '*'), got {value!r}"
    )


def check_trust_domain(value: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a trust domain name (SPIFFE-ID §2.1)."""
    if not value:
        raise ValueError("expected a trust domain name like example.org, got ''")
    if len(value) > MAX_TRUST_DOMAIN_LENGTH:
        raise ValueError(f"a trust domain name is at most {MAX_TRUST_DOMAIN_LENGTH} characters")
    bad = sorted(set(value) - TRUST_DOMAIN_CHARS)
    if bad:
        raise ValueError(
            f"trust domain {value!r} has {''.join(bad)!r}; SPIFFE-ID §2.1 allows lower-case "
            f"letters, digits, '.', '-' and '_' only"
        )


def check_spiffe_id(value: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a workload SPIFFE ID (SPIFFE-ID §2)."""
    if len(value) > MAX_SPIFFE_ID_LENGTH:
        raise ValueError(f"a SPIFFE ID is at most {MAX_SPIFFE_ID_LENGTH} characters")
    if not value.startswith(SPIFFE_SCHEME):
        raise ValueError(f"expected a SPIFFE ID like spiffe://example.org/web, got {value!r}")
    trust_domain, slash, path = value[len(SPIFFE_SCHEME) :].partition("/")
    check_trust_domain(trust_domain)
    if not slash or not path:
        raise ValueError(f"{value!r} names a trust domain, not a workload; add a path")
    for segment in path.split("/"):
        if segment in {"", ".", ".."}:
            raise ValueError(
                f"{value!r} has an empty, '.' or '..' path segment; SPIFFE-ID §2.2 forbids it"
            )
        bad = sorted(set(segment) - PATH_SEGMENT_CHARS)
        if bad:
            raise ValueError(
                f"{value!r} has {''.join(bad)!r} in its path; SPIFFE-ID §2.2 allows letters, "
                f"digits, '.', '-' and '_' only"
            )


def trust_domain_of(spiffe_id: str | None) -> str | None:
    """The trust domain of a SPIFFE ID, or ``None`` when it is not one."""
    if spiffe_id is None or not spiffe_id.startswith(SPIFFE_SCHEME):
        return None
    return spiffe_id[len(SPIFFE_SCHEME) :].partition("/")[0] or None


def check_principal_pattern(value: str) -> None:
    """A SPIFFE ID, a ``spiffe://…*`` prefix, a ``*suffix`` or ``*``."""
    kind, literal = split_pattern(value)
    if kind is PatternKind.EXACT:
        check_spiffe_id(literal)
    elif kind is PatternKind.PREFIX and not (
        literal.startswith(SPIFFE_SCHEME) or SPIFFE_SCHEME.startswith(literal)
    ):
        raise ValueError(f"a principal prefix must start with 'spiffe://', got {value!r}")


def check_trust_domain_pattern(value: str) -> None:
    """A trust domain name, a prefix or suffix of one, or ``*``."""
    kind, literal = split_pattern(value)
    if kind is PatternKind.EXACT:
        check_trust_domain(literal)
    elif kind is not PatternKind.PRESENCE:
        bad = sorted(set(literal) - TRUST_DOMAIN_CHARS)
        if bad:
            raise ValueError(
                f"trust domain pattern {value!r} has {''.join(bad)!r}; SPIFFE-ID §2.1 allows "
                f"lower-case letters, digits, '.', '-' and '_' only"
            )


def check_string_pattern(value: str) -> None:
    """Any non-empty string pattern (hosts, methods, header values, claims)."""
    split_pattern(value)


def check_path_pattern(value: str) -> None:
    """A path pattern that can match a path normalized by ``tls_proxy.path.normalize_path``.

    The engine compares paths exactly as the proxy forwards them, so a pattern the normalizer
    would never produce (``//``, ``/../``, ``%41``, ``%2f``) would silently never match: under a
    DENY policy that is a bypass, so it is refused here instead.
    """
    kind, literal = split_pattern(value)
    if kind is PatternKind.PRESENCE:
        return
    if kind in {PatternKind.EXACT, PatternKind.PREFIX} and not literal.startswith("/"):
        raise ValueError(f"a path starts with '/' (or is '*suffix'), got {value!r}")
    for ch in literal:
        if not "!" <= ch <= "~":
            raise ValueError(f"path {value!r} has {ch!r}; paths are visible ASCII only")
        if ch in "?#":
            raise ValueError(f"path {value!r} has {ch!r}; paths are matched without the query")
        if ch == "\\":
            raise ValueError(f"path {value!r} has '\\', which the normalizer never forwards")
    _check_escapes(value, literal)
    # The first segment is partial in a suffix pattern, the last one in a prefix pattern.
    segments = literal.split("/")
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if index == 0 or (index == last and kind is PatternKind.PREFIX):
            continue
        if segment in {".", ".."} or (segment == "" and index != last):
            raise ValueError(
                f"path {value!r} is not normalized (no '//', '/./' or '/../'); the engine sees "
                f"normalized paths only, so it would never match"
            )


def _check_escapes(value: str, literal: str) -> None:
    index = literal.find("%")
    while index != -1:
        hex_part = literal[index + 1 : index + 3]
        if len(hex_part) != 2 or not set(hex_part) <= HEX_DIGITS:
            raise ValueError(f"path {value!r} has a '%' not followed by two hex digits")
        decoded = chr(int(hex_part, 16))
        if decoded in UNRESERVED_CHARS:
            raise ValueError(
                f"path {value!r} escapes {decoded!r} as %{hex_part}; the normalizer decodes it "
                f"(RFC 3986 §6.2.2.2), so write {decoded!r}"
            )
        if hex_part != hex_part.upper():
            raise ValueError(
                f"path {value!r} has %{hex_part}; the normalizer upper-cases escapes "
                f"(RFC 3986 §6.2.2.1), so write %{hex_part.upper()}"
            )
        index = literal.find("%", index + 3)


def parse_port(value: int | str) -> int:
    """A TCP port from an int or a string of digits."""
    if isinstance(value, bool):
        raise ValueError(f"expected a port number 1-{MAX_PORT}, got {value!r}")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise ValueError(f"expected a port number 1-{MAX_PORT}, got {value!r}")
        value = int(value)
    if not 1 <= value <= MAX_PORT:
        raise ValueError(f"expected a port number 1-{MAX_PORT}, got {value!r}")
    return value


def parse_ip_block(value: str) -> IpNetwork:
    """An address or a CIDR block; host bits must be zero so the intent is unambiguous."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f"; did you mean {ipaddress.ip_network(value, strict=False)}?"
        raise ValueError(
            f"expected an IP address or CIDR block like 10.0.0.0/8, got {value!r} ({err}){hint}"
        ) from err


class KeyKind(Enum):
    """The attribute a ``when`` key reads."""

    HEADER = "request.headers"
    CLAIM = "request.auth.claims"
    AUTH_PRINCIPAL = "request.auth.principal"
    SOURCE_IP = "source.ip"
    SOURCE_PRINCIPAL = "source.principal"
    SOURCE_TRUST_DOMAIN = "source.trust_domain"
    DESTINATION_PORT = "destination.port"


_PLAIN_KEYS = {
    kind.value: kind
    for kind in (
        KeyKind.AUTH_PRINCIPAL,
        KeyKind.SOURCE_IP,
        KeyKind.SOURCE_PRINCIPAL,
        KeyKind.SOURCE_TRUST_DOMAIN,
        KeyKind.DESTINATION_PORT,
    )
}
_KEYS_HELP = ", ".join(CONDITION_KEYS[:-1]) + " or " + CONDITION_KEYS[-1]


def parse_condition_key(key: str) -> tuple[KeyKind, tuple[str, ...]]:
    """The attribute ``key`` reads and its argument (header name, claim path)."""
    plain = _PLAIN_KEYS.get(key)
    if plain is not None:
        return plain, ()
    for kind in (KeyKind.HEADER, KeyKind.CLAIM):
        if key.startswith(kind.value + "["):
            rest = key[len(kind.value) :]
            parts = _CLAIM_PART.findall(rest)
            if not parts or "".join(f"[{p}]" for p in parts) != rest:
                break
            if kind is KeyKind.HEADER:
                if len(parts) != 1 or not set(parts[0]) <= TOKEN_CHARS:
                    raise ValueError(
                        f"expected request.headers[NAME] with a header name, got {key!r}"
                    )
                return kind, (parts[0].lower(),)
            return kind, tuple(parts)
    raise ValueError(f"expected one of {_KEYS_HELP}, got {key!r}")


def check_condition_value(kind: KeyKind, value: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a valid value for a key of ``kind``."""
    if kind is KeyKind.SOURCE_IP:
        parse_ip_block(value)
    elif kind is KeyKind.DESTINATION_PORT:
        parse_port(value)
    elif kind in {KeyKind.AUTH_PRINCIPAL, KeyKind.SOURCE_PRINCIPAL}:
        check_principal_pattern(value)
    elif kind is KeyKind.SOURCE_TRUST_DOMAIN:
        check_trust_domain_pattern(value)
    else:
        check_string_pattern(value)
