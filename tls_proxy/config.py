"""The proxy's YAML configuration: parsed once into frozen, validated values.

Owns the schema of ``meshid proxy run --config FILE`` and its error messages, which are one line
naming the file, the key path and what was expected (``proxy.yaml: inbound[0].listen: expected
HOST:PORT with a port in 0..65535 (got 'localhost')``). It must not open sockets or read
certificates: relative file names are resolved against the config file's folder, nothing more.

The schema is plain frozen dataclasses: each field's rule (``_rule(check)`` in its metadata)
turns the YAML value into the field's value or raises ``_Invalid``, and a section's
``_validate`` holds the rules between its fields. ``_read`` applies them in field order and
reports the first problem, so a file with several is fixed one line at a time. Scalars are
read leniently, as YAML writers expect: ``"5"`` is a number and ``"yes"`` a boolean. The sidecar
imports this module; it must stay light (no pydantic: its schemas cost a sidecar ~9 MiB).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from authz import DEFAULT_POSTURE, Posture

from .errors import ConfigError

Protocol = Literal["tcp", "http", "auto"]
SUPPORTED_PROTOCOLS = frozenset(get_args(Protocol))
EncodedSlashes = Literal["reject", "decode", "keep"]
LogLevel = Literal["debug", "info", "warning", "error"]
DEFAULT_ADMIN_LISTEN = "127.0.0.1:15000"
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds: a TLS handshake takes milliseconds; stop slowloris
DEFAULT_IDLE_TIMEOUT = 300.0  # seconds without a byte either way before a connection is closed
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to reach an upstream before failing over to the next
DEFAULT_DRAIN_GRACE = 15.0  # seconds in-flight connections get after SIGTERM
DEFAULT_POLL_INTERVAL = 1.0  # seconds between mtime checks of identity and policy files
DEFAULT_FIRST_SVID_TIMEOUT = 30.0  # seconds to wait for the first SVID from the Workload API
DEFAULT_MAX_HEADER_BYTES = 16 * 1024  # a request head larger than this is refused (431)
MIN_MAX_HEADER_BYTES = 1024  # below this, ordinary requests (a Host and a cookie) are refused
DEFAULT_MAX_HEADERS = 100  # header fields per request, as Envoy's default; more is refused (431)
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to its complete head
DEFAULT_KEEPALIVE_TIMEOUT = 60.0  # seconds an idle keep-alive connection waits for a request
DEFAULT_POOL_MAX_IDLE = 64  # idle upstream HTTP/1.1 connections kept per listener (0: no pool)
# Shorter than common app keep-alive timeouts (nginx 75 s, Go 90 s) so that the proxy, not
# the app, usually closes an idle connection; a request that meets one the app closed anyway
# is retried once on a new connection when it is idempotent.
DEFAULT_POOL_IDLE_TIMEOUT = 15.0
# Shared upstream HTTP/2 connections per upstream address: with a peer allowing 128 streams
# each (our own inbound listeners do), 2048 concurrent streams before new ones are refused.
DEFAULT_H2_MAX_CONNECTIONS = 16
MAX_WORKERS = 64  # processes sharing the ports; far beyond the cores a sidecar is given
# Identity headers only the inbound proxy may set; a client's copies are removed.
XFCC = "x-forwarded-client-cert"
DEFAULT_IDENTITY_HEADERS = (XFCC,)
# Transparent mode (docs/proxy.md): `forward: original_dst` / `upstream: original_dst` relay
# each connection to where the iptables REDIRECT rules found it going.
ORIGINAL_DST = "original_dst"
# iptables REDIRECT in OUTPUT delivers to 127.0.0.1 (ip6tables: ::1); a wildcard also hears it.
TRANSPARENT_OUTBOUND_HOSTS = frozenset({"127.0.0.1", "0.0.0.0", "::1", "::"})  # noqa: S104

T = TypeVar("T")
Check = Callable[[object], T]
"""A field's rule: the YAML value in, the field's value out, or ``_Invalid`` saying why not."""


class _Invalid(ValueError):
    """One broken rule at ``path`` (keys and list indexes) below the value being checked."""

    def __init__(self, problem: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path = path

    def within(self, part: str | int) -> _Invalid:
        return _Invalid(self.problem, (part, *self.path))

    @property
    def location(self) -> str:
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
        return out or "<top level>"


def _rule(check: Check[Any]) -> dict[str, Check[Any]]:
    """A field's metadata: the rule ``_read`` applies to the YAML value of its key."""
    return {"check": check}


