"""The node API's operations: attestation, agent authentication, signing for agents, agent admin.

Owns the orchestration around the pure parts (``attestation`` decides what proves a node,
``authz`` what an agent may have): redeem a join token or verify an x509pop node certificate,
sign the agent SVID through ``CaService``, record the attested node and its audit events in one
transaction; authenticate an agent's calls (current authority, attested, not banned, current
SVID serial); sign X.509- and JWT-SVIDs only for entries the walk authorizes; ban and evict.

Synchronous (SQLAlchemy, signing): the gRPC shell runs these methods in worker threads. It must
not know about gRPC. Nothing is stored when an operation fails.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography import x509
from spiffe import SpiffeId

from ..audit import EventKind
from ..bundle import TrustBundle
from ..datastore import Tx
from ..datastore.entry_graph import children_of, max_revision
from ..datastore.nodes import (
    AttestedNode,
    delete_node,
    find_token,
    get_node,
    list_nodes,
    rotate_serial,
    save_node,
    set_banned,
    touch,
)
from ..entries import RegistrationEntry, parse_spiffe_id
from ..errors import Conflict, InvalidArgument, InvalidSvid, NotFound
from ..keys import PublicKey
from ..server_identity import PeerSvid, verify_peer_svid
from ..service import CaService, IssuedJwt, X509Request, token_hash
from ..x509svid import public_key_from_csr
from .attestation import (
    JOIN_TOKEN,
    X509POP,
    NodeCertificate,
    agent_id,
    is_agent_id,
    new_challenge,
    parse_node_chain,
    token_text,
    verify_challenge_response,
    verify_node_chain,
)
from .authz import Agent, Authorization, Denial, authorize
from .errors import Refused

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # X.509-SVIDs per BatchNewX509SVID call: the answer stays well under 4 MiB
LAST_SEEN_EVERY = timedelta(minutes=1)  # last_seen is refreshed at most this often per agent
AUTHORIZATION_CACHE = 256  # walks kept (per agent and entry revision) for signing calls
NOT_AUTHORIZED = "entry not authorized for this agent"


@dataclass(frozen=True)
class AgentSvid:
    """What attestation and renewal return to the agent."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first
    selectors: tuple[str, ...]
    bundle: TrustBundle


@dataclass(frozen=True)
class CallingAgent:
    """An authenticated agent: its verified SVID and its attested-node record."""

    svid: PeerSvid
    node: AttestedNode

    @property
    def spiffe_id(self) -> str:
        return self.node.spiffe_id


@dataclass(frozen=True)
class X509PopAttempt:
    """An x509pop attestation between the verified certificate and the challenge answer."""

    agent_id: SpiffeId
    node: NodeCertificate
    public_key: PublicKey
    challenge: bytes


@dataclass(frozen=True)
class X509Result:
    entry_id: str
    chain: tuple[x509.Certificate, ...] = ()
    error: str = ""


def _csr_key(csr: bytes, field: str) -> PublicKey:
    try:
        return public_key_from_csr(csr)
    except InvalidArgument as err:
        raise InvalidArgument(field, err.rule) from err


def agent_of(node: AttestedNode) -> Agent:
    return Agent(node.spiffe_id, frozenset(node.aliases), frozenset(node.selectors))


