"""The proxy's YAML configuration: parsed once into frozen, validated values.

Owns the schema of ``meshid proxy run --config FILE`` and its error messages, which are one line
naming the file, the key path and what was expected (``proxy.yaml: inbound[0].listen: expected
HOST:PORT with a port in 0..65535 (got 'localhost')``). It must not open sockets or read
certificates: relative file names are resolved against the config file's folder, nothing more.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from authz import DEFAULT_POSTURE, Posture

from .errors import ConfigError

Protocol = Literal["tcp", "http", "auto"]
SUPPORTED_PROTOCOLS = frozenset({"tcp", "http", "auto"})
DEFAULT_ADMIN_LISTEN = "127.0.0.1:15000"
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds: a TLS handshake takes milliseconds; stop slowloris
DEFAULT_IDLE_TIMEOUT = 300.0  # seconds without a byte either way before a connection is closed
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to reach an upstream before failing over to the next
DEFAULT_DRAIN_GRACE = 15.0  # seconds in-flight connections get after SIGTERM
DEFAULT_POLL_INTERVAL = 1.0  # seconds between mtime checks of identity and policy files
DEFAULT_MAX_HEADER_BYTES = 16 * 1024  # a request head larger than this is refused (431)
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
# Identity headers only the inbound proxy may set; a client's copies are removed.
DEFAULT_IDENTITY_HEADERS = ("x-forwarded-client-cert",)
# Transparent mode (docs/proxy.md): `forward: original_dst` / `upstream: original_dst` relay
# each connection to where the iptables REDIRECT rules found it going.
ORIGINAL_DST = "original_dst"
# iptables REDIRECT in OUTPUT delivers to 127.0.0.1 (ip6tables: ::1); a wildcard also hears it.
TRANSPARENT_OUTBOUND_HOSTS = frozenset({"127.0.0.1", "0.0.0.0", "::1", "::"})  # noqa: S104


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 0..65535 (got {value!r})")
    return value


def split_address(value: str) -> tuple[str, int]:
    """``"127.0.0.1:80"`` → ``("127.0.0.1", 80)``; ``[::1]:80`` → ``("::1", 80)``."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class IdentityConfig(_Model):
    """Either ``workload_api`` or the three files ``cert``, ``key`` and ``bundle``."""

    workload_api: str | None = None
    cert: Path | None = None
    key: Path | None = None
    bundle: Path | None = None
    poll_interval: float = Field(default=DEFAULT_POLL_INTERVAL, gt=0)
    timeout: float = Field(default=30.0, gt=0, description="wait for the first SVID")

    @field_validator("workload_api")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("unix:///", "tcp://")):
            raise ValueError(f"expected unix:///absolute/path or tcp://IP:PORT (got {value!r})")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> IdentityConfig:
        files = [self.cert, self.key, self.bundle]
        if self.workload_api is not None and any(f is not None for f in files):
            raise ValueError("expected either workload_api or cert/key/bundle, not both")
        if self.workload_api is None and any(f is not None for f in files):
            missing = [n for n, f in zip(("cert", "key", "bundle"), files, strict=True) if not f]
            if missing:
                raise ValueError(f"expected cert, key and bundle together; missing {missing}")
        return self

    @property
    def from_files(self) -> bool:
        return self.cert is not None


class AdminConfig(_Model):
    listen: str = DEFAULT_ADMIN_LISTEN

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))


class TimeoutsConfig(_Model):
    handshake: float = Field(default=DEFAULT_HANDSHAKE_TIMEOUT, gt=0)
    idle: float = Field(default=DEFAULT_IDLE_TIMEOUT, gt=0)
    connect: float = Field(default=DEFAULT_CONNECT_TIMEOUT, gt=0)
    drain: float = Field(default=DEFAULT_DRAIN_GRACE, ge=0)

    def as_timedelta(self, name: str) -> timedelta:
        return timedelta(seconds=float(getattr(self, name)))


