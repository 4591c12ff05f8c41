"""``Proxy``: the running sidecar, wired from a ``ProxyConfig``.

Owns the lifecycle: refuse unsupported listener protocols before anything starts, load the
identity (files or the Workload API), build TLS contexts, load the policy (a file, or the stream
from the server through ``PolicySource``) and the optional JWT bundles (files, watched, or the
Workload API), assemble the filter chain, start listeners and the admin server, then report
ready. Stop drains: not ready, stop accepting, in-flight connections get ``timeouts.drain``
seconds, then everything closes. ``reload`` (SIGHUP) re-reads identity files, the JWT bundle
files and the policy file. It must not relay bytes itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import IO, TYPE_CHECKING

from .admin import AdminHooks, AdminServer
from .config import ProxyConfig
from .errors import ProxyError
from .filters import PolicyStore, build_chain
from .identity import (
    FileIdentitySource,
    IdentitySnapshot,
    IdentitySource,
    WorkloadApiIdentitySource,
)
from .jwt_auth import JwtBundles, JwtBundleStore, WorkloadApiJwtBundles
from .listeners import InboundListener, Listener, OutboundListener, check_protocol
from .metrics import ProxyMetrics
from .runtime import loop_name
from .tls import TlsContexts

if TYPE_CHECKING:
    from .policy_source import PolicySource

log = logging.getLogger(__name__)

READY_LINE = "meshid proxy ready"


async def open_identity(config: ProxyConfig) -> IdentitySource:
    """The identity source the config names; the Workload API one waits for its first SVID."""
    ident = config.identity
    if ident.from_files:
        assert ident.cert is not None and ident.key is not None and ident.bundle is not None
        return FileIdentitySource(ident.cert, ident.key, ident.bundle)
    return await asyncio.to_thread(
        WorkloadApiIdentitySource, ident.workload_api, timeout=ident.timeout
    )


async def open_jwt_bundles(config: ProxyConfig, trust_domain: str) -> JwtBundles:
    """The JWT bundles the ``jwt`` block names: files, or the Workload API's stream."""
    jwt = config.jwt
    assert jwt is not None
    if jwt.bundle is not None:
        return JwtBundleStore(jwt.bundle, trust_domain=trust_domain, federated=jwt.federated)
    return await asyncio.to_thread(
        WorkloadApiJwtBundles, config.identity.workload_api, timeout=config.identity.timeout
    )


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        *,
        identity: IdentitySource | None = None,
        access_log_stream: IO[str] | None = None,
    ) -> None:
        for name, protocol in [(i.name, i.protocol) for i in config.inbound] + [
            (o.name, o.protocol) for o in config.outbound
        ]:
            check_protocol(name, protocol)
        self.config = config
        self.metrics = ProxyMetrics()
        self._identity = identity
        self._access_log_stream = access_log_stream
        self._tls: TlsContexts | None = None
        self.policies: PolicyStore | None = None
        self.jwt_bundles: JwtBundles | None = None
        self.policy_source: PolicySource | None = None
        self.listeners: list[Listener] = []
        self.admin: AdminServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = False
        self._stop = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def identity(self) -> IdentitySource:
        if self._identity is None:
            raise ProxyError("the proxy is not started")
        return self._identity

    async def start(self) -> None:
        config = self.config
        if self._identity is None:
            self._identity = await open_identity(config)
        snapshot = self._identity.current()
        trust_domain = config.trust_domain or snapshot.trust_domain
        self._tls = TlsContexts(self._identity)
        from_server = config.policy.server is not None
        self.policies = PolicyStore(
            config.policy.fallback_file if from_server else config.policy.file,
            trust_domain=trust_domain,
            federated=snapshot.bundles.keys(),
            default_posture=config.default_posture,
            metrics=self.metrics,
            from_server=from_server,
        )
        if config.jwt is not None:
            self.jwt_bundles = await open_jwt_bundles(config, trust_domain)
        self._identity.subscribe(self._on_identity)
        chain = build_chain(
            config,
            policies=self.policies,
            metrics=self.metrics,
            access_log_stream=self._access_log_stream,
            jwt_bundles=self.jwt_bundles,
        )
        timeouts = config.timeouts
        self.listeners = [
            *(
                InboundListener(c, self._tls, chain, timeouts, http=config.http)
                for c in config.inbound
            ),
            *(
                OutboundListener(c, self._tls, chain, timeouts, http=config.http)
                for c in config.outbound
            ),
        ]
        for listener in self.listeners:
            listener.reuse_port = config.runtime.workers > 1
            await listener.start()
        self.admin = AdminServer(
            config.admin.listen,
            AdminHooks(ready=lambda: self._ready, metrics=self._render, config=self._config),
        )
        await self.admin.start()
        if isinstance(self._identity, FileIdentitySource):
            self._tasks.append(
                asyncio.create_task(self._identity.watch(config.identity.poll_interval))
            )
        if config.policy.file is not None:
            self._tasks.append(
                asyncio.create_task(self.policies.watch(config.policy.poll_interval))
            )
        if isinstance(self.jwt_bundles, JwtBundleStore) and config.jwt is not None:
            self._tasks.append(
                asyncio.create_task(self.jwt_bundles.watch(config.jwt.poll_interval))
            )
        if config.policy.server is not None:
            from .policy_source import PolicySource  # noqa: PLC0415  grpc only when configured

            self.policy_source = PolicySource(
                config.policy.server,
                self._identity,
                self.policies,
                trust_bundle=config.policy.trust_bundle,
                metrics=self.metrics,
            )
            self.policy_source.start()
        self._ready = True
        log.info(
            READY_LINE,
            extra={
                "event_loop": loop_name(asyncio.get_running_loop()),
                "spiffe_id": snapshot.spiffe_id,
                "admin_port": self.admin.port,
                "listeners": ",".join(f"{x.name}={x.port}" for x in self.listeners),
            },
        )

    def _on_identity(self, snapshot: IdentitySnapshot) -> None:
        self.metrics.rotations.inc()
        if self.policies is not None:
            self.policies.set_trust_domains(
                self.config.trust_domain or snapshot.trust_domain, snapshot.bundles.keys()
            )

    def _render(self) -> str:
        return self.metrics.registry.render()

    def _config(self) -> dict[str, object]:
        data = self.config.public_dict()
        if self._identity is not None:
            try:
                snapshot = self._identity.current()
            except ProxyError:
                pass
            else:
                data["effective"] = {
                    "event_loop": loop_name(asyncio.get_running_loop()),
                    "spiffe_id": snapshot.spiffe_id,
                    "trust_domains": sorted(snapshot.bundles),
                    "listeners": {x.name: x.port for x in self.listeners},
                    "policy_error": None if self.policies is None else self.policies.last_error,
                    "policy_revision": None if self.policies is None else self.policies.revision,
                    "jwt_bundle_error": None
                    if self.jwt_bundles is None
                    else self.jwt_bundles.last_error,
                }
                if self.policy_source is not None:
                    status = self.policy_source.status
                    data["effective"]["policy_server"] = {
                        "address": self.policy_source.address,
                        "connected": status.connected,
                        "sets_received": status.sets_received,
                        "last_error": status.last_error,
                    }
        return data

    def reload(self) -> None:
        """SIGHUP: re-read identity files, the JWT bundle file and the policy file now."""
        if isinstance(self._identity, FileIdentitySource):
            self._identity.reload()
        if self.jwt_bundles is not None:
            self.jwt_bundles.reload()
        if self.policies is not None:
            self.policies.reload()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until ``request_stop`` (SIGTERM), then drain and close."""
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        self._ready = False
        grace = self.config.timeouts.drain
        for listener in self.listeners:
            listener.stop_accepting()
        left = await asyncio.gather(*(x.drain(grace) for x in self.listeners))
        log.info("proxy drained", extra={"cancelled": sum(left)})
        if self.policy_source is not None:
            await self.policy_source.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.admin is not None:
            await self.admin.stop()
        if self._tls is not None:
            self._tls.close()
        if self.jwt_bundles is not None:
            self.jwt_bundles.close()
        if self._identity is not None:
            self._identity.unsubscribe(self._on_identity)
            self._identity.close()
