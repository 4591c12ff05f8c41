"""JWT-SVID request authentication for L7 authz (``request_principals``, ``request.auth.*``).

Owns the JWT bundle sources behind ``JwtBundles``: ``JwtBundleStore`` (SPIFFE bundle JSON files,
``jwt.bundle`` for our own trust domain and ``jwt.federated`` for others, reloaded when they
change, keeping the last good keys when a new text is unusable) and ``WorkloadApiJwtBundles``
(py-spiffe's ``JwtSource`` on the Workload API: ours and the federated trust domains' bundles as
the agent streams them); ``bearer_token`` (the token of an ``Authorization: Bearer`` header, if
any) and ``authenticate`` (validate it with ``ca.jwtsvid.validate_jwt_svid`` against our own
SPIFFE ID and the configured extra audiences). A token is a credential: it must never be logged;
``JwtRejected`` carries the validator's reason only. It must not decide policy.

PyJWT (and the ``urllib``/``http.client`` it brings, ~1.5 MiB) is imported when a JWT bundle
source is built, that is when the configuration has a ``jwt`` block, not by every sidecar.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from spiffe import TrustDomain
from spiffe.errors import PySpiffeError

from ca.errors import CaError
from ca.spiffe_light import load_all as _load_spiffe

if TYPE_CHECKING:
    from ca.keys import PublicKey

from .errors import ProxyError
from .identity import workload_api_endpoint
from .l7 import LocalResponse
from .watched import FileStamp, files_stamp

log = logging.getLogger(__name__)

JWT_FAILED_BODY = b"Jwt verification fails"  # Istio's wording for a 401
WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer error="invalid_token"')


class JwtRejected(ProxyError):
    """A bearer token that is present but not a valid JWT-SVID for us; the message is the
    validator's reason (never the token)."""


@dataclass(frozen=True)
class JwtIdentity:
    """A validated JWT-SVID: its ``sub`` and all its claims."""

    principal: str
    claims: Mapping[str, object]


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme case-insensitive, RFC 6750 §2.1);
    None when there is no Authorization header or it uses another scheme."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def jwt_failed_response(reason: str) -> LocalResponse:
    """The 401 for a bearer token that does not validate."""
    return LocalResponse(401, JWT_FAILED_BODY, (WWW_AUTHENTICATE,), reason=f"jwt_invalid: {reason}")


JwtKeys = Mapping[str, Mapping[str, "PublicKey"]]  # trust domain -> kid -> key


class JwtBundles(Protocol):
    """Where the JWT authorities come from: ``keys`` is the current set (trust domain -> kid ->
    key), ``last_error`` why the last update did not take (None when it did)."""

    @property
    def keys(self) -> JwtKeys: ...

    @property
    def last_error(self) -> str | None: ...

    def reload(self) -> bool: ...

    def close(self) -> None: ...