# -- rules for scalars: pydantic's lax mode, the behaviour this schema has always had ---------

# An integer written as text: "7", "+7", "1_000", or "7.0" (a whole number with a zero fraction).
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")
# Booleans written as text, compared without case (YAML's own yes/no/on/off arrive as bool).
_TRUE_TEXT = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_TEXT = frozenset({"0", "off", "f", "false", "n", "no"})


def _string(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _Invalid(f"expected a valid string (got {value!r})")


def _non_empty_string(value: object) -> str:
    text = _string(value)
    if not text:
        raise _Invalid(f"expected a non-empty string (got {value!r})")
    return text


def _integer(value: object) -> int:
    if isinstance(value, int):  # bool included: true is 1
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid(f"expected a finite number (got {value!r})")
        if not value.is_integer():
            raise _Invalid(
                f"expected a valid integer, got a number with a fractional part (got {value!r})"
            )
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if _INTEGER_TEXT.fullmatch(text):
            return int(text.partition(".")[0])
        raise _Invalid(
            f"expected a valid integer, unable to parse string as an integer (got {value!r})"
        )
    raise _Invalid(f"expected a valid integer (got {value!r})")


def _number(value: object) -> float:
    if isinstance(value, int | float):  # bool included: true is 1.0
        try:
            return float(value)
        except OverflowError:
            pass
    elif isinstance(value, str):
        if value.isascii():  # float() would take other scripts' digits too
            try:
                return float(value)
            except ValueError:
                pass
        raise _Invalid(
            f"expected a valid number, unable to parse string as a number (got {value!r})"
        )
    raise _Invalid(f"expected a valid number (got {value!r})")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.lower() in _TRUE_TEXT:
            return True
        if value.lower() in _FALSE_TEXT:
            return False
    elif isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str | int):
        raise _Invalid(f"expected a valid boolean, unable to interpret input (got {value!r})")
    raise _Invalid(f"expected a valid boolean (got {value!r})")


def _path(value: object) -> Path:
    if isinstance(value, str | os.PathLike):
        return Path(value)
    raise _Invalid(f"expected a file name (got {value!r})")


N = TypeVar("N", int, float)


def _bounded(
    check: Check[N], *, gt: float | None = None, ge: float | None = None, le: float | None = None
) -> Check[N]:
    """``check``, then the bounds (a NaN passes none of them)."""

    def bounded(value: object) -> N:
        number = check(value)
        if gt is not None and not number > gt:
            raise _Invalid(f"expected greater than {gt} (got {value!r})")
        if ge is not None and not number >= ge:
            raise _Invalid(f"expected greater than or equal to {ge} (got {value!r})")
        if le is not None and not number <= le:
            raise _Invalid(f"expected less than or equal to {le} (got {value!r})")
        return number

    return bounded


_positive = _bounded(_number, gt=0)  # durations and intervals in seconds


def _one_of(*options: str) -> Check[str]:
    listed = ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}"

    def one_of(value: object) -> str:
        if isinstance(value, str) and value in options:
            return value
        raise _Invalid(f"expected {listed} (got {value!r})")

    return one_of


def _posture(value: object) -> Posture:
    return Posture(_one_of(*(p.value for p in Posture))(value))


def _optional(check: Check[T]) -> Check[T | None]:
    def optional(value: object) -> T | None:
        return None if value is None else check(value)

    return optional


def _list_of(check: Check[T], *, min_items: int = 0) -> Check[tuple[T, ...]]:
    """A YAML list, each item through ``check``; errors name the item's index."""

    def list_of(value: object) -> tuple[T, ...]:
        if not isinstance(value, list | tuple):
            raise _Invalid(f"expected a list (got {value!r})")
        items = tuple(_each(check, enumerate(value)))
        if len(items) < min_items:
            raise _Invalid(f"expected at least {min_items} item (got {value!r})")
        return items

    return list_of


def _each(check: Check[T], entries: Iterable[tuple[str | int, object]]) -> Iterable[T]:
    for key, item in entries:
        try:
            yield check(item)
        except _Invalid as err:
            raise err.within(key) from err


