"""JWT-SVID request authentication for L7 authz (``request_principals``, ``request.auth.*``).

Owns ``JwtBundleStore`` (the JWT authorities of the proxy's own trust domain, read from the
SPIFFE bundle JSON file ``jwt.bundle`` at start, reloaded when the file changes, keeping the last
good keys when the new text is unusable), ``bearer_token`` (the token of an ``Authorization:
Bearer`` header, if any) and ``authenticate`` (validate it with ``ca.jwtsvid.validate_jwt_svid``
against our own SPIFFE ID and the configured extra audiences). A token is a credential: it must
never be logged; ``JwtRejected`` carries the validator's reason only. It must not decide policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from spiffe import TrustDomain

from ca.bundle import from_spiffe_json
from ca.errors import CaError
from ca.jwtsvid import validate_jwt_svid
from ca.keys import PublicKey

from .errors import ProxyError
from .l7 import LocalResponse

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


class JwtBundleStore:
    """The JWT authorities (kid -> key) per trust domain, from one SPIFFE bundle JSON file for
    ``trust_domain``. Raises ``ProxyError`` at start when the file is unusable."""

    def __init__(self, file: Path, *, trust_domain: str) -> None:
        self.file = file
        self.trust_domain = trust_domain
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = self._file_stamp()
        self._keys: Mapping[str, Mapping[str, PublicKey]] = self._load()

    @property
    def keys(self) -> Mapping[str, Mapping[str, PublicKey]]:
        return self._keys

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> Mapping[str, Mapping[str, PublicKey]]:
        try:
            data = self.file.read_bytes()
        except OSError as err:
            raise ProxyError(f"jwt.bundle: cannot read {self.file}: {err.strerror}") from err
        try:
            bundle = from_spiffe_json(TrustDomain(self.trust_domain), data)
        except CaError as err:
            raise ProxyError(f"jwt.bundle: {self.file}: not a SPIFFE bundle ({err})") from err
        return MappingProxyType({self.trust_domain: bundle.jwt_authorities})

    def reload(self) -> bool:
        """Read the file now; on failure keep the last good keys and log why."""
        with self._lock:
            self._stamp = self._file_stamp()
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
                "file": str(self.file),
                "trust_domain": self.trust_domain,
                "keys": len(keys[self.trust_domain]),
            },
        )
        return True

    def poll(self) -> bool:
        """Reload when the file's mtime, size or inode changed; True when new keys took."""
        if self._file_stamp() == self._stamp:
            return False
        return self.reload()

    async def watch(self, interval: float) -> None:
        """Poll the file every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.poll()


def authenticate(
    token: str,
    audiences: Sequence[str],
    keys: Mapping[str, Mapping[str, PublicKey]],
    *,
    now: datetime,
) -> JwtIdentity:
    """Validate ``token`` as a JWT-SVID for any one of ``audiences``; raises ``JwtRejected``."""
    reason: str | None = None
    for audience in dict.fromkeys(audiences):
        try:
            claims = validate_jwt_svid(token, audience, keys, now=now)
        except CaError as err:
            reason = reason or str(err)  # the first audience is our own SPIFFE ID
            continue
        return JwtIdentity(str(claims["sub"]), MappingProxyType(claims))
    raise JwtRejected(reason or "no audience to validate against")