class HttpConfig(_Model):
    """Limits and rules of ``protocol: http`` listeners (docs/proxy.md, "HTTP")."""

    max_header_bytes: int = Field(default=DEFAULT_MAX_HEADER_BYTES, ge=1024)
    max_headers: int = Field(default=DEFAULT_MAX_HEADERS, ge=1)
    header_timeout: float = Field(default=DEFAULT_HEADER_TIMEOUT, gt=0)
    keepalive_timeout: float = Field(default=DEFAULT_KEEPALIVE_TIMEOUT, gt=0)
    encoded_slashes: Literal["reject", "decode", "keep"] = "reject"
    identity_headers: tuple[str, ...] = DEFAULT_IDENTITY_HEADERS
    pool_max_idle: int = Field(default=DEFAULT_POOL_MAX_IDLE, ge=0)
    pool_idle_timeout: float = Field(default=DEFAULT_POOL_IDLE_TIMEOUT, gt=0)
    h2_max_connections: int = Field(default=DEFAULT_H2_MAX_CONNECTIONS, ge=1)

    @field_validator("identity_headers")
    @classmethod
    def _names(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(v.lower() for v in values)
        if "x-forwarded-client-cert" not in out:
            raise ValueError("expected a list that includes x-forwarded-client-cert")
        return out


class RuntimeConfig(_Model):
    """How the proxy process runs (docs/proxy.md, "Runtime")."""

    uvloop: bool = True  # use uvloop when it is installed; asyncio's loop otherwise
    workers: int = Field(default=1, ge=1, le=64)  # processes sharing the ports (SO_REUSEPORT)


class InboundConfig(_Model):
    name: str = Field(min_length=1)
    listen: str
    forward: str  # HOST:PORT, or original_dst: 127.0.0.1:<the port the peer dialed>
    protocol: Protocol = "tcp"

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))

    @field_validator("forward")
    @classmethod
    def _forward(cls, value: str) -> str:
        if value == ORIGINAL_DST:
            return value
        try:
            return _check_address(value)
        except ValueError:
            raise ValueError(
                f"expected HOST:PORT with a port in 0..65535, or {ORIGINAL_DST} (got {value!r})"
            ) from None

    @property
    def transparent(self) -> bool:
        return self.forward == ORIGINAL_DST


class OutboundConfig(_Model):
    name: str = Field(min_length=1)
    listen: str
    upstream: tuple[str, ...] = Field(min_length=1)
    expect_ids: tuple[str, ...] = Field(min_length=1)
    protocol: Protocol = "tcp"

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))

    @field_validator("upstream", mode="before")
    @classmethod
    def _original_dst(cls, value: object) -> object:
        return (value,) if value == ORIGINAL_DST else value

    @field_validator("upstream")
    @classmethod
    def _upstreams(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if ORIGINAL_DST in values:
            if len(values) > 1:
                raise ValueError(f"expected {ORIGINAL_DST} alone or a list of HOST:PORT, not both")
            return values
        for value in values:
            _check_address(value)
        return values

    @model_validator(mode="after")
    def _transparent_listen(self) -> OutboundConfig:
        host = split_address(self.listen)[0]
        if self.transparent and host not in TRANSPARENT_OUTBOUND_HOSTS:
            raise ValueError(
                f"expected listen on 127.0.0.1, [::1] or a wildcard with upstream: "
                f"{ORIGINAL_DST} (REDIRECT delivers a local app's connections to 127.0.0.1, "
                f"or ::1 over IPv6; got {host!r})"
            )
        return self

    @property
    def transparent(self) -> bool:
        return self.upstream == (ORIGINAL_DST,)

    @field_validator("expect_ids")
    @classmethod
    def _ids(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            _check_spiffe_id(value)
        return values


class PolicyConfig(_Model):
    """Policies from ``file`` (watched) or streamed from a meshid ``server``, not both.

    With ``server``, ``trust_bundle`` (PEM) authenticates the server (default: our identity's
    bundle for our trust domain) and ``fallback_file`` is enforced until the first set arrives
    (without it the proxy denies every inbound connection until then).
    """

    file: Path | None = None
    server: str | None = None
    trust_bundle: Path | None = None
    fallback_file: Path | None = None
    poll_interval: float = Field(default=DEFAULT_POLL_INTERVAL, gt=0)

    @field_validator("server")
    @classmethod
    def _server(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)

    @model_validator(mode="after")
    def _one_source(self) -> PolicyConfig:
        if self.file is not None and self.server is not None:
            raise ValueError("expected either file or server, not both")
        if self.server is None:
            extra = [k for k in ("trust_bundle", "fallback_file") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"expected {' and '.join(extra)} only together with server")
        return self


class JwtConfig(_Model):
    """JWT-SVID request authentication. The JWT authorities come from files — ``bundle`` (a
    SPIFFE bundle JSON of our own trust domain) plus ``federated`` (trust domain -> file), all
    watched — or, without ``bundle``, from the Workload API named by ``identity.workload_api``
    (ours and the federated ones the agent serves). A token must name our own SPIFFE ID or one
    of ``audiences`` in its ``aud``."""

    bundle: Path | None = None
    federated: dict[str, Path] = Field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    poll_interval: float = Field(default=DEFAULT_POLL_INTERVAL, gt=0)

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not all(values):
            raise ValueError("expected non-empty audience strings")
        return values

    @field_validator("federated")
    @classmethod
    def _federated(cls, values: dict[str, Path]) -> dict[str, Path]:
        for name in values:
            _check_trust_domain(name)
        return values

    @model_validator(mode="after")
    def _files_together(self) -> JwtConfig:
        if self.federated and self.bundle is None:
            raise ValueError(
                "expected jwt.bundle with jwt.federated (without jwt.bundle every JWT bundle"
                " comes from the Workload API, federated ones included)"
            )
        return self

    @property
    def from_workload_api(self) -> bool:
        return self.bundle is None


class AccessLogConfig(_Model):
    """``path: "-"`` writes JSON lines to stdout; ``path: null`` turns the log off."""

    path: str | None = "-"


class ProxyConfig(_Model):
    trust_domain: str | None = None
    default_posture: Posture = DEFAULT_POSTURE
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    inbound: tuple[InboundConfig, ...] = ()
    outbound: tuple[OutboundConfig, ...] = ()
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    jwt: JwtConfig | None = None  # absent: Authorization headers are not looked at
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    debug: bool = False  # adds x-meshid-denied-by to 403s: names policies to the caller
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("trust_domain")
    @classmethod
    def _td(cls, value: str | None) -> str | None:
        return None if value is None else _check_trust_domain(value)

    @field_validator("jwt")
    @classmethod
    def _jwt_source(cls, value: JwtConfig | None, info: ValidationInfo) -> JwtConfig | None:
        identity = info.data.get("identity")  # validated before jwt (field order)
        if value is not None and value.from_workload_api and identity and identity.from_files:
            raise ValueError(
                "expected jwt.bundle: with identity from files there is no Workload API to"
                " stream JWT bundles from"
            )
        return value

    @model_validator(mode="after")
    def _workers_need_fixed_ports(self) -> ProxyConfig:
        if self.runtime.workers > 1:
            listens = [i.listen for i in self.inbound] + [o.listen for o in self.outbound]
            ephemeral = [x for x in listens if split_address(x)[1] == 0]
            if ephemeral:
                raise ValueError(
                    f"expected fixed listen ports with runtime.workers > 1 (every worker binds "
                    f"the same port with SO_REUSEPORT); got port 0 in {ephemeral}"
                )
            _, port = split_address(self.admin.listen)
            if port and port + self.runtime.workers - 1 > 65535:
                raise ValueError(f"expected admin ports {port}..+{self.runtime.workers - 1} to fit")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> ProxyConfig:
        names = [i.name for i in self.inbound] + [o.name for o in self.outbound]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"expected unique listener names; {dup} used more than once")
        return self

    def for_worker(self, index: int) -> ProxyConfig:
        """Worker ``index``'s configuration: its admin server on the admin port + ``index``
        (each worker has its own admin server; port 0 stays ephemeral)."""
        host, port = split_address(self.admin.listen)
        if index == 0 or port == 0:
            return self
        host = f"[{host}]" if ":" in host else host
        admin = self.admin.model_copy(update={"listen": f"{host}:{port + index}"})
        return self.model_copy(update={"admin": admin})

    def public_dict(self) -> dict[str, Any]:
        """The effective configuration for ``/config``: paths only, no key material."""
        return self.model_dump(mode="json")


def _check_trust_domain(value: str) -> str:
    try:
        parsed = TrustDomain(value)
    except PySpiffeError as err:
        raise ValueError(f"expected a trust domain name such as example.org ({err})") from err
    if parsed.name != value:
        raise ValueError(f"expected a lower-case trust domain name (got {value!r})")
    return value


def _check_spiffe_id(value: str) -> str:
    try:
        parsed = SpiffeId(value)
    except PySpiffeError as err:
        raise ValueError(f"expected a SPIFFE ID such as spiffe://example.org/web ({err})") from err
    if str(parsed) != value:
        raise ValueError(f"expected a SPIFFE ID in canonical form {str(parsed)!r}")
    return value


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "tagged-union")):
            out += f".{part}" if out else part
    return out or "<top level>"


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key (check the spelling against docs/proxy.md)"
    msg = str(error["msg"])
    msg = msg.removeprefix("Value error, ").removeprefix("Input should be ")
    if msg.startswith("expected"):
        return msg
    return f"expected {msg} (got {error.get('input')!r})"