def _mapping_of(key: Check[str], check: Check[T]) -> Check[dict[str, T]]:
    """A YAML mapping: every value through ``check`` (errors name the key), then every key."""

    def mapping_of(value: object) -> dict[str, T]:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a mapping (got {value!r})")
        values = list(_each(check, ((str(k), v) for k, v in value.items())))
        return dict(zip((key(k) for k in value), values, strict=True))

    return mapping_of


D = TypeVar("D")


def _section(cls: type[D]) -> Check[D]:
    return lambda value: _read(cls, value)


def _read(cls: type[D], value: object) -> D:
    """A ``cls`` from the YAML mapping ``value``.

    Keys are checked in field order by each field's rule; an absent key takes the field's
    default or is reported missing; then unknown keys are refused, and last the rules between
    fields (``cls._validate``) run on the result.
    """
    if not isinstance(value, dict):
        raise _Invalid(f"expected a mapping (got {value!r})")
    values: dict[str, Any] = {}
    for spec in fields(cls):  # type: ignore[arg-type]  # cls is one of the dataclasses below
        if spec.name not in value:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise _Invalid("required key is missing", (spec.name,))
            continue
        try:
            values[spec.name] = spec.metadata["check"](value[spec.name])
        except _Invalid as err:
            raise err.within(spec.name) from err
    names = {spec.name for spec in fields(cls)}  # type: ignore[arg-type]
    for key in value:
        if key not in names:
            raise _Invalid("unknown key (check the spelling against docs/proxy.md)", (key,))
    result = cls(**values)
    validate: Callable[[], None] | None = getattr(result, "_validate", None)
    if validate is not None:
        validate()
    return result


# -- rules of this schema ------------------------------------------------------------------------


