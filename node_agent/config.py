"""Agent configuration: YAML plus command-line overrides, validated with precise errors."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workload_api.attestors.composite import AttestorsConfig, K8sConfig
from workload_api.attestors.kubelet import KubeletConfig
from workload_api.attestors.unix import UnixConfig
from workload_api.endpoint import parse_endpoint_socket

from .errors import AgentError

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
# Like SPIRE's /tmp/spire-agent/public/api.sock; SPIFFE_ENDPOINT_SOCKET always wins.
DEFAULT_SOCKET = Path("/tmp/meshid-agent/public/api.sock")  # noqa: S108
DEFAULT_SVID_CACHE_MAX = 50_000  # entries pre-fetched; beyond it the agent refuses new ones


class ConfigError(AgentError):
    """The agent's configuration is invalid; the message names the key and the rule."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UnixAttestorConfig(_Model):
    discover_path: bool = False
    hash_binary: bool = False


class K8sAttestorConfig(_Model):
    kubelet_url: str = "https://127.0.0.1:10250"
    ca_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    skip_verify: bool = False
    token_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class WorkloadAttestors(_Model):
    unix: UnixAttestorConfig | None = Field(default_factory=UnixAttestorConfig)
    systemd: bool = False
    docker: bool = False
    k8s: K8sAttestorConfig | None = None

    def build(self) -> AttestorsConfig:
        return AttestorsConfig(
            unix=(
                UnixConfig(discover_path=self.unix.discover_path, hash_binary=self.unix.hash_binary)
                if self.unix
                else None
            ),
            systemd=self.systemd,
            docker=self.docker,
            k8s=(
                K8sConfig(
                    kubelet=KubeletConfig(
                        url=self.k8s.kubelet_url,
                        ca_file=self.k8s.ca_file,
                        skip_verify=self.k8s.skip_verify,
                        token_file=self.k8s.token_file,
                    )
                )
                if self.k8s
                else None
            ),
        )


class AgentConfig(_Model):
    trust_domain: str
    servers: list[str] = Field(min_length=1, description="HOST:PORT of each server replica")
    trust_bundle: Path = Field(description="PEM bundle to trust the server on first start")
    data_dir: Path
    socket: Path = DEFAULT_SOCKET
    join_token: str | None = None
    x509pop_cert: Path | None = None
    x509pop_key: Path | None = None
    workload_attestors: WorkloadAttestors = Field(default_factory=WorkloadAttestors)
    svid_cache_max: int = Field(default=DEFAULT_SVID_CACHE_MAX, ge=1)
    persist_svid_cache: bool = Field(
        default=False,
        description="keep workload SVIDs and keys on disk (0600) to serve through a restart "
        "while no server answers; off: workload keys live in memory only",
    )
    log_level: str = "info"

    @field_validator("trust_domain")
    @classmethod
    def _td(cls, value: str) -> str:
        if not value or value != value.lower() or "/" in value or ":" in value:
            raise ValueError("must be a lowercase trust domain name such as example.org")
        return value

    @field_validator("servers")
    @classmethod
    def _servers(cls, values: list[str]) -> list[str]:
        for v in values:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{v!r} must be HOST:PORT with a port in 1..65535")
        return values

    @model_validator(mode="after")
    def _x509pop_pair(self) -> AgentConfig:
        if (self.x509pop_cert is None) != (self.x509pop_key is None):
            raise ValueError("x509pop_cert and x509pop_key go together")
        return self

    @property
    def renew_check(self) -> timedelta:
        return timedelta(seconds=30)


def trust_domain_from_bundle(path: Path) -> str | None:
    """The trust domain a meshid root names in its URI SAN (``spiffe://td``), if any; so
    ``--trust-domain`` can be left out when the bundle says it (upstream roots may not)."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return None  # the agent reports an unreadable bundle with its own precise error
    for cert in certs:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            continue
        for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://") :]:
                return uri[len("spiffe://") :]
    return None


def load_agent_config(path: Path | None, overrides: dict[str, Any]) -> AgentConfig:
    data: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ConfigError(f"config: cannot read {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(
                f"config: {where}: invalid YAML: {getattr(err, 'problem', err)}"
            ) from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config: {path}: the top level must be a mapping")
        data = dict(loaded or {})
        agent = data.pop("agent", None)
        if isinstance(agent, dict):
            data = {**agent, **data}
    data.update({k: v for k, v in overrides.items() if v not in (None, [], ())})
    if "trust_domain" not in data and data.get("trust_bundle"):
        derived = trust_domain_from_bundle(Path(data["trust_bundle"]))
        if derived is not None:
            data["trust_domain"] = derived
    if "socket" not in data and os.environ.get(ENDPOINT_ENV):
        data["socket"] = str(parse_endpoint_socket(os.environ[ENDPOINT_ENV]))
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "config"
        if first["type"] == "missing":
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{key}: required: give {flag} or set {key} in the --config file"
            ) from err
        raise ConfigError(f"{key}: {first['msg']} (in {source})") from err
