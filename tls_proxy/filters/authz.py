"""The ``authz`` filter: L4 authorization of each inbound connection by the ``authz`` engine.

Owns ``PolicyStore`` (the policy file → an ``Engine``, reloaded when the file changes, keeping
the last good set when the new text fails to parse; an unreadable or unparsable file at start
fails closed with ``Engine.deny_all``; or, with ``from_server``, the sets ``policy_source``
receives, swapped in by ``apply_set`` the same way, and until the first one the optional
fallback file or else ``Engine.deny_all(NO_POLICY_YET)``) and ``AuthzFilter``, which asks the
engine about every inbound connection: ``destination`` is our own SPIFFE ID, ``source_principal``
the verified peer ID, ``source_address`` the peer address, ``destination_port`` the port we
accepted on, and ``is_l4=True``. A deny closes the connection; a new engine applies to
connections accepted from then on (L4 authorization is decided once, at connection start).
Outbound connections are decided by the far side's inbound proxy, so this filter passes them.

On ``http`` listeners the decision is per request instead (``on_request``, L7): the same
attributes plus ``method``, ``host`` (from Host), the normalized ``path`` and the lower-cased
``headers``, and, with a ``jwt`` block, ``request_principal`` and ``claims`` of the JWT-SVID in
``Authorization: Bearer`` (validated by ``jwt_auth`` for our own SPIFFE ID; a token that does not
validate answers 401 ``Jwt verification fails`` before any policy is asked). A deny answers
403 ``RBAC: access denied`` (with ``x-meshid-denied-by: <policy>/<rule>`` when the proxy's
``debug`` flag is on); every decision is counted by deciding policy and rule, and dry-run and
AUDIT results are logged. It must not evaluate policy itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from authz import Engine, PolicyError, Posture, Request, parse_policies, parse_policy_dict
from authz.model import Policy

from ..errors import ProxyError
from ..jwt_auth import (
    JwtBundles,
    JwtIdentity,
    JwtRejected,
    authenticate,
    bearer_token,
    jwt_failed_response,
)
from ..l7 import Exchange, LocalResponse, RequestHead, denied_response
from ..metrics import ProxyMetrics
from ..watched import FileStamp, file_stamp
from .base import Connection, Deny

log = logging.getLogger(__name__)

NO_POLICY_YET = "no policy received from the server yet"


class PolicyStore:
    """The current ``Engine`` compiled from the policy file (or none: posture only), or from the
    sets the server streams (``from_server``; ``file`` is then the optional fallback)."""

    def __init__(
        self,
        file: Path | None,
        *,
        trust_domain: str,
        federated: Iterable[str] = (),
        default_posture: Posture,
        metrics: ProxyMetrics | None = None,
        from_server: bool = False,
    ) -> None:
        self.file = file
        self.from_server = from_server
        self.revision: int | None = None  # the server's policies revision in force
        self._trust_domain = trust_domain
        self._federated = tuple(sorted(set(federated) - {trust_domain}))
        self._posture = default_posture
        self._metrics = metrics
        self._lock = threading.Lock()
        self._policies: tuple[Policy, ...] | None = None
        self._stamp: FileStamp | None = None
        self.engine = Engine.deny_all("policy not loaded yet")
        self.last_error: str | None = None
        if file is None and from_server:
            self.engine = Engine.deny_all(NO_POLICY_YET)
        elif file is None:
            self._policies = ()
            self.engine = self._compile(())
        elif not self.reload():
            reason = self.last_error or "policy file unusable"
            log.error("policy unusable at start: failing closed", extra={"error": reason})
            self.engine = Engine.deny_all(reason)

    def _compile(self, policies: tuple[Policy, ...], posture: Posture | None = None) -> Engine:
        return Engine.compile(
            policies,
            trust_domain=self._trust_domain,
            federated_trust_domains=self._federated,
            default_posture=self._posture if posture is None else posture,
        )

    def reconfigure(self, file: Path | None, default_posture: Posture) -> None:
        """A configuration reload: another policy file (with a server: another fallback file)
        and/or default posture. Everything is read and compiled first; on failure this raises
        ``ProxyError`` naming the file and the reason, and nothing changes. A set received from
        the server stays in force (only the posture applies to it)."""
        with self._lock:
            policies: tuple[Policy, ...] | None
            stamp = self._stamp
            if self.from_server and self.revision is not None:
                policies = self._policies
            elif file is None:
                policies = None if self.from_server else ()
            else:
                stamp = file_stamp(file)
                try:
                    policies = _read_policies(file)
                except ProxyError as err:
                    raise ProxyError(f"policy: {err}") from err
            try:
                engine = (
                    Engine.deny_all(NO_POLICY_YET)
                    if policies is None
                    else self._compile(policies, default_posture)
                )
            except PolicyError as err:
                raise ProxyError(f"policy: {err}") from err
            self.file = file
            self._posture = default_posture
            self._policies = policies
            self._stamp = stamp
            self.engine = engine
            self.last_error = None
        log.info(
            "policy reconfigured",
            extra={"file": str(file), "default_posture": str(default_posture)},
        )

    def reload(self) -> bool:
        """Read and compile the file now; on failure keep the last good engine and log why.

        A fallback file never replaces a set received from the server."""
        if self.file is None or self.revision is not None:
            return False
        with self._lock:
            stamp = file_stamp(self.file)
            try:
                policies = _read_policies(self.file)
                engine = self._compile(policies)
            except (ProxyError, PolicyError) as err:
                return self._failed(str(err), stamp)
            self._stamp = stamp
            self._policies = policies
            self.engine = engine
            self.last_error = None
        log.info("policy loaded", extra={"file": str(self.file), "policies": len(policies)})
        if self._metrics is not None:
            self._metrics.policy_reloads.inc(result="ok")
        return True

    def apply_set(self, documents: Sequence[tuple[str, bytes]], revision: int) -> bool:
        """Swap in a set from the server (name, JSON document): all of it or, when any document
        fails to parse, none of it: the last good engine stays and the reason is logged."""
        with self._lock:
            try:
                policies = tuple(
                    policy
                    for name, document in documents
                    for policy in parse_policy_dict(
                        _json(document, name), f"server policy {name} (revision {revision})"
                    ).policies
                )
                engine = self._compile(policies)
            except PolicyError as err:
                return self._failed(str(err), self._stamp)
            self._policies = policies
            self.engine = engine
            self.revision = revision
            self.last_error = None
        log.info(
            "policy set from the server in force",
            extra={"revision": revision, "policies": ",".join(p.name for p in policies)},
        )
        if self._metrics is not None:
            self._metrics.policy_reloads.inc(result="ok")
        return True

    def _failed(self, reason: str, stamp: FileStamp | None) -> bool:
        self._stamp = stamp
        self.last_error = reason
        kept = "keeping the last good policy set" if self._policies is not None else "none yet"
        log.error("policy reload failed", extra={"error": reason, "kept": kept})
        if self._metrics is not None:
            self._metrics.policy_reloads.inc(result="failed")
        return False

    def poll(self) -> bool:
        """Reload when the file's mtime or size changed; True when a new set took effect."""
        if self.file is None or file_stamp(self.file) == self._stamp:
            return False
        return self.reload()

    def set_trust_domains(self, trust_domain: str, federated: Iterable[str]) -> None:
        """Recompile for new trust domains (a bundle appeared or went) with the same policies."""
        federated_sorted = tuple(sorted(set(federated) - {trust_domain}))
        with self._lock:
            if (trust_domain, federated_sorted) == (self._trust_domain, self._federated):
                return
            self._trust_domain, self._federated = trust_domain, federated_sorted
            if self._policies is not None:
                self.engine = self._compile(self._policies)

    async def watch(self, interval: float) -> None:
        """Poll the file every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.poll()


def _read_policies(file: Path) -> tuple[Policy, ...]:
    """The policies of ``file``; ``ProxyError`` says why they cannot be read or parsed."""
    try:
        return parse_policies(file.read_text(), str(file)).policies
    except OSError as err:
        raise ProxyError(f"{file}: cannot read: {err.strerror}") from err
    except (PolicyError, UnicodeDecodeError) as err:
        raise ProxyError(str(err)) from err


def _json(document: bytes, name: str) -> object:
    try:
        return json.loads(document)
    except (ValueError, UnicodeDecodeError) as err:
        raise PolicyError(f"server policy {name}", "", f"expected a JSON document ({err})") from err


class AuthzFilter:
    name = "authz"

    def __init__(
        self,
        store: PolicyStore,
        metrics: ProxyMetrics | None = None,
        *,
        debug: bool = False,
        jwt_bundles: JwtBundles | None = None,
        jwt_audiences: Sequence[str] = (),
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._debug = debug
        self._jwt_bundles = jwt_bundles
        self._jwt_audiences = tuple(jwt_audiences)

    def on_connection(self, conn: Connection) -> Deny | None:
        if conn.direction != "inbound" or conn.protocol != "tcp":
            return None  # outbound: the far side decides; http: decided per request (L7)
        if conn.local_id is None:
            return Deny(self.name, "no local identity to authorize against")
        verdict = self._store.engine.evaluate(
            Request(
                destination=conn.local_id,
                source_principal=conn.peer_id,
                source_address=conn.source_address,
                destination_port=conn.destination_port,
                is_l4=True,
            )
        )
        conn.verdict = verdict
        if self._metrics is not None:
            self._metrics.authz.inc(listener=conn.listener, decision=verdict.decision)
        if verdict.allowed:
            return None
        log.info(
            "connection denied by policy",
            extra={
                "listener": conn.listener,
                "peer_id": conn.peer_id,
                "source": conn.source,
                "policy": verdict.policy,
                "rule": verdict.rule,
                "reason": verdict.reason,
            },
        )
        return Deny(self.name, verdict.reason)

    def on_close(self, conn: Connection) -> None:
        return None

    async def on_request(
        self, conn: Connection, request: RequestHead, exchange: Exchange
    ) -> LocalResponse | None:
        if conn.direction != "inbound":
            return None
        if conn.local_id is None:
            return LocalResponse(403, b"RBAC: access denied", reason="no local identity")
        identity: JwtIdentity | None = None
        if self._jwt_bundles is not None:
            token = bearer_token(request.headers)
            if token is not None:
                try:
                    identity = authenticate(
                        token,
                        (conn.local_id, *self._jwt_audiences),
                        self._jwt_bundles.keys,
                        now=datetime.now(UTC),
                    )
                except JwtRejected as err:  # the reason only: a token is never logged
                    log.info(
                        "request JWT-SVID rejected",
                        extra={
                            "listener": conn.listener,
                            "peer_id": conn.peer_id,
                            "method": request.method,
                            "path": request.path,
                            "error": str(err),
                        },
                    )
                    exchange.error, exchange.detail = "jwt_invalid", str(err)
                    return jwt_failed_response(str(err))
        engine = self._store.engine  # no policy for this workload: no Request to build
        verdict = engine.posture_only(conn.local_id, conn.peer_id) or engine.evaluate(
            Request(
                destination=conn.local_id,
                source_principal=conn.peer_id,
                source_address=conn.source_address,
                destination_port=conn.destination_port,
                method=request.method,
                host=request.host,
                path=request.path,
                headers=request.headers,
                request_principal=None if identity is None else identity.principal,
                claims={} if identity is None else identity.claims,
            )
        )
        exchange.verdict = verdict
        if self._metrics is not None:
            self._metrics.http_authz.inc_values(
                (
                    conn.listener,
                    verdict.decision,
                    verdict.policy or "none",
                    "none" if verdict.rule is None else str(verdict.rule),
                )
            )
        if verdict.allowed and not (verdict.dry_run or verdict.audit):
            return None
        fields = {
            "listener": conn.listener,
            "peer_id": conn.peer_id,
            "request_principal": None if identity is None else identity.principal,
            "method": request.method,
            "path": request.path,
            "policy": verdict.policy,
            "rule": verdict.rule,
            "reason": verdict.reason,
        }
        if verdict.dry_run or verdict.audit:
            log.info(
                "request dry-run and audit results",
                extra={
                    **fields,
                    "dry_run": json.dumps([r.as_dict() for r in verdict.dry_run]),
                    "audit": json.dumps([m.as_dict() for m in verdict.audit]),
                },
            )
        if verdict.allowed:
            return None
        log.info("request denied by policy", extra=fields)
        return denied_response(verdict, debug=self._debug)

    def on_request_end(self, conn: Connection, exchange: Exchange) -> None:
        return None
