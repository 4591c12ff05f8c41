"""The node agent: attests, syncs its entries, keeps workload SVIDs fresh, serves them.

Owns the process-level orchestration and its I/O: the agent's own SVID and key on disk (0600),
the trust bundle it learned, the node clients with failover and backoff, the rotation job
(APScheduler, planned by ``rotation.plan_renewals``), and the Workload API server. Workload keys
are generated here and kept in memory. When the servers are unreachable the agent keeps serving
what it holds and retries with backoff and jitter; workloads notice nothing until SVIDs expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from spiffe import SpiffeId, TrustDomain

from ca.bundle import TrustBundle, from_pem, from_spiffe_json, to_pem, to_spiffe_json
from ca.errors import CaError
from ca.keys import (
    KeyType,
    PrivateKey,
    generate_key,
    load_private_key_pem,
    private_key_pem,
    write_private_file,
)
from workload_api.attestors.composite import build_attestor
from workload_api.server import WorkloadApiServer

from . import disk_cache
from .cache import HeldX509, IdentityCache, held_from_chain
from .client import AgentSvid, NodeClient, csr_for
from .config import AgentConfig
from .errors import AgentError, AttestationError, PermissionDenied, ServerUnavailable
from .rotation import HeldSvid, WantedEntry, plan_renewals, renew_at
from .sync_state import BundleDoc, SyncState

log = logging.getLogger(__name__)

SIGN_BATCH = 500  # CSRs per BatchNewX509SVID call
BACKOFF_START = 0.5  # seconds before the first retry after a failure
BACKOFF_MAX = 30.0  # never wait longer than this between attempts
AGENT_RENEW_FRACTION = 0.5  # renew the agent's own SVID at half its lifetime
WORKLOAD_KEY_TYPE = KeyType.EC_P256
RETRY_AFTER_FAILURE = timedelta(seconds=2)  # a refused or failed signing is retried this soon
CACHE_SAVE_INTERVAL = timedelta(seconds=5)  # the optional disk cache lags the memory by this


class Backoff:
    """Exponential backoff with full jitter, so many agents do not retry in lockstep."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._ceiling = BACKOFF_START

    def reset(self) -> None:
        self._ceiling = BACKOFF_START

    def next(self) -> float:
        delay = self._rng.uniform(BACKOFF_START / 2, self._ceiling)
        self._ceiling = min(self._ceiling * 2, BACKOFF_MAX)
        return delay