def parse_config(data: object, source: str, base: Path | None = None) -> ProxyConfig:
    """Validate decoded YAML ``data``; relative file names are resolved against ``base``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <top level>: expected a mapping (got {type(data).__name__})")
    try:
        config = ProxyConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{source}: {_location(first['loc'])}: {_message(first)}") from err
    if base is None:
        return config
    return _resolve(config, base)


def _resolve(config: ProxyConfig, base: Path) -> ProxyConfig:
    def rel(path: Path | None) -> Path | None:
        return None if path is None or path.is_absolute() else base / path

    ident = config.identity
    identity = ident.model_copy(
        update={k: rel(getattr(ident, k)) or getattr(ident, k) for k in ("cert", "key", "bundle")}
    )
    pol = config.policy
    policy = pol.model_copy(
        update={
            k: rel(getattr(pol, k)) or getattr(pol, k)
            for k in ("file", "trust_bundle", "fallback_file")
        }
    )
    jwt = config.jwt
    if jwt is not None:
        jwt = jwt.model_copy(
            update={
                "bundle": rel(jwt.bundle) or jwt.bundle,
                "federated": {td: rel(f) or f for td, f in jwt.federated.items()},
            }
        )
    return config.model_copy(update={"identity": identity, "policy": policy, "jwt": jwt})


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
