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
import dataclasses
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .admin import AdminHooks, AdminServer
from .config import InboundConfig, OutboundConfig, ProxyConfig, load_config, split_address
from .errors import ProxyError
from .filters import FilterChain, PolicyStore, build_chain
from .identity import (
    FileIdentitySource,
    IdentitySnapshot,
    IdentitySource,
    WorkloadApiIdentitySource,
)
from .jwt_auth import JwtBundles, JwtBundleStore, WorkloadApiJwtBundles
from .listeners import InboundListener, Listener, OutboundListener, check_protocol
from .metrics import ProxyMetrics
from .reload import ReloadPlan, plan_reload
from .runtime import Worker, loop_name
from .tls import TlsContexts
from .watched import file_stamp
from .worker_metrics import WorkerMetrics

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


CONFIG_POLL_INTERVAL = 1.0  # seconds between checks of the configuration file's mtime


def _bound_at(listener: Listener, listen: str) -> bool:
    """Whether ``listener`` is bound where ``listen`` asks (its port 0 resolved)."""
    host, port = split_address(listen)
    old_host, old_port = split_address(listener.listen)
    return host == old_host and port == listener.port and old_port in (0, port)


def _listeners_of(config: ProxyConfig) -> list[InboundConfig | OutboundConfig]:
    return [*config.inbound, *config.outbound]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        *,
        identity: IdentitySource | None = None,
        access_log_stream: IO[str] | None = None,
        config_path: Path | None = None,
        worker: Worker | None = None,
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
        self._watchers: dict[str, asyncio.Task[None]] = {}  # policy / jwt file polls
        self._draining: set[asyncio.Task[int]] = set()  # listeners a reload took away
        self._chain: FilterChain | None = None
        self._ready = False
        self._stop = asyncio.Event()
        # ``meshid proxy run``: the file to re-read on SIGHUP or when it changes, and which
        # worker this is (its admin port is derived from the file's, ``for_worker``).
        self.config_path = config_path
        self._worker = 0 if worker is None else worker.index
        # With runtime.workers: this worker's part in the totals every worker's /metrics shows.
        self.worker_metrics = (
            None
            if worker is None
            else WorkerMetrics(
                worker.directory,
                worker.index,
                worker.count,
                self.metrics.registry,
                self._refresh_gauges,
            )
        )
        self._config_stamp = None if config_path is None else file_stamp(config_path)
        self._reloading = asyncio.Lock()
        self.reload_status: dict[str, object] = {"result": None}

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
        self._chain = self._build_chain(config, self.jwt_bundles)
        self.listeners = [self._listener(c, config, self._chain) for c in _listeners_of(config)]
        for listener in self.listeners:
            await listener.start()
        if self.worker_metrics is not None:
            await self.worker_metrics.start()
        self.admin = AdminServer(
            config.admin.listen,
            AdminHooks(
                ready=lambda: self._ready,
                metrics=self._render,
                config=self._config,
                total_metrics=None if self.worker_metrics is None else self.worker_metrics.render,
            ),
        )
        await self.admin.start()
        if isinstance(self._identity, FileIdentitySource):
            self._tasks.append(
                asyncio.create_task(self._identity.watch(config.identity.poll_interval))
            )
        self._start_watchers(config)
        if self.config_path is not None:
            self._tasks.append(asyncio.create_task(self._watch_config_file()))
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

    def _build_chain(self, config: ProxyConfig, jwt_bundles: JwtBundles | None) -> FilterChain:
        assert self.policies is not None
        return build_chain(
            config,
            policies=self.policies,
            metrics=self.metrics,
            access_log_stream=self._access_log_stream,
            jwt_bundles=jwt_bundles,
        )

    def _listener(
        self, c: InboundConfig | OutboundConfig, config: ProxyConfig, chain: FilterChain
    ) -> Listener:
        assert self._tls is not None
        listener: Listener
        if isinstance(c, InboundConfig):
            listener = InboundListener(c, self._tls, chain, config.timeouts, http=config.http)
        else:
            listener = OutboundListener(c, self._tls, chain, config.timeouts, http=config.http)
        listener.reuse_port = config.runtime.workers > 1
        return listener

    def _start_watchers(self, config: ProxyConfig) -> None:
        """(Re)start the polls of the policy file and the JWT bundle files of ``config``."""
        for task in self._watchers.values():
            task.cancel()
        self._watchers.clear()
        if config.policy.file is not None and self.policies is not None:
            self._watchers["policy"] = asyncio.create_task(
                self.policies.watch(config.policy.poll_interval)
            )
        if isinstance(self.jwt_bundles, JwtBundleStore) and config.jwt is not None:
            self._watchers["jwt"] = asyncio.create_task(
                self.jwt_bundles.watch(config.jwt.poll_interval)
            )

    # -- configuration reload ------------------------------------------------------------------

    async def apply_config(self, new: ProxyConfig) -> ReloadPlan:
        """Take ``new`` as the running configuration, entirely or not at all.

        Refused (``ProxyError``, nothing changed) when it changes what needs a restart
        (``reload.plan_reload``), names a policy file that does not parse, or a new address
        cannot be bound. Otherwise: new and moved listeners are bound first, then the policy
        store, the filter chain, timeouts and HTTP settings and changed listeners take the new
        values for what comes next, and listeners removed or moved away stop accepting and
        drain their connections (``timeouts.drain``) in the background. Open connections are
        never dropped by a reload.
        """
        async with self._reloading:
            return await self._apply(new)

    async def _apply(self, new: ProxyConfig) -> ReloadPlan:
        old = self.config
        plan = plan_reload(old, new)
        if plan.empty:
            return plan
        if plan.refused:
            raise ProxyError(
                f"configuration not reloaded: {', '.join(plan.restart_keys)} changed, which "
                "takes a restart of the proxy; the running configuration stays"
            )
        for c in (*plan.add, *plan.move, *plan.update):
            check_protocol(c.name, c.protocol)
        assert self.policies is not None and self._chain is not None
        changed = set(plan.changed_keys)
        # 1. Everything that can fail, before anything changes.
        jwt_bundles = self.jwt_bundles
        if "jwt" in changed and new.jwt is not None:
            trust_domain = new.trust_domain or self.identity.current().trust_domain
            jwt_bundles = await open_jwt_bundles(new, trust_domain)
        elif "jwt" in changed:
            jwt_bundles = None
        chain = self._chain
        if plan.rebuild_chain:
            chain = self._build_chain(new, jwt_bundles)
        by_name = {x.name: x for x in self.listeners}
        # "127.0.0.1:0" bound to port P, now written "127.0.0.1:P": the same socket, kept.
        same = [c for c in plan.move if _bound_at(by_name[c.name], c.listen)]
        if same:
            plan = dataclasses.replace(
                plan,
                move=tuple(c for c in plan.move if c not in same),
                update=(*plan.update, *same),
            )
        started: list[Listener] = []
        try:
            for name in plan.remove:  # a listener changing direction may take its own address
                if any(c.name == name for c in plan.add):
                    by_name[name].stop_accepting()
            for c in (*plan.add, *plan.move):
                listener = self._listener(c, new, chain)
                await listener.start()
                started.append(listener)
            if "policy" in changed or "default_posture" in changed:
                from_server = new.policy.server is not None
                self.policies.reconfigure(
                    new.policy.fallback_file if from_server else new.policy.file,
                    new.default_posture,
                )
        except (OSError, ProxyError) as err:
            for listener in started:
                await listener.drain(0)
            if jwt_bundles is not self.jwt_bundles and jwt_bundles is not None:
                jwt_bundles.close()
            for name in plan.remove:
                if any(c.name == name for c in plan.add):
                    await by_name[name].start()  # back where it was
            raise ProxyError(f"configuration not reloaded: {err}") from err
        # 2. Commit: nothing below fails.
        if jwt_bundles is not self.jwt_bundles:
            if self.jwt_bundles is not None:
                self.jwt_bundles.close()
            self.jwt_bundles = jwt_bundles
        self._chain = chain
        new_names = {c.name for c in plan.add}
        moved = {c.name for c in plan.move}
        leaving = [by_name[n] for n in (*plan.remove, *moved)]
        configs = {c.name: c for c in _listeners_of(new)}
        kept = [x for x in self.listeners if x.name not in new_names | moved | set(plan.remove)]
        for listener in kept:
            listener.update(configs[listener.name], chain, new.timeouts, new.http)
        self.listeners = [*kept, *started]
        for listener in leaving:
            task = asyncio.create_task(listener.drain(old.timeouts.drain))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        self.config = new
        logging.getLogger().setLevel(new.log_level.upper())
        self._start_watchers(new)
        return plan

    async def reload_config_file(self) -> None:
        """Read ``config_path`` and apply it; the outcome is logged, counted and shown in
        ``/config`` (``effective.config_reload``). A failure keeps the running config."""
        if self.config_path is None:
            return
        self._config_stamp = file_stamp(self.config_path)
        try:
            new = load_config(self.config_path).for_worker(self._worker)
            plan = await self.apply_config(new)
        except ProxyError as err:
            self.metrics.config_reloads.inc(result="refused")
            self.reload_status = {"result": "refused", "error": str(err), "at": _now()}
            log.error("configuration reload refused", extra={"error": str(err)})
            return
        if plan.empty:
            return
        self.metrics.config_reloads.inc(result="applied")
        self.reload_status = {"result": "applied", "changes": plan.summary(), "at": _now()}
        log.info("configuration reloaded", extra=plan.summary())

    async def _watch_config_file(self) -> None:
        assert self.config_path is not None
        while True:
            await asyncio.sleep(CONFIG_POLL_INTERVAL)
            if file_stamp(self.config_path) != self._config_stamp:
                await self.reload_config_file()

    def _render(self) -> str:
        self._refresh_gauges()
        return self.metrics.registry.render()

    def _refresh_gauges(self) -> None:
        """Set the gauges read when ``/metrics`` is scraped (shared HTTP/2 connections)."""
        for listener in self.listeners:
            labels = {"listener": listener.name, "direction": listener.direction}
            self.metrics.h2_upstream_connections.set(listener.h2pool.connections, **labels)
            self.metrics.h2_upstream_streams.set(listener.h2pool.streams, **labels)

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
                data["effective"]["config_reload"] = self.reload_status
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
        """SIGHUP: re-read the configuration file, identity files, the JWT bundle files and
        the policy file now."""
        if isinstance(self._identity, FileIdentitySource):
            self._identity.reload()
        if self.jwt_bundles is not None:
            self.jwt_bundles.reload()
        if self.policies is not None:
            self.policies.reload()
        if self.config_path is not None:
            task = asyncio.create_task(self.reload_config_file())
            self._tasks.append(task)

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
        left = await asyncio.gather(*(x.drain(grace) for x in self.listeners), *self._draining)
        log.info("proxy drained", extra={"cancelled": sum(left)})
        if self.policy_source is not None:
            await self.policy_source.close()
        tasks = [*self._tasks, *self._watchers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._watchers.clear()
        if self.admin is not None:
            await self.admin.stop()
        if self.worker_metrics is not None:  # answered the others' scrapes through the drain
            await self.worker_metrics.stop()
        if self._tls is not None:
            self._tls.close()
        if self.jwt_bundles is not None:
            self.jwt_bundles.close()
        if self._identity is not None:
            self._identity.unsubscribe(self._on_identity)
            self._identity.close()