class Agent:
    def __init__(self, config: AgentConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self._rng = rng or random.SystemRandom()
        self._svid_path = self.data_dir / "agent_svid.pem"
        self._key_path = self.data_dir / "agent_svid.key"
        self._bundle_path = self.data_dir / "bundle.json"
        self._svid_cache_path = self.data_dir / "svid_cache.json"
        self._cache_dirty = False
        self._agent_key: PrivateKey | None = None
        self._agent_svid: AgentSvid | None = None
        self._trust: TrustBundle | None = None
        self._clients = [
            NodeClient(address, self._trust_pem, self._credentials) for address in config.servers
        ]
        self._current = 0
        self.state = SyncState()
        self.cache: IdentityCache | None = None
        self._renew_at: dict[str, datetime] = {}
        self._stop = asyncio.Event()
        self._scheduler: AsyncIOScheduler | None = None
        self._rotate_lock = asyncio.Lock()
        self._scheduled_once = False
        self.ready = asyncio.Event()

    # -- identity on disk ---------------------------------------------------------------------
    def _trust_pem(self) -> bytes:
        assert self._trust is not None
        return to_pem(self._trust)

    def _credentials(self) -> tuple[bytes, bytes] | None:
        if self._agent_key is None or self._agent_svid is None:
            return None
        return private_key_pem(self._agent_key), self._agent_svid.chain_pem()

    def _load_trust(self) -> None:
        td = TrustDomain(self.config.trust_domain)
        if self._bundle_path.exists():
            try:
                self._trust = from_spiffe_json(td, self._bundle_path.read_bytes())
                return
            except CaError:
                log.warning("stored bundle unreadable; falling back to --trust-bundle")
        try:
            pem = self.config.trust_bundle.read_bytes()
        except OSError as err:
            raise AgentError(
                f"trust_bundle: cannot read {self.config.trust_bundle}: {err.strerror}"
            ) from err
        try:
            self._trust = from_pem(td, pem)
        except CaError as err:
            raise AgentError(f"trust_bundle: {self.config.trust_bundle}: {err}") from err

    def _load_agent_svid(self) -> bool:
        if not (self._svid_path.exists() and self._key_path.exists()):
            return False
        try:
            chain = x509.load_pem_x509_certificates(self._svid_path.read_bytes())
            key = load_private_key_pem(self._key_path.read_bytes(), field=str(self._key_path))
        except (ValueError, CaError) as err:
            log.warning("stored agent SVID unreadable; attesting again", extra={"error": str(err)})
            return False
        leaf = chain[0]
        if leaf.not_valid_after_utc <= datetime.now(UTC):
            log.warning("stored agent SVID expired; attesting again")
            return False
        uri = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        [spiffe_id] = uri.value.get_values_for_type(x509.UniformResourceIdentifier)
        self._agent_key = key
        self._agent_svid = AgentSvid(
            spiffe_id,
            tuple(c.public_bytes(serialization.Encoding.DER) for c in chain),
            (),
            None,
        )
        return True

    def _store_agent_svid(self, key: PrivateKey, svid: AgentSvid) -> None:
        write_private_file(self._key_path, private_key_pem(key))
        write_private_file(self._svid_path, svid.chain_pem())
        self._agent_key, self._agent_svid = key, svid
        if svid.bundle is not None:
            self._store_bundle(svid.bundle)

    def _store_bundle(self, doc: BundleDoc) -> None:
        try:
            self._trust = from_spiffe_json(TrustDomain(doc.trust_domain), doc.spiffe_bundle)
        except CaError as err:
            log.error("server sent an unusable bundle", extra={"error": str(err)})
            return
        write_private_file(self._bundle_path, doc.spiffe_bundle)

    @property
    def spiffe_id(self) -> str | None:
        return self._agent_svid.spiffe_id if self._agent_svid else None

    # -- attestation and renewal ---------------------------------------------------------------
    async def _attest(self) -> None:
        key = generate_key(KeyType.EC_P256)
        backoff = Backoff(self._rng)
        last: Exception | None = None
        for attempt in range(len(self._clients) * 3):
            client = self._clients[(self._current + attempt) % len(self._clients)]
            try:
                if self.config.join_token:
                    svid = await client.attest_join_token(self.config.join_token, key)
                elif self.config.x509pop_cert and self.config.x509pop_key:
                    chain = self.config.x509pop_cert.read_bytes()
                    node_key = load_private_key_pem(self.config.x509pop_key.read_bytes())
                    svid = await client.attest_x509pop(
                        chain, key, functools.partial(_pop_sign, node_key)
                    )
                else:
                    raise AttestationError(
                        "no stored agent SVID and no way to attest: give --join-token or "
                        "--x509pop-cert/--x509pop-key"
                    )
            except ServerUnavailable as err:
                last = err
                await self._sleep(backoff.next())
                continue
            self._store_agent_svid(key, svid)
            log.info(
                "agent attested", extra={"spiffe_id": svid.spiffe_id, "server": client.address}
            )
            return
        raise ServerUnavailable(f"attestation failed on every server: {last}")

    async def _renew_agent_if_due(self) -> None:
        svid = self._agent_svid
        if svid is None:
            return
        leaf = svid.leaf
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        if datetime.now(UTC) < leaf.not_valid_before_utc + lifetime * AGENT_RENEW_FRACTION:
            return
        key = generate_key(KeyType.EC_P256)
        try:
            renewed = await self._client().renew(key)
        except (ServerUnavailable, PermissionDenied) as err:
            log.warning("agent SVID renewal failed; will retry", extra={"error": str(err)})
            self._failover()
            return
        self._store_agent_svid(key, renewed)
        log.info("agent SVID renewed", extra={"spiffe_id": renewed.spiffe_id})

    # -- clients ------------------------------------------------------------------------------
    def _client(self) -> NodeClient:
        return self._clients[self._current]

    def _failover(self) -> None:
        self._current = (self._current + 1) % len(self._clients)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # -- sync ---------------------------------------------------------------------------------
    async def _sync_loop(self) -> None:
        assert self.cache is not None
        backoff = Backoff(self._rng)
        while not self._stop.is_set():
            client = self._client()
            try:
                async for update in client.sync(self.state.revision):
                    applied = self.state.apply(update)
                    backoff.reset()
                    if not applied.complete:
                        continue
                    if applied.bundles_changed:
                        if self.state.bundle is not None:
                            self._store_bundle(self.state.bundle)
                        self.cache.set_bundles(self.state.bundle, self.state.federated)
                        if self._tainted():
                            self.cache.forget_jwts()  # a JWT may carry a tainted kid
                            await self.rotate()
                    if applied.entries_changed or not self._scheduled_once:
                        log.info(
                            "entries synced",
                            extra={
                                "entries": len(self.state.entries),
                                "revision": self.state.revision,
                            },
                        )
                        self.cache.set_entries(self.state.view())
                        await self.rotate()
            except PermissionDenied as err:
                log.error(
                    "server refused this agent; serving from cache", extra={"error": str(err)}
                )
            except (ServerUnavailable, AttestationError) as err:
                log.warning(
                    "sync interrupted; retrying",
                    extra={"error": str(err), "server": client.address},
                )
                self._failover()
            await self._sleep(backoff.next())

    # -- rotation -----------------------------------------------------------------------------
    async def rotate(self) -> None:
        """One pass of the renewal planner and the signing it asks for."""
        assert self.cache is not None
        async with self._rotate_lock:
            self._scheduled_once = True
            now = datetime.now(UTC)
            held = self.cache.held()
            entries = self.cache.entries()
            wanted = [WantedEntry(e.id, e.revision) for e in entries.values()]
            if len(wanted) > self.config.svid_cache_max:
                log.error(
                    "more entries than svid_cache_max; the rest wait",
                    extra={"entries": len(wanted), "max": self.config.svid_cache_max},
                )
                wanted = wanted[: self.config.svid_cache_max]
            tainted = self._tainted()
            plan = plan_renewals(
                {k: self._held_svid(v) for k, v in held.items()},
                wanted,
                now,
                tainted_authorities=tainted,
            )
            for gone in plan.drop:
                self._renew_at.pop(gone, None)
            if plan.sign:
                await self._sign(plan.sign)
                # Plan again so the next run is timed by the SVIDs just received.
                held = self.cache.held()
                now = datetime.now(UTC)
                plan = plan_renewals(
                    {k: self._held_svid(v) for k, v in held.items()},
                    wanted,
                    now,
                    tainted_authorities=tainted,
                )
                if plan.sign:  # refused or failed: retry soon, not in a tight loop
                    plan = replace(plan, next_check=now + RETRY_AFTER_FAILURE)
            if self.state.synced_once:
                self.cache.mark_ready()
                self.ready.set()
            self._schedule(plan.next_check)

    def _tainted(self) -> frozenset[bytes]:
        bundle = self.state.bundle
        return bundle.tainted if bundle is not None else frozenset()

    def _held_svid(self, svid: HeldX509) -> HeldSvid:
        nb = datetime.fromtimestamp(svid.not_before, UTC)
        na = datetime.fromtimestamp(svid.not_after, UTC)
        at = self._renew_at.get(svid.entry_id) or self._schedule_renewal(svid, svid.not_before)
        return HeldSvid(svid.entry_id, svid.entry_revision, nb, na, at, svid.authority_key_id)

    def _schedule_renewal(self, svid: HeldX509, start: float) -> datetime:
        """Draw the SVID's renewal time once (jitter included) and remember it."""
        at = renew_at(
            datetime.fromtimestamp(start, UTC),
            datetime.fromtimestamp(svid.not_after, UTC),
            self._rng,
        )
        self._renew_at[svid.entry_id] = at
        return at

    async def _sign(self, entry_ids: Sequence[str]) -> None:
        assert self.cache is not None
        entries = self.cache.entries()
        for start in range(0, len(entry_ids), SIGN_BATCH):
            batch = [entries[e] for e in entry_ids[start : start + SIGN_BATCH] if e in entries]
            keys = {e.id: generate_key(WORKLOAD_KEY_TYPE) for e in batch}
            requests = [(e.id, csr_for(keys[e.id])) for e in batch]
            try:
                results = await self._client().sign_x509(requests)
            except (ServerUnavailable, PermissionDenied) as err:
                log.warning("signing failed; will retry", extra={"error": str(err)})
                self._failover()
                return
            fresh: list[HeldX509] = []
            for result in results:
                entry = entries.get(result.entry_id)
                if result.error or entry is None or not result.cert_chain:
                    log.warning(
                        "server refused an SVID",
                        extra={"entry_id": result.entry_id, "error": result.error},
                    )
                    continue
                der_key = keys[entry.id].private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                held = held_from_chain(entry, result.cert_chain, der_key)
                # Measured from arrival, not from not_before: the server backdates SVIDs for
                # clock skew, which would make a seconds-long SVID look half-spent at once.
                self._schedule_renewal(held, datetime.now(UTC).timestamp())
                fresh.append(held)
            self.cache.put_svids(fresh)
            log.info("SVIDs signed", extra={"count": len(fresh), "requested": len(batch)})

    def _schedule(self, when: datetime) -> None:
        if self._scheduler is None:
            return
        self._scheduler.add_job(
            self._scheduled_rotate, "date", run_date=when, id="rotate", replace_existing=True,
            misfire_grace_time=None, coalesce=True,
        )  # fmt: skip

    async def _scheduled_rotate(self) -> None:
        """``rotate`` as the scheduler runs it. A pass that shutdown cuts short (its server
        call cancelled as the clients close) ends quietly instead of being logged by the
        scheduler as a failed job with a traceback; at any other time a cancel propagates."""
        try:
            await self.rotate()
        except asyncio.CancelledError:
            if not self._stop.is_set():
                raise

    async def _sign_jwt(self, entry_id: str, audience: Sequence[str]) -> tuple[str, int]:
        return await self._client().sign_jwt(entry_id, audience)

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until ``stop()``; raises ``AgentError`` if the agent cannot get an identity."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        had_svid = self._load_agent_svid()
        self._load_trust()
        if not had_svid:
            await self._attest()
        assert self._agent_svid is not None
        td = self.config.trust_domain
        if SpiffeId(self._agent_svid.spiffe_id).trust_domain.name != td:
            raise AgentError(f"agent SVID {self._agent_svid.spiffe_id} is not in trust domain {td}")
        self.cache = IdentityCache(td, self._sign_jwt)
        if self._trust is not None:
            self.cache.set_bundles(
                BundleDoc(td, to_spiffe_json(self._trust), self._trust.sequence), {}
            )
        if self.config.persist_svid_cache:
            self._restore_cache()
        else:
            self._svid_cache_path.unlink(missing_ok=True)  # never leave keys behind when off
        attestor = build_attestor(self.config.workload_attestors.build())
        server = WorkloadApiServer(self.cache, attestor, self.config.socket)
        await server.start()
        self._scheduler = AsyncIOScheduler(timezone="UTC")
        self._scheduler.add_job(
            self._renew_agent_if_due, "interval", seconds=self.config.renew_check.total_seconds(),
            id="agent-renew", coalesce=True, max_instances=1,
        )  # fmt: skip
        if self.config.persist_svid_cache:
            self._scheduler.add_job(
                self._save_cache, "interval", seconds=CACHE_SAVE_INTERVAL.total_seconds(),
                id="save-cache", coalesce=True, max_instances=1,
            )  # fmt: skip
        self._scheduler.start()
        print(  # the demo and the tests wait for this line
            f"meshid agent ready: {self._agent_svid.spiffe_id} workload API {self.config.socket}",
            flush=True,
        )
        sync = asyncio.create_task(self._sync_loop(), name="agent-sync")
        try:
            await self._stop.wait()
        finally:
            sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sync
            self._scheduler.shutdown(wait=False)
            if self.config.persist_svid_cache:
                self._save_cache()
            await server.stop()
            await attestor.aclose()
            for client in self._clients:
                await client.close()

    def stop(self) -> None:
        self._stop.set()

    # -- optional disk cache --------------------------------------------------------------------
    def _restore_cache(self) -> None:
        assert self.cache is not None
        if not self._svid_cache_path.exists():
            return
        try:
            revision, entries, svids, bundle, federated = disk_cache.load(self._svid_cache_path)
        except AgentError as err:
            log.warning("ignoring the stored SVID cache", extra={"error": str(err)})
            return
        now = datetime.now(UTC).timestamp()
        self.state.revision, self.state.entries = revision, entries
        self.state.bundle, self.state.federated = bundle, federated
        self.state.synced_once = True
        self.cache.set_entries(entries)
        if bundle is not None:
            self.cache.set_bundles(bundle, federated)
        live = [s for s in svids.values() if s.not_after > now]
        for svid in live:
            self._schedule_renewal(svid, svid.not_before)
        self.cache.put_svids(live)
        self.cache.mark_ready()
        log.info("served from the stored SVID cache", extra={"entries": len(entries)})

    def _save_cache(self) -> None:
        if self.cache is None or not self.state.synced_once:
            return
        disk_cache.save(
            self._svid_cache_path,
            revision=self.state.revision,
            entries=dict(self.state.entries),
            svids=dict(self.cache.held()),
            bundle=self.state.bundle,
            federated=dict(self.state.federated),
        )


def _pop_sign(key: PrivateKey, challenge: bytes) -> bytes:
    """Answer an x509pop challenge: ECDSA/SHA-256, or RSA-PSS/SHA-256 for RSA node keys."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(challenge, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(
            challenge,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
            hashes.SHA256(),
        )
    raise AttestationError("x509pop node key must be ECDSA or RSA")