def _address(value: object) -> str:
    text = _string(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _Invalid(f"expected HOST:PORT with a port in 0..65535 (got {text!r})")
    return text


def split_address(value: str) -> tuple[str, int]:
    """``"127.0.0.1:80"`` → ``("127.0.0.1", 80)``; ``[::1]:80`` → ``("::1", 80)``."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _endpoint(value: object) -> str:
    text = _string(value)
    if not text.startswith(("unix:///", "tcp://")):
        raise _Invalid(f"expected unix:///absolute/path or tcp://IP:PORT (got {text!r})")
    return text


def _forward(value: object) -> str:
    text = _string(value)
    if text == ORIGINAL_DST:
        return text
    try:
        return _address(text)
    except _Invalid:
        raise _Invalid(
            f"expected HOST:PORT with a port in 0..65535, or {ORIGINAL_DST} (got {text!r})"
        ) from None


def _upstreams(value: object) -> tuple[str, ...]:
    values = _list_of(_string, min_items=1)((value,) if value == ORIGINAL_DST else value)
    if ORIGINAL_DST in values:
        if len(values) > 1:
            raise _Invalid(f"expected {ORIGINAL_DST} alone or a list of HOST:PORT, not both")
        return values
    for item in values:
        _address(item)
    return values


def _identity_headers(value: object) -> tuple[str, ...]:
    names = tuple(v.lower() for v in _list_of(_string)(value))
    if XFCC not in names:
        raise _Invalid(f"expected a list that includes {XFCC}")
    return names


def _audiences(value: object) -> tuple[str, ...]:
    values = _list_of(_string)(value)
    if not all(values):
        raise _Invalid("expected non-empty audience strings")
    return values


def _trust_domain(value: object) -> str:
    text = _string(value)
    try:
        parsed = TrustDomain(text)
    except PySpiffeError as err:
        raise _Invalid(f"expected a trust domain name such as example.org ({err})") from err
    if parsed.name != text:
        raise _Invalid(f"expected a lower-case trust domain name (got {text!r})")
    return text


def _spiffe_id(value: object) -> str:
    text = _string(value)
    try:
        parsed = SpiffeId(text)
    except PySpiffeError as err:
        raise _Invalid(f"expected a SPIFFE ID such as spiffe://example.org/web ({err})") from err
    if str(parsed) != text:
        raise _Invalid(f"expected a SPIFFE ID in canonical form {str(parsed)!r}")
    return text


def _spiffe_ids(value: object) -> tuple[str, ...]:
    values = _list_of(_string, min_items=1)(value)
    for item in values:
        _spiffe_id(item)
    return values


# -- the schema --------------------------------------------------------------------------------

_OPTIONAL_PATH = _rule(_optional(_path))
_POLL_INTERVAL = _rule(_positive)


@dataclass(frozen=True, kw_only=True)
class IdentityConfig:
    """Either ``workload_api`` or the three files ``cert``, ``key`` and ``bundle``."""

    workload_api: str | None = field(default=None, metadata=_rule(_optional(_endpoint)))
    cert: Path | None = field(default=None, metadata=_OPTIONAL_PATH)
    key: Path | None = field(default=None, metadata=_OPTIONAL_PATH)
    bundle: Path | None = field(default=None, metadata=_OPTIONAL_PATH)
    poll_interval: float = field(default=DEFAULT_POLL_INTERVAL, metadata=_POLL_INTERVAL)
    timeout: float = field(default=DEFAULT_FIRST_SVID_TIMEOUT, metadata=_rule(_positive))

    def _validate(self) -> None:
        files = [self.cert, self.key, self.bundle]
        if self.workload_api is not None and any(f is not None for f in files):
            raise _Invalid("expected either workload_api or cert/key/bundle, not both")
        if self.workload_api is None and any(f is not None for f in files):
            missing = [n for n, f in zip(("cert", "key", "bundle"), files, strict=True) if not f]
            if missing:
                raise _Invalid(f"expected cert, key and bundle together; missing {missing}")

    @property
    def from_files(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    listen: str = field(default=DEFAULT_ADMIN_LISTEN, metadata=_rule(_address))


@dataclass(frozen=True, kw_only=True)
class TimeoutsConfig:
    handshake: float = field(default=DEFAULT_HANDSHAKE_TIMEOUT, metadata=_rule(_positive))
    idle: float = field(default=DEFAULT_IDLE_TIMEOUT, metadata=_rule(_positive))
    connect: float = field(default=DEFAULT_CONNECT_TIMEOUT, metadata=_rule(_positive))
    drain: float = field(default=DEFAULT_DRAIN_GRACE, metadata=_rule(_bounded(_number, ge=0)))


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    """Limits and rules of ``protocol: http`` listeners (docs/proxy.md, "HTTP")."""

    max_header_bytes: int = field(
        default=DEFAULT_MAX_HEADER_BYTES,
        metadata=_rule(_bounded(_integer, ge=MIN_MAX_HEADER_BYTES)),
    )
    max_headers: int = field(default=DEFAULT_MAX_HEADERS, metadata=_rule(_bounded(_integer, ge=1)))
    header_timeout: float = field(default=DEFAULT_HEADER_TIMEOUT, metadata=_rule(_positive))
    keepalive_timeout: float = field(default=DEFAULT_KEEPALIVE_TIMEOUT, metadata=_rule(_positive))
    encoded_slashes: EncodedSlashes = field(
        default="reject", metadata=_rule(_one_of(*get_args(EncodedSlashes)))
    )
    identity_headers: tuple[str, ...] = field(
        default=DEFAULT_IDENTITY_HEADERS, metadata=_rule(_identity_headers)
    )
    pool_max_idle: int = field(
        default=DEFAULT_POOL_MAX_IDLE, metadata=_rule(_bounded(_integer, ge=0))
    )
    pool_idle_timeout: float = field(default=DEFAULT_POOL_IDLE_TIMEOUT, metadata=_rule(_positive))
    h2_max_connections: int = field(
        default=DEFAULT_H2_MAX_CONNECTIONS, metadata=_rule(_bounded(_integer, ge=1))
    )


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """How the proxy process runs (docs/proxy.md, "Runtime")."""

    # uvloop when it is installed; asyncio's loop otherwise
    uvloop: bool = field(default=True, metadata=_rule(_boolean))
    # processes sharing the ports (SO_REUSEPORT)
    workers: int = field(default=1, metadata=_rule(_bounded(_integer, ge=1, le=MAX_WORKERS)))


_PROTOCOL = _rule(_one_of(*get_args(Protocol)))


@dataclass(frozen=True, kw_only=True)
class InboundConfig:
    name: str = field(metadata=_rule(_non_empty_string))
    listen: str = field(metadata=_rule(_address))
    # HOST:PORT, or original_dst: 127.0.0.1:<the port the peer dialed>
    forward: str = field(metadata=_rule(_forward))
    protocol: Protocol = field(default="tcp", metadata=_PROTOCOL)

    @property
    def transparent(self) -> bool:
        return self.forward == ORIGINAL_DST


@dataclass(frozen=True, kw_only=True)
class OutboundConfig:
    name: str = field(metadata=_rule(_non_empty_string))
    listen: str = field(metadata=_rule(_address))
    upstream: tuple[str, ...] = field(metadata=_rule(_upstreams))
    expect_ids: tuple[str, ...] = field(metadata=_rule(_spiffe_ids))
    protocol: Protocol = field(default="tcp", metadata=_PROTOCOL)

    def _validate(self) -> None:
        host = split_address(self.listen)[0]
        if self.transparent and host not in TRANSPARENT_OUTBOUND_HOSTS:
            raise _Invalid(
                f"expected listen on 127.0.0.1, [::1] or a wildcard with upstream: "
                f"{ORIGINAL_DST} (REDIRECT delivers a local app's connections to 127.0.0.1, "
                f"or ::1 over IPv6; got {host!r})"
            )

    @property
    def transparent(self) -> bool:
        return self.upstream == (ORIGINAL_DST,)


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """Policies from ``file`` (watched) or streamed from a meshid ``server``, not both.

    With ``server``, ``trust_bundle`` (PEM) authenticates the server (default: our identity's
    bundle for our trust domain) and ``fallback_file`` is enforced until the first set arrives
    (without it the proxy denies every inbound connection until then).
    """

    file: Path | None = field(default=None, metadata=_OPTIONAL_PATH)
    server: str | None = field(default=None, metadata=_rule(_optional(_address)))
    trust_bundle: Path | None = field(default=None, metadata=_OPTIONAL_PATH)
    fallback_file: Path | None = field(default=None, metadata=_OPTIONAL_PATH)
    poll_interval: float = field(default=DEFAULT_POLL_INTERVAL, metadata=_POLL_INTERVAL)

    def _validate(self) -> None:
        if self.file is not None and self.server is not None:
            raise _Invalid("expected either file or server, not both")
        if self.server is None:
            extra = [k for k in ("trust_bundle", "fallback_file") if getattr(self, k) is not None]
            if extra:
                raise _Invalid(f"expected {' and '.join(extra)} only together with server")


@dataclass(frozen=True, kw_only=True)
class JwtConfig:
    """JWT-SVID request authentication. The JWT authorities come from files — ``bundle`` (a
    SPIFFE bundle JSON of our own trust domain) plus ``federated`` (trust domain -> file), all
    watched — or, without ``bundle``, from the Workload API named by ``identity.workload_api``
    (ours and the federated ones the agent serves). A token must name our own SPIFFE ID or one
    of ``audiences`` in its ``aud``."""

    bundle: Path | None = field(default=None, metadata=_OPTIONAL_PATH)
    federated: dict[str, Path] = field(
        default_factory=dict, metadata=_rule(_mapping_of(_trust_domain, _path))
    )
    audiences: tuple[str, ...] = field(default=(), metadata=_rule(_audiences))
    poll_interval: float = field(default=DEFAULT_POLL_INTERVAL, metadata=_POLL_INTERVAL)

    def _validate(self) -> None:
        if self.federated and self.bundle is None:
            raise _Invalid(
                "expected jwt.bundle with jwt.federated (without jwt.bundle every JWT bundle"
                " comes from the Workload API, federated ones included)"
            )

    @property
    def from_workload_api(self) -> bool:
        return self.bundle is None


@dataclass(frozen=True, kw_only=True)
class AccessLogConfig:
    """``path: "-"`` writes JSON lines to stdout; ``path: null`` turns the log off."""

    path: str | None = field(default="-", metadata=_rule(_optional(_string)))


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    trust_domain: str | None = field(default=None, metadata=_rule(_optional(_trust_domain)))
    default_posture: Posture = field(default=DEFAULT_POSTURE, metadata=_rule(_posture))
    identity: IdentityConfig = field(
        default_factory=IdentityConfig, metadata=_rule(_section(IdentityConfig))
    )
    admin: AdminConfig = field(default_factory=AdminConfig, metadata=_rule(_section(AdminConfig)))
    inbound: tuple[InboundConfig, ...] = field(
        default=(), metadata=_rule(_list_of(_section(InboundConfig)))
    )
    outbound: tuple[OutboundConfig, ...] = field(
        default=(), metadata=_rule(_list_of(_section(OutboundConfig)))
    )
    policy: PolicyConfig = field(
        default_factory=PolicyConfig, metadata=_rule(_section(PolicyConfig))
    )
    # absent: Authorization headers are not looked at
    jwt: JwtConfig | None = field(default=None, metadata=_rule(_optional(_section(JwtConfig))))
    access_log: AccessLogConfig = field(
        default_factory=AccessLogConfig, metadata=_rule(_section(AccessLogConfig))
    )
    timeouts: TimeoutsConfig = field(
        default_factory=TimeoutsConfig, metadata=_rule(_section(TimeoutsConfig))
    )
    http: HttpConfig = field(default_factory=HttpConfig, metadata=_rule(_section(HttpConfig)))
    runtime: RuntimeConfig = field(
        default_factory=RuntimeConfig, metadata=_rule(_section(RuntimeConfig))
    )
    # adds x-meshid-denied-by to 403s: names policies to the caller
    debug: bool = field(default=False, metadata=_rule(_boolean))
    log_level: LogLevel = field(default="info", metadata=_rule(_one_of(*get_args(LogLevel))))

    def _validate(self) -> None:
        jwt = self.jwt
        if jwt is not None and jwt.from_workload_api and self.identity.from_files:
            raise _Invalid(
                "expected jwt.bundle: with identity from files there is no Workload API to"
                " stream JWT bundles from",
                ("jwt",),
            )
        if self.runtime.workers > 1:
            listens = [i.listen for i in self.inbound] + [o.listen for o in self.outbound]
            ephemeral = [x for x in listens if split_address(x)[1] == 0]
            if ephemeral:
                raise _Invalid(
                    f"expected fixed listen ports with runtime.workers > 1 (every worker binds "
                    f"the same port with SO_REUSEPORT); got port 0 in {ephemeral}"
                )
            _, port = split_address(self.admin.listen)
            if port and port + self.runtime.workers - 1 > 65535:
                raise _Invalid(f"expected admin ports {port}..+{self.runtime.workers - 1} to fit")
        names = [i.name for i in self.inbound] + [o.name for o in self.outbound]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise _Invalid(f"expected unique listener names; {dup} used more than once")

    def for_worker(self, index: int) -> ProxyConfig:
        """Worker ``index``'s configuration: its admin server on the admin port + ``index``
        (each worker has its own admin server; port 0 stays ephemeral)."""
        host, port = split_address(self.admin.listen)
        if index == 0 or port == 0:
            return self
        host = f"[{host}]" if ":" in host else host
        return replace(self, admin=replace(self.admin, listen=f"{host}:{port + index}"))

    def public_dict(self) -> dict[str, Any]:
        """The effective configuration for ``/config``: paths only, no key material."""
        out = _plain(self)
        assert isinstance(out, dict)
        return out


def _plain(value: object) -> object:
    """``value`` as JSON values: sections as mappings in field order, lists, strings, numbers."""
    if is_dataclass(value) and not isinstance(value, type):
        return {spec.name: _plain(getattr(value, spec.name)) for spec in fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value


def parse_config(data: object, source: str, base: Path | None = None) -> ProxyConfig:
    """Validate decoded YAML ``data``; relative file names are resolved against ``base``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <top level>: expected a mapping (got {type(data).__name__})")
    try:
        config = _read(ProxyConfig, data)
    except _Invalid as err:
        raise ConfigError(f"{source}: {err.location}: {err.problem}") from err
    if base is None:
        return config
    return _resolve(config, base)


def _resolve(config: ProxyConfig, base: Path) -> ProxyConfig:
    def rel(path: Path | None) -> Path | None:
        return None if path is None else base / path  # an absolute path stays as it is

    ident, pol, jwt = config.identity, config.policy, config.jwt
    identity = replace(ident, cert=rel(ident.cert), key=rel(ident.key), bundle=rel(ident.bundle))
    policy = replace(
        pol,
        file=rel(pol.file),
        trust_bundle=rel(pol.trust_bundle),
        fallback_file=rel(pol.fallback_file),
    )
    if jwt is not None:
        federated = {td: base / path for td, path in jwt.federated.items()}
        jwt = replace(jwt, bundle=rel(jwt.bundle), federated=federated)
    return replace(config, identity=identity, policy=policy, jwt=jwt)


def load_config(path: Path) -> ProxyConfig:
    """Read and validate the YAML file at ``path``; raises ``ConfigError`` with one line."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"{where}: <document>: expected valid YAML: {problem}") from err
    return parse_config(data, str(path), path.parent)