class JwtBundleStore:
    """The JWT authorities from SPIFFE bundle JSON files: ``file`` for ``trust_domain`` (our
    own) and ``federated`` (trust domain -> file) for others. All files are read together; a
    reload where any file is unusable keeps the last good set. Raises ``ProxyError`` at start
    when a file is unusable."""

    def __init__(
        self,
        file: Path,
        *,
        trust_domain: str,
        federated: Mapping[str, Path] | None = None,
    ) -> None:
        self.file = file
        self.trust_domain = trust_domain
        self.files: Mapping[str, Path] = MappingProxyType({trust_domain: file, **(federated or {})})
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stamp = self._files_stamp()
        _load_validator()
        self._keys: JwtKeys = self._load()

    @property
    def keys(self) -> JwtKeys:
        return self._keys

    def _files_stamp(self) -> tuple[FileStamp | None, ...]:
        return files_stamp(self.files.values())

    def _load(self) -> JwtKeys:
        from ca.bundle import from_spiffe_json  # noqa: PLC0415  see _load_validator

        keys: dict[str, Mapping[str, PublicKey]] = {}
        for trust_domain, file in self.files.items():
            what = (
                "jwt.bundle"
                if trust_domain == self.trust_domain
                else f"jwt.federated.{trust_domain}"
            )
            try:
                data = file.read_bytes()
            except OSError as err:
                raise ProxyError(f"{what}: cannot read {file}: {err.strerror}") from err
            try:
                bundle = from_spiffe_json(TrustDomain(trust_domain), data)
            except CaError as err:
                raise ProxyError(f"{what}: {file}: not a SPIFFE bundle ({err})") from err
            keys[trust_domain] = bundle.jwt_authorities
        return MappingProxyType(keys)

    def reload(self) -> bool:
        """Read the files now; on failure keep the last good keys and log why."""
        with self._lock:
            self._stamp = self._files_stamp()
            try:
                keys = self._load()
            except ProxyError as err:
                self.last_error = str(err)
                log.error("jwt bundle not reloaded", extra={"error": str(err)})
                return False
            self._keys = keys
            self.last_error = None
        log.info(
            "jwt bundle loaded",
            extra={
                "trust_domains": ",".join(sorted(keys)),
                "keys": sum(len(k) for k in keys.values()),
            },
        )
        return True

    def poll(self) -> bool:
        """Reload when a file's mtime, size or inode changed; True when new keys took."""
        if self._files_stamp() == self._stamp:
            return False
        return self.reload()

    async def watch(self, interval: float) -> None:
        """Poll the files every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.poll()

    def close(self) -> None:
        return None


class WorkloadApiJwtBundles:
    """The JWT authorities streamed from the Workload API (``FetchJWTBundles``) through
    py-spiffe's ``JwtSource``: our own trust domain's and those of the trust domains our entry
    federates with, replaced as the agent sends new sets. When the stream fails the last good
    keys stay in use and ``last_error`` says why."""

    def __init__(self, endpoint: str | None, *, timeout: float) -> None:
        """Blocks until the first bundle set arrives (call it in a thread from async code)."""
        self.endpoint = endpoint = workload_api_endpoint(endpoint, "jwt")
        self.last_error: str | None = None
        self._lock = threading.Lock()
        _load_validator()
        _load_spiffe()  # the Workload API client (grpc) is loaded only for this source
        from spiffe import JwtSource  # noqa: PLC0415

        try:
            self._source = JwtSource(socket_path=endpoint, timeout_in_seconds=timeout)
        except PySpiffeError as err:
            raise ProxyError(f"jwt: Workload API at {endpoint}: {err}") from err
        self._keys: JwtKeys = MappingProxyType({})
        if not self.reload():
            self._source.close()
            raise ProxyError(f"jwt: Workload API at {endpoint}: {self.last_error}")
        self._source.subscribe_for_updates(self._on_update)

    @property
    def keys(self) -> JwtKeys:
        return self._keys

    def reload(self) -> bool:
        """Take the source's current bundle set; on failure keep the last good keys."""
        try:
            bundles = self._source.bundles
        except PySpiffeError as err:
            with self._lock:
                self.last_error = str(err)
            log.error("jwt bundles from the Workload API not updated", extra={"error": str(err)})
            return False
        # JWT-SVIDs are signed with RSA or EC keys (RS*, PS*, ES*); no other key verifies one.
        keys: JwtKeys = MappingProxyType(
            {
                b.trust_domain.name: MappingProxyType(
                    {
                        kid: key
                        for kid, key in b.jwt_authorities.items()
                        if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
                    }
                )
                for b in bundles
            }
        )
        with self._lock:
            self._keys = keys
            self.last_error = None
        log.info(
            "jwt bundles updated from the Workload API",
            extra={
                "trust_domains": ",".join(sorted(keys)),
                "keys": sum(len(k) for k in keys.values()),
            },
        )
        return True

    def _on_update(self) -> None:
        self.reload()

    def close(self) -> None:
        self._source.unsubscribe_for_updates(self._on_update)
        self._source.close()


def authenticate(
    token: str,
    audiences: Sequence[str],
    keys: JwtKeys,
    *,
    now: datetime,
) -> JwtIdentity:
    """Validate ``token`` as a JWT-SVID for any one of ``audiences``; raises ``JwtRejected``."""
    from ca.jwtsvid import validate_jwt_svid  # noqa: PLC0415  loaded already: _load_validator

    reason: str | None = None
    for audience in dict.fromkeys(audiences):
        try:
            claims = validate_jwt_svid(token, audience, keys, now=now)
        except CaError as err:
            reason = reason or str(err)  # the first audience is our own SPIFFE ID
            continue
        return JwtIdentity(str(claims["sub"]), MappingProxyType(claims))
    raise JwtRejected(reason or "no audience to validate against")


def _load_validator() -> None:
    """Import PyJWT, through ``ca.jwtsvid``, once a JWT bundle source is built: a sidecar
    without a ``jwt`` block never needs it, and the first token should not wait for it."""
    import ca.jwtsvid  # noqa: F401, PLC0415
