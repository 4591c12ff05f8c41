"""The kubelet's ``/pods`` over HTTPS: the real ``KubeletClient`` of the ``k8s`` attestor.

Owns the connection only: TLS (the kubelet's CA file, or verification skipped when configured),
the bearer token (re-read from its file on every request: projected service account tokens
rotate), the size limit of the answer. Parsing is ``k8s.selectors_from_pod_list``'s job.

Like SPIRE, a kubelet reached on a loopback address is checked against the CA but not by name:
kubelet serving certificates name the node, not 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ..errors import AttestationFailed

DEFAULT_KUBELET_URL = "https://127.0.0.1:10250"  # the kubelet's secure port on the node
DEFAULT_CA_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")  # SPIRE's default
DEFAULT_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")  # SPIRE's default
DEFAULT_TIMEOUT = timedelta(seconds=5)  # a kubelet on the same node answers in milliseconds
MAX_POD_LIST_BYTES = 64 * 1024 * 1024  # 110 pods (the default node limit) list in a few MB
PODS_PATH = "/pods"


@dataclass(frozen=True)
class KubeletConfig:
    url: str = DEFAULT_KUBELET_URL
    ca_file: Path | None = DEFAULT_CA_FILE  # None only together with skip_verify
    skip_verify: bool = False  # trust any certificate the kubelet shows (not recommended)
    token_file: Path | None = DEFAULT_TOKEN_FILE  # None: no Authorization header
    timeout: timedelta = DEFAULT_TIMEOUT


class HttpsKubeletClient:
    """``get_pods()`` over HTTPS; ``aclose()`` when done."""

    def __init__(self, config: KubeletConfig) -> None:
        parts = urlsplit(config.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"kubelet url {config.url!r} must be https://HOST[:PORT]")
        if config.ca_file is None and not config.skip_verify:
            raise ValueError("kubelet: set ca_file, or skip_verify to trust any certificate")
        self._config = config
        self._url = config.url.rstrip("/") + PODS_PATH
        self._tls = _tls_context(config, loopback=_is_loopback(parts.hostname))
        self._client: httpx.AsyncClient | None = None

    async def get_pods(self) -> bytes:
        headers = {"Accept": "application/json"}
        if self._config.token_file is not None:
            headers["Authorization"] = f"Bearer {self._read_token(self._config.token_file)}"
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._tls, timeout=self._config.timeout.total_seconds()
            )
        try:
            async with self._client.stream("GET", self._url, headers=headers) as response:
                if response.status_code != httpx.codes.OK:
                    raise AttestationFailed(
                        f"kubelet GET {PODS_PATH} answered {response.status_code}"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_POD_LIST_BYTES:
                        raise AttestationFailed(
                            f"kubelet GET {PODS_PATH} answer exceeds {MAX_POD_LIST_BYTES} bytes"
                        )
        except httpx.HTTPError as err:
            raise AttestationFailed(f"kubelet GET {self._url} failed: {err!r}") from err
        return bytes(body)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @staticmethod
    def _read_token(path: Path) -> str:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise AttestationFailed(f"kubelet token file {path}: {err}") from err
        if not token:
            raise AttestationFailed(f"kubelet token file {path} is empty")
        return token


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _tls_context(config: KubeletConfig, *, loopback: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts nothing until the CA is loaded
    if config.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    assert config.ca_file is not None  # checked in __init__
    try:
        context.load_verify_locations(cafile=config.ca_file)
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"kubelet ca_file {config.ca_file}: {err}") from err
    context.check_hostname = not loopback
    return context
