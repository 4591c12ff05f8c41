"""Server configuration: YAML file plus command-line overrides, validated with precise errors.

Owns the option names, their defaults and their rules. Errors name the file, the key and what
was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .entries import parse_trust_domain
from .errors import InvalidArgument
from .keys import KeyType

DEFAULT_SOCKET_ENV = "MESHID_SERVER_SOCKET"
# Like SPIRE's /tmp/spire-server/private/api.sock: a fixed default both server and CLI know.
DEFAULT_ADMIN_SOCKET = Path("/tmp/meshid-server/private/admin.sock")  # noqa: S108


class ConfigError(InvalidArgument):
    """The configuration file or flags are invalid."""


class UpstreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cert_file: Path = Field(description="PEM: the upstream signing cert, its chain, root last")
    key_file: Path = Field(description="PEM private key of the upstream signing cert")


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trust_domain: str
    data_dir: Path
    bind: str | None = Field(default=None, description="HOST:PORT of the node API (agents)")
    admin_socket: Path | None = None
    database: str | None = None
    key_type: KeyType = KeyType.EC_P256
    jwt_key_type: KeyType = KeyType.EC_P256
    ca_ttl: int = Field(default=86400, ge=60, le=10 * 365 * 86400, description="seconds")
    default_x509_svid_ttl: int = Field(default=3600, ge=1, le=30 * 86400)
    default_jwt_svid_ttl: int = Field(default=300, ge=1, le=86400)
    rotation_interval: float = Field(default=10.0, gt=0, le=3600, description="seconds")
    admin_uids: list[int] = Field(default_factory=list, description="uids allowed besides ours")
    admin_listen: str | None = Field(
        default=None, description="HOST:PORT for the admin API over mTLS (admin entries only)"
    )
    bundle_endpoint: str | None = Field(
        default=None, description="HOST:PORT of the SPIFFE bundle endpoint (https_spiffe)"
    )
    federation_refresh_interval: float = Field(
        default=30.0, gt=0, le=86400, description="seconds between checks of federated bundles"
    )
    upstream: UpstreamConfig | None = None
    x509pop_ca_bundle: Path | None = Field(
        default=None,
        description="PEM CA certificates of node provisioning certificates (x509pop attestation)",
    )
    log_level: str = "info"

    @field_validator("trust_domain")
    @classmethod
    def _td(cls, v: str) -> str:
        return parse_trust_domain(v, "trust_domain").name

    @field_validator("bind", "admin_listen", "bundle_endpoint")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v, "address")
        return v

    def socket_path(self) -> Path:
        return self.admin_socket or env_socket() or DEFAULT_ADMIN_SOCKET

    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_dir / 'datastore.sqlite3'}"


def parse_host_port(value: str, field: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(field, "must be HOST:PORT with a port in 1..65535", value)
    return host.strip("[]"), int(port)


def load_server_config(path: Path | None, overrides: dict[str, Any]) -> ServerConfig:
    """Read ``path`` (YAML) if given, apply non-None ``overrides``, validate."""
    data: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ConfigError("config", f"cannot read {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or "cannot be parsed"
            raise ConfigError("config", f"{where}: invalid YAML: {problem}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("config", f"{path}: the top level must be a mapping")
        data = dict(loaded or {})
        server = data.pop("server", None)
        if isinstance(server, dict):  # allow a top-level "server:" block as SPIRE does
            data = {**server, **data}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "missing":
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                key, f"required: give {flag} or set {key} in the --config file"
            ) from err
        raise ConfigError(key or "config", f"{first['msg']} (in {source})") from err
    except InvalidArgument as err:
        raise ConfigError(err.field, f"{err.rule} (in {source})", err.value) from err


def env_socket() -> Path | None:
    value = os.environ.get(DEFAULT_SOCKET_ENV)
    return Path(value) if value else None