class NodeService:
    """Node attestation and the agent-facing operations of one server replica."""

    def __init__(self, ca: CaService, *, provisioning_cas: Sequence[x509.Certificate] = ()) -> None:
        self.ca = ca
        self.provisioning_cas = tuple(provisioning_cas)
        self._cache: OrderedDict[tuple[str, datetime, int], Authorization] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def server_id(self) -> str:
        return str(self.ca.server_spiffe_id)

    # -- attestation --------------------------------------------------------------------------
    def attest_join_token(self, payload: bytes, csr: bytes) -> AgentSvid:
        """Redeem a join token (single use) and issue the agent SVID."""
        secret = token_text(payload)
        public_key = _csr_key(csr, "params.csr")
        digest = token_hash(secret)
        now = self.ca.clock()
        with self.ca.store.read() as tx:
            token = find_token(tx, digest)
        if token is None or token.used_at is not None or token.expires_at <= now:
            state = "unknown" if token is None else "used" if token.used_at else "expired"
            raise Refused(
                "join token invalid, used or expired",
                f"join_token: token {token.id if token else '?'} is {state}",
            )
        sid = agent_id(self.ca.trust_domain, JOIN_TOKEN, token.id)
        [svid] = self.ca.sign_x509_svids([X509Request(sid, public_key)], actor=str(sid))
        with self.ca.store.write() as tx:
            redeemed = tx.redeem_token(digest, now)
            if redeemed is None:  # another agent redeemed it a moment ago
                raise Refused(
                    "join token invalid, used or expired",
                    f"join_token: token {token.id} was redeemed concurrently",
                )
            aliases = (redeemed.spiffe_id,) if redeemed.spiffe_id else ()
            node = AttestedNode(
                spiffe_id=str(sid),
                attestation_type=JOIN_TOKEN,
                selectors=(),
                aliases=aliases,
                serial=svid.serial,
                previous_serial=None,
                expires_at=svid.not_after,
                banned=False,
                created_at=now,
                attested_at=now,
                last_seen=now,
                sync_floor=max_revision(tx) + 1,
            )
            save_node(tx, node)
            tx.append_audit(
                kind=EventKind.TOKEN_USED,
                actor=str(sid),
                now=now,
                spiffe_id=redeemed.spiffe_id,
                details={"token_id": redeemed.id},
            )
            self._audit_attested(tx, node, now, reattested=False)
        self.ca.notify_changed()
        log.info("agent attested", extra={"agent_id": str(sid), "attestation": JOIN_TOKEN})
        return AgentSvid(sid, svid.chain, (), self.ca.bundle())

    def begin_x509pop(self, payload: bytes, csr: bytes) -> X509PopAttempt:
        """Verify the node certificate; the caller sends the returned challenge."""
        public_key = _csr_key(csr, "params.csr")
        chain = parse_node_chain(payload)
        node_cert = verify_node_chain(chain, self.provisioning_cas, self.ca.clock())
        sid = agent_id(self.ca.trust_domain, X509POP, node_cert.fingerprint)
        with self.ca.store.read() as tx:
            existing = get_node(tx, str(sid))
        if existing is not None and existing.banned:
            raise Refused("agent is banned", f"x509pop: {sid} is banned")
        return X509PopAttempt(sid, node_cert, public_key, new_challenge())

    def finish_x509pop(self, attempt: X509PopAttempt, response: bytes) -> AgentSvid:
        """Check the node's signature over the challenge and issue the agent SVID."""
        verify_challenge_response(attempt.node, attempt.challenge, response)
        sid = attempt.agent_id
        [svid] = self.ca.sign_x509_svids([X509Request(sid, attempt.public_key)], actor=str(sid))
        selectors = attempt.node.selectors()
        now = self.ca.clock()
        with self.ca.store.write() as tx:
            existing = get_node(tx, str(sid), lock=True)
            if existing is not None and existing.banned:
                raise Refused("agent is banned", f"x509pop: {sid} is banned")
            unchanged = existing is not None and existing.selectors == selectors
            node = AttestedNode(
                spiffe_id=str(sid),
                attestation_type=X509POP,
                selectors=selectors,
                aliases=(),
                serial=svid.serial,
                previous_serial=None,
                expires_at=svid.not_after,
                banned=False,
                created_at=existing.created_at if existing else now,
                attested_at=now,
                last_seen=now,
                # Same node selectors: a resuming agent's entries are still right.
                sync_floor=existing.sync_floor if existing and unchanged else max_revision(tx) + 1,
            )
            save_node(tx, node)
            self._audit_attested(tx, node, now, reattested=existing is not None)
        self.ca.notify_changed()
        log.info("agent attested", extra={"agent_id": str(sid), "attestation": X509POP})
        return AgentSvid(sid, svid.chain, selectors, self.ca.bundle())

    def _audit_attested(
        self, tx: Tx, node: AttestedNode, now: datetime, *, reattested: bool
    ) -> None:
        tx.append_audit(
            kind=EventKind.AGENT_ATTESTED,
            actor=node.spiffe_id,
            now=now,
            spiffe_id=node.spiffe_id,
            details={
                "attestation_type": node.attestation_type,
                "serial": f"{node.serial:#x}",
                "selectors": list(node.selectors),
                "aliases": list(node.aliases),
                "reattested": reattested,
            },
        )

    # -- authentication -----------------------------------------------------------------------
    def authenticate(self, leaf_der: bytes | None) -> CallingAgent:
        """The agent behind a TLS client certificate, or ``Refused``."""
        try:
            svid = verify_peer_svid(self.ca, leaf_der)
        except InvalidSvid as err:
            raise Refused("agent SVID not accepted", str(err)) from err
        sid = str(svid.spiffe_id)
        if not is_agent_id(svid.spiffe_id, self.ca.trust_domain):
            raise Refused("caller is not an agent", f"{sid} is not an agent ID")
        with self.ca.store.read() as tx:
            node = get_node(tx, sid)
        self.check_node(node, sid, svid.certificate.serial_number)
        assert node is not None
        now = self.ca.clock()
        if now - node.last_seen >= LAST_SEEN_EVERY:
            with self.ca.store.write() as tx:
                touch(tx, sid, now)
        return CallingAgent(svid, node)

    @staticmethod
    def check_node(node: AttestedNode | None, sid: str, serial: int) -> None:
        if node is None:
            raise Refused("agent is not attested", f"{sid} has no attested-node record (evicted?)")
        if node.banned:
            raise Refused("agent is banned", f"{sid} is banned")
        if not node.accepts_serial(serial):
            raise Refused(
                "agent SVID superseded",
                f"{sid} presented serial {serial:#x}; current is {node.serial:#x}",
            )

    # -- renewal ------------------------------------------------------------------------------
    def renew(self, caller: CallingAgent, csr: bytes) -> AgentSvid:
        public_key = _csr_key(csr, "csr")
        sid = SpiffeId(caller.spiffe_id)
        [svid] = self.ca.sign_x509_svids([X509Request(sid, public_key)], actor=str(sid))
        now = self.ca.clock()
        with self.ca.store.write() as tx:
            node = get_node(tx, str(sid), lock=True)
            self.check_node(node, str(sid), caller.svid.certificate.serial_number)
            assert node is not None
            rotate_serial(tx, str(sid), svid.serial, svid.not_after, now)
            tx.append_audit(
                kind=EventKind.AGENT_RENEWED,
                actor=str(sid),
                now=now,
                spiffe_id=str(sid),
                details={"serial": f"{svid.serial:#x}", "previous_serial": f"{node.serial:#x}"},
            )
        return AgentSvid(sid, svid.chain, node.selectors, self.ca.bundle())

    # -- authorization ------------------------------------------------------------------------
    def authorize(self, tx: Tx, node: AttestedNode) -> Authorization:
        """The walk over the datastore, in the caller's transaction."""
        return authorize(agent_of(node), self.server_id, lambda ids: children_of(tx, ids))

    def authorization(self, node: AttestedNode, *, fresh: bool = False) -> Authorization:
        """The agent's authorization, cached per entry revision for signing calls."""
        with self.ca.store.read() as tx:
            key = (node.spiffe_id, node.attested_at, max_revision(tx))
            if not fresh:
                with self._cache_lock:
                    cached = self._cache.get(key)
                if cached is not None:
                    return cached
            result = self.authorize(tx, node)
        with self._cache_lock:
            self._cache[key] = result
            self._cache.move_to_end(key)
            while len(self._cache) > AUTHORIZATION_CACHE:
                self._cache.popitem(last=False)
        return result

    def _grant(
        self, caller: CallingAgent, entry_id: str, authorization: Authorization | None = None
    ) -> RegistrationEntry:
        """The entry, if ``caller`` may have it signed; ``authorization`` lets a batch compute
        the agent's authorization once instead of per request."""
        verdict = (authorization or self.authorization(caller.node)).check(entry_id)
        if isinstance(verdict, Denial):
            # A denial is rare: check again against the newest entries before answering.
            verdict = self.authorization(caller.node, fresh=True).check(entry_id)
        if isinstance(verdict, Denial):
            log.info(
                "signing refused",
                extra={"agent_id": caller.spiffe_id, "entry_id": entry_id, "rule": verdict.reason},
            )
            raise Refused(NOT_AUTHORIZED, f"{caller.spiffe_id}: {verdict.reason}: {entry_id!r}")
        entry = verdict.entry
        if entry.expires_at is not None and entry.expires_at <= self.ca.clock():
            raise Refused("entry expired", f"entry {entry_id} expired at {entry.expires_at}")
        return entry

    # -- signing for agents -------------------------------------------------------------------
    def sign_x509(
        self, caller: CallingAgent, requests: Sequence[tuple[str, bytes]]
    ) -> list[X509Result]:
        """One result per request, in order; refusals are per request, not for the batch."""
        if len(requests) > MAX_BATCH:
            raise InvalidArgument("requests", f"at most {MAX_BATCH} per call", len(requests))
        results: list[X509Result] = []
        pending: list[tuple[int, X509Request]] = []
        authorization = self.authorization(caller.node)  # once per batch, not per request
        for index, (entry_id, csr) in enumerate(requests):
            try:
                entry = self._grant(caller, entry_id, authorization)
                key = _csr_key(csr, "csr")
            except Refused as err:
                results.append(X509Result(entry_id, error=err.public))
                continue
            except InvalidArgument as err:
                results.append(X509Result(entry_id, error=str(err)))
                continue
            results.append(X509Result(entry_id))
            pending.append(
                (index, X509Request(entry.spiffe_id, key, entry.x509_svid_ttl, entry.dns_names))
            )
        if pending:
            issued = self.ca.sign_x509_svids([r for _, r in pending], actor=caller.spiffe_id)
            for (index, _), svid in zip(pending, issued, strict=True):
                results[index] = replace(results[index], chain=svid.chain)
        return results

    def mint_jwt(self, caller: CallingAgent, entry_id: str, audience: Sequence[str]) -> IssuedJwt:
        if not audience:
            raise InvalidArgument("audience", "at least one audience is required")
        entry = self._grant(caller, entry_id)
        return self.ca.mint_jwt_svid(
            str(entry.spiffe_id), audience, caller.spiffe_id, ttl=entry.jwt_svid_ttl
        )

    # -- admin --------------------------------------------------------------------------------
    def list_agents(self) -> list[AttestedNode]:
        with self.ca.store.read() as tx:
            return list_nodes(tx)

    def get_agent(self, spiffe_id: str) -> AttestedNode:
        sid = parse_spiffe_id(spiffe_id, "spiffe_id")
        with self.ca.store.read() as tx:
            node = get_node(tx, str(sid))
        if node is None:
            raise NotFound(f"no attested agent {spiffe_id!r}")
        return node

    def ban(self, spiffe_id: str, actor: str) -> AttestedNode:
        """Keep the record, marked banned: the agent can neither renew, sync nor sign."""
        sid = str(parse_spiffe_id(spiffe_id, "spiffe_id"))
        now = self.ca.clock()
        with self.ca.store.write() as tx:
            node = get_node(tx, sid, lock=True)
            if node is None:
                raise NotFound(f"no attested agent {spiffe_id!r}")
            if node.banned:
                raise Conflict(f"agent {sid} is already banned")
            set_banned(tx, sid, True)
            tx.append_audit(
                kind=EventKind.AGENT_BANNED,
                actor=actor,
                now=now,
                spiffe_id=sid,
                details={"serial": f"{node.serial:#x}"},
            )
        self.ca.notify_changed()
        log.info("agent banned", extra={"agent_id": sid, "actor": actor})
        return replace(node, banned=True)

    def evict(self, spiffe_id: str, actor: str) -> AttestedNode:
        """Delete the record: the agent must attest again (a banned node then may, too)."""
        sid = str(parse_spiffe_id(spiffe_id, "spiffe_id"))
        now = self.ca.clock()
        with self.ca.store.write() as tx:
            node = get_node(tx, sid, lock=True)
            if node is None:
                raise NotFound(f"no attested agent {spiffe_id!r}")
            delete_node(tx, sid)
            tx.append_audit(
                kind=EventKind.AGENT_EVICTED,
                actor=actor,
                now=now,
                spiffe_id=sid,
                details={"serial": f"{node.serial:#x}", "banned": node.banned},
            )
        self.ca.notify_changed()
        log.info("agent evicted", extra={"agent_id": sid, "actor": actor})
        return node
