"""Policies streamed from a meshid server (``policy: {server: HOST:PORT}``).

Owns the proxy's side of ``meshid.node.v1.Policies/WatchPolicies`` (``ca/nodeapi/node.proto``):
a grpcio channel authenticated both ways (our *current* X509-SVID from the ``IdentitySource`` as
client certificate, rebuilt when the identity rotates; the server checked against the trust
bundle, by the name ``meshid-server`` its SVID carries), each received set handed to
``PolicyStore.apply_set`` (which compiles it and swaps it in, or keeps the last good set and
logs why), and reconnection with capped exponential backoff and full jitter while the server is
unreachable, keeping whatever set is in force. ``retry_delay`` is the pure part.

It must not evaluate policy or parse documents (``PolicyStore`` does), and must not drop
connections: a new set applies to connections accepted from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from ca.nodeapi import node_pb2, node_pb2_grpc

from .errors import IdentityError
from .filters.authz import PolicyStore
from .identity import IdentitySnapshot, IdentitySource
from .metrics import Gauge, ProxyMetrics

log = logging.getLogger(__name__)

SERVER_TLS_NAME = "meshid-server"  # the DNS SAN every meshid server SVID carries
RETRY_FIRST = 0.2  # seconds before the first reconnect: a restarting server is back quickly
RETRY_MAX = 10.0  # seconds at most between attempts: bounded staleness, no thundering herd
KEEPALIVE_MS = 10_000  # notice a vanished server on an idle stream within ~20 s


def retry_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): full jitter over a capped
    exponential, so proxies cut off together do not come back together."""
    ceiling = min(RETRY_MAX, RETRY_FIRST * 2**attempt)
    return (rng or random).uniform(RETRY_FIRST / 2, ceiling)


@dataclass
class SourceStatus:
    """What ``/config`` shows about the stream."""

    connected: bool = False
    sets_received: int = 0
    last_error: str | None = None


class PolicySource:
    """Keeps ``store`` fed from one server's ``WatchPolicies`` stream until ``close``."""

    def __init__(
        self,
        address: str,
        identity: IdentitySource,
        store: PolicyStore,
        *,
        trust_bundle: Path | None = None,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.address = address
        self._identity = identity
        self._store = store
        self._trust_bundle = trust_bundle
        self.status = SourceStatus()
        self._rotated = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._revision_gauge: Gauge | None = None
        self._connected_gauge: Gauge | None = None
        if metrics is not None:
            registry = metrics.registry
            self._revision_gauge = registry.gauge(
                "meshid_proxy_policy_revision",
                "The server's policies revision of the set in force (0: none received yet).",
                aggregate="min",  # over workers: the oldest set any worker still enforces
            )
            self._connected_gauge = registry.gauge(
                "meshid_proxy_policy_stream_connected",
                "1 while the policy stream from the server is open.",
                aggregate="min",  # over workers: 1 only while every worker's stream is open
            )

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._identity.subscribe(self._on_identity)
        self._task = asyncio.create_task(self._run(), name="policy-source")

    async def close(self) -> None:
        self._identity.unsubscribe(self._on_identity)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _on_identity(self, snapshot: IdentitySnapshot) -> None:
        # Possibly from py-spiffe's watcher thread: only hand the news to the loop.
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: we are stopping
                self._loop.call_soon_threadsafe(self._rotated.set)

    # -- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while True:
            self._rotated.clear()
            received_before = self.status.sets_received
            try:
                channel = self._channel(self._identity.current())
            except (IdentityError, OSError) as err:
                self._failed(f"cannot build the channel: {err}")
            else:
                try:
                    await self._until_rotated(channel)
                finally:
                    await channel.close()
                    self._set_connected(False)
            if self._rotated.is_set():
                log.info("identity rotated: reconnecting to the policy server")
                attempt = 0
                continue
            if self.status.sets_received > received_before:
                attempt = 0
            delay = retry_delay(attempt)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rotated.wait(), delay)

    async def _until_rotated(self, channel: grpc.aio.Channel) -> None:
        """Consume the stream until it fails or our identity rotates (then cancel it)."""
        consume = asyncio.create_task(self._consume(channel))
        rotated = asyncio.create_task(self._rotated.wait())
        try:
            await asyncio.wait({consume, rotated}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (consume, rotated):
                task.cancel()
            await asyncio.gather(consume, rotated, return_exceptions=True)

    async def _consume(self, channel: grpc.aio.Channel) -> None:
        stub = node_pb2_grpc.PoliciesStub(channel)  # type: ignore[no-untyped-call]
        since = self._store.revision or 0
        call = stub.WatchPolicies(node_pb2.WatchPoliciesRequest(since_revision=since))
        try:
            async for message in call:
                self._set_connected(True)
                self._apply(message)
            self._failed("the server ended the stream")
        except grpc.aio.AioRpcError as err:
            self._failed(f"{err.code().name}: {err.details()}")
        finally:
            call.cancel()

    def _apply(self, message: node_pb2.PolicySet) -> None:
        self.status.sets_received += 1
        documents = [(p.name, bytes(p.document_json)) for p in message.policies]
        applied = self._store.apply_set(documents, message.revision)
        if applied and self._revision_gauge is not None:
            self._revision_gauge.inc(message.revision - self._revision_gauge.value())

    def _failed(self, reason: str) -> None:
        self.status.last_error = reason
        kept = "keeping the policy set in force" if self._store.revision is not None else "none yet"
        log.warning(
            "policy stream from the server failed",
            extra={"server": self.address, "error": reason, "kept": kept},
        )

    def _set_connected(self, connected: bool) -> None:
        if connected != self.status.connected and self._connected_gauge is not None:
            self._connected_gauge.inc(1 if connected else -1)
        if connected and not self.status.connected:
            log.info("policy stream from the server open", extra={"server": self.address})
            self.status.last_error = None
        self.status.connected = connected

    def _roots(self, snapshot: IdentitySnapshot) -> bytes:
        if self._trust_bundle is not None:
            return self._trust_bundle.read_bytes()
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in snapshot.bundles.get(snapshot.trust_domain, ())
        )

    def _channel(self, snapshot: IdentitySnapshot) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._roots(snapshot),
            private_key=snapshot.key_pem(),
            certificate_chain=snapshot.chain_pem(),
        )
        return grpc.aio.secure_channel(
            self.address,
            credentials,
            options=[
                ("grpc.ssl_target_name_override", SERVER_TLS_NAME),
                ("grpc.default_authority", SERVER_TLS_NAME),
                ("grpc.keepalive_time_ms", KEEPALIVE_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
            ],
        )
