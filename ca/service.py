"""The CA service: the I/O shell around the pure core.

Owns what the server does on behalf of a caller: every operation validates its input with the
pure modules, then changes the datastore and appends the audit event in one transaction. It keeps
the active signing authorities in memory and swaps them only after a rotation has committed.
Callers (admin API, node API, rotator) pass the actor: the admin socket caller's uid or a
verified SPIFFE ID.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Concatenate, ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain

from . import authority as plan_mod
from .audit import ChainVerdict, EventKind
from .audit import verify_chain as verify_audit_chain
from .authority import Activate, AuthorityKind, Expire, Prepare, Slot, Status
from .bundle import TrustBundle, from_pem, from_spiffe_json, to_spiffe_json
from .datastore import AuditRecord, AuthorityRecord, Datastore, FederatedBundleRecord, Tx
from .entries import (
    EntrySpec,
    RegistrationEntry,
    parse_spiffe_id,
    parse_trust_domain,
    validate_entry,
)
from .errors import AuthorityUnavailable, CaError, Conflict, InvalidArgument, NotFound
from .federation import Fetcher, check_endpoint_url, fetch_bundle
from .jwtsvid import new_kid, sign_jwt_svid
from .keys import KeyManager, KeyType, PrivateKey, PublicKey, key_type_of
from .validation import check_signed_x509_svid, validate_signing_certificate, verify_chain
from .x509svid import (
    SigningAuthority,
    build_intermediate_certificate,
    build_root_certificate,
    random_serial,
    sign_x509_svid,
)

log = logging.getLogger(__name__)

DEFAULT_X509_SVID_TTL = timedelta(hours=1)  # SPIRE's default
DEFAULT_JWT_SVID_TTL = timedelta(minutes=5)  # SPIRE's default; JWTs cannot be revoked
DEFAULT_JOIN_TOKEN_TTL = timedelta(seconds=600)  # SPIRE's default
DEFAULT_REFRESH_HINT = timedelta(minutes=5)  # federated peers poll this often
MAX_JOIN_TOKEN_TTL = timedelta(days=7)  # a longer-lived token is a standing credential
MAX_AUDIENCES = 16
CLOCK_SKEW = timedelta(seconds=10)  # SVIDs start this early so peers with slow clocks accept them
AGENT_PATH_PREFIX = "/meshid/agent/"
SERVER_PATH = "/meshid/server"

Clock = Callable[[], datetime]
_P = ParamSpec("_P")
_R = TypeVar("_R")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class UpstreamCA:
    """An upstream CA on disk: the server's authorities become its intermediates."""

    certificates: tuple[x509.Certificate, ...]  # signing cert first, self-signed root last
    key: PrivateKey

    @property
    def root(self) -> x509.Certificate:
        return self.certificates[-1]


@dataclass(frozen=True)
class CaSettings:
    trust_domain: TrustDomain
    server_id: str
    key_type: KeyType = KeyType.EC_P256
    jwt_key_type: KeyType = KeyType.EC_P256
    ca_ttl: timedelta = plan_mod.DEFAULT_CA_TTL
    x509_svid_ttl: timedelta = DEFAULT_X509_SVID_TTL
    jwt_svid_ttl: timedelta = DEFAULT_JWT_SVID_TTL
    refresh_hint: timedelta = DEFAULT_REFRESH_HINT
    upstream: UpstreamCA | None = None


@dataclass(frozen=True)
class X509Request:
    """One X.509-SVID to sign: the subject key comes from a CSR or a public key."""

    spiffe_id: SpiffeId
    public_key: PublicKey
    ttl: timedelta | None = None
    dns_names: Sequence[str] = ()


@dataclass(frozen=True)
class IssuedX509:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first
    authority_id: str

    @property
    def serial(self) -> int:
        return self.chain[0].serial_number

    @property
    def not_after(self) -> datetime:
        return self.chain[0].not_valid_after_utc


@dataclass(frozen=True)
class IssuedJwt:
    spiffe_id: SpiffeId
    token: str
    expires_at: datetime
    authority_id: str


@dataclass(frozen=True)
class IssuedToken:
    id: str
    token: str
    agent_id: SpiffeId
    alias_id: SpiffeId | None
    expires_at: datetime


@dataclass
class _Signers:
    x509_signer: tuple[str, SigningAuthority] | None = None
    jwt_signer: tuple[str, str, PrivateKey] | None = None  # (authority id, kid, key)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_chain(data: bytes) -> tuple[x509.Certificate, ...]:
    """The certificates an intermediate authority appends after the leaf (stored as PEM)."""
    return tuple(x509.load_pem_x509_certificates(data)) if data else ()


def _notifies(
    method: Callable[Concatenate[CaService, _P], _R],
) -> Callable[Concatenate[CaService, _P], _R]:
    """Run the change listeners once ``method`` has committed (not when it raised)."""

    @functools.wraps(method)
    def wrapper(self: CaService, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        result = method(self, *args, **kwargs)
        self.notify_changed()
        return result

    return wrapper


class CaService:
    """The certificate authority of one trust domain, as one server replica runs it."""

    def __init__(
        self,
        settings: CaSettings,
        store: Datastore,
        keys: KeyManager,
        *,
        clock: Clock = utc_now,
        fetcher: Fetcher = fetch_bundle,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.store = store
        self.keys = keys
        self.clock = clock
        self._signers = _Signers()
        self._rotate_lock = threading.Lock()
        self._change_listeners: list[Callable[[], None]] = []

    @property
    def trust_domain(self) -> TrustDomain:
        return self.settings.trust_domain

    @property
    def server_spiffe_id(self) -> SpiffeId:
        return SpiffeId(f"{self.trust_domain.as_spiffe_id()}{SERVER_PATH}")

    # -- change notification ----------------------------------------------------------------
    def add_change_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after entries, authorities or bundles changed (from the thread that
        committed the change; it must return at once). Returns the function removing it.

        The node API wakes its entry-sync streams with it; other replicas' changes reach them
        by polling the database instead.
        """
        self._change_listeners.append(listener)
        return lambda: self._change_listeners.remove(listener)

    def notify_changed(self) -> None:
        for listener in tuple(self._change_listeners):
            listener()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, actor: str = "server") -> None:
        """Migrate, make sure an authority is active, record the start."""
        self.store.migrate()
        self.store.start_checkpointer()
        self.rotate(actor=actor)
        with self.store.write() as tx:
            tx.append_audit(
                kind=EventKind.SERVER_STARTED,
                actor=actor,
                now=self.clock(),
                details={"server_id": self.settings.server_id, "backend": self.store.backend},
            )

    # -- authorities ------------------------------------------------------------------------
    @_notifies
    def rotate(self, actor: str = "rotator") -> list[plan_mod.Action]:
        """Run the planner once and act on its decisions; returns what was done."""
        with self._rotate_lock:
            now = self.clock()
            with self.store.write() as tx:
                own = tx.list_authorities(server_id=self.settings.server_id)
                slots = [
                    Slot(a.id, AuthorityKind(a.kind), Status(a.status), a.not_before, a.not_after)
                    for a in own
                ]
                actions = plan_mod.plan(slots, now)
                prepared: dict[AuthorityKind, str] = {}
                for action in actions:
                    match action:
                        case Prepare(kind=kind):
                            prepared[kind] = self._prepare(tx, kind, now, actor)
                        case Activate(id=aid, kind=kind):
                            target = aid or prepared[kind]
                            self._activate(tx, target, kind, now, actor)
                        case Expire(id=aid, kind=kind):
                            tx.update_authority(aid, status=Status.EXPIRED)
                            tx.append_audit(
                                kind=EventKind.AUTHORITY_EXPIRED,
                                actor=actor,
                                now=now,
                                details={"authority_id": aid, "kind": kind},
                            )
                if actions:
                    self._bundle_changed(tx, now, actor, reason="rotation")
            self._load_signers()
        for action in actions:
            log.info(
                "authority rotation step",
                extra={
                    "step": type(action).__name__.lower(),
                    "kind": action.kind.value,
                    "authority_id": getattr(action, "id", None) or "new",
                },
            )
        return actions

    @_notifies
    def prepare(self, kind: AuthorityKind, actor: str) -> AuthorityRecord:
        """Operator-requested preparation of the next authority."""
        with self._rotate_lock:
            now = self.clock()
            with self.store.write() as tx:
                own = tx.list_authorities(kind=kind, server_id=self.settings.server_id)
                if any(a.status == Status.PREPARED for a in own):
                    raise Conflict(f"a prepared {kind} authority already exists; activate it first")
                aid = self._prepare(tx, kind, now, actor)
                self._bundle_changed(tx, now, actor, reason="authority prepared")
                record = tx.get_authority(aid)
            self._load_signers()
            return record

    @_notifies
    def activate(self, kind: AuthorityKind, authority_id: str, actor: str) -> AuthorityRecord:
        with self._rotate_lock:
            now = self.clock()
            with self.store.write() as tx:
                record = tx.get_authority(authority_id, lock=True)
                if record.kind != kind or record.server_id != self.settings.server_id:
                    raise NotFound(f"no {kind} authority {authority_id!r} on this server")
                if record.status != Status.PREPARED:
                    raise Conflict(
                        f"authority {authority_id} is {record.status}; only a prepared one can be "
                        "activated"
                    )
                self._activate(tx, authority_id, kind, now, actor)
                self._bundle_changed(tx, now, actor, reason="authority activated")
                record = tx.get_authority(authority_id)
            self._load_signers()
            return record

    @_notifies
    def taint(self, kind: AuthorityKind, authority_id: str, actor: str) -> AuthorityRecord:
        """Mark an old authority so every SVID it signed is replaced now (SPIRE semantics)."""
        now = self.clock()
        with self.store.write() as tx:
            record = tx.get_authority(authority_id, lock=True)
            if record.kind != kind:
                raise NotFound(f"no {kind} authority {authority_id!r}")
            if record.status != Status.OLD:
                raise Conflict(
                    f"authority {authority_id} is {record.status}; only an old authority can be "
                    "tainted (prepare and activate a new one first)"
                )
            if record.tainted:
                raise Conflict(f"authority {authority_id} is already tainted")
            tx.update_authority(authority_id, tainted=True)
            tx.append_audit(
                kind=EventKind.AUTHORITY_TAINTED,
                actor=actor,
                now=now,
                details={"authority_id": authority_id, "kind": kind},
            )
            self._bundle_changed(tx, now, actor, reason="authority tainted")
            return tx.get_authority(authority_id)

    @_notifies
    def revoke(
        self, kind: AuthorityKind, authority_id: str, actor: str, *, force: bool = False
    ) -> AuthorityRecord:
        """Remove a tainted authority from the bundle once nothing valid depends on it."""
        now = self.clock()
        with self.store.write() as tx:
            record = tx.get_authority(authority_id, lock=True)
            if record.kind != kind:
                raise NotFound(f"no {kind} authority {authority_id!r}")
            if record.status == Status.REVOKED:
                raise Conflict(f"authority {authority_id} is already revoked")
            if record.status in (Status.ACTIVE, Status.PREPARED) or not record.tainted:
                raise Conflict(
                    f"authority {authority_id} is {record.status}"
                    f"{'' if record.tainted else ', not tainted'}; only a tainted old authority "
                    "can be revoked"
                )
            latest = tx.latest_svid_not_after(authority_id)
            if latest is not None and latest > now and not force:
                raise Conflict(
                    f"SVIDs signed by authority {authority_id} stay valid until "
                    f"{latest.isoformat()}; wait for them to be replaced or pass --force"
                )
            tx.update_authority(authority_id, status=Status.REVOKED, revoked_at=now)
            tx.append_audit(
                kind=EventKind.AUTHORITY_REVOKED,
                actor=actor,
                now=now,
                details={"authority_id": authority_id, "kind": kind, "forced": force},
            )
            self._bundle_changed(tx, now, actor, reason="authority revoked")
            return tx.get_authority(authority_id)

    def tainted_key_ids(self) -> tuple[bytes, ...]:
        """Key ids of tainted authorities still in the bundle: X.509 subject key identifiers
        and JWT ``kid``s. Agents replace what those signed at once."""
        ids: list[bytes] = []
        with self.store.read() as tx:
            records = tx.list_authorities()
        for a in records:
            if not a.tainted or a.status != Status.OLD:
                continue
            if a.kind == AuthorityKind.X509 and a.certificate is not None:
                cert = x509.load_der_x509_certificate(a.certificate)
                ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
                ids.append(ski.value.digest)
            elif a.kid is not None:
                ids.append(a.kid.encode())
        return tuple(ids)

    def list_authorities(self, kind: AuthorityKind | None = None) -> list[AuthorityRecord]:
        with self.store.read() as tx:
            return tx.list_authorities(kind=kind, include_revoked=True)

    def _prepare(self, tx: Tx, kind: AuthorityKind, now: datetime, actor: str) -> str:
        aid = f"{kind}-{uuid.uuid4().hex[:16]}"
        key_type = (
            self.settings.key_type if kind == AuthorityKind.X509 else self.settings.jwt_key_type
        )
        key = self.keys.generate(aid, key_type)
        not_after = now + self.settings.ca_ttl
        certificate: bytes | None = None
        chain = b""
        kid: str | None = None
        if kind == AuthorityKind.X509:
            upstream = self.settings.upstream
            if upstream is None:
                cert = build_root_certificate(
                    key,
                    self.trust_domain,
                    not_before=now,
                    not_after=not_after,
                    serial=random_serial(),
                )
            else:
                cert = build_intermediate_certificate(
                    key.public_key(),
                    self.trust_domain,
                    upstream_certificate=upstream.certificates[0],
                    upstream_key=upstream.key,
                    not_before=now,
                    not_after=not_after,
                    serial=random_serial(),
                )
                upstream_intermediates = upstream.certificates[:-1]
                chain = b"".join(
                    c.public_bytes(serialization.Encoding.PEM)
                    for c in (cert, *upstream_intermediates)
                )
            not_after = min(not_after, cert.not_valid_after_utc)
            certificate = _der(cert)
        else:
            kid = new_kid()
        tx.insert_authority(
            AuthorityRecord(
                id=aid,
                kind=kind,
                server_id=self.settings.server_id,
                status=Status.PREPARED,
                key_id=aid,
                key_type=key_type_of(key),
                certificate=certificate,
                chain=chain,
                public_key=_spki(key.public_key()),
                kid=kid,
                not_before=now,
                not_after=not_after,
                tainted=False,
                created_at=now,
                activated_at=None,
                revoked_at=None,
            )
        )
        tx.append_audit(
            kind=EventKind.AUTHORITY_PREPARED,
            actor=actor,
            now=now,
            details={
                "authority_id": aid,
                "kind": kind,
                "key_type": key_type_of(key),
                "not_after": not_after.isoformat(),
                **({"kid": kid} if kid else {}),
            },
        )
        return aid

    def _activate(
        self, tx: Tx, authority_id: str, kind: AuthorityKind, now: datetime, actor: str
    ) -> None:
        for a in tx.list_authorities(kind=kind, server_id=self.settings.server_id):
            if a.status == Status.ACTIVE:
                retired = Status.EXPIRED if a.not_after <= now else Status.OLD
                tx.update_authority(a.id, status=retired)
        tx.update_authority(authority_id, status=Status.ACTIVE, activated_at=now)
        tx.append_audit(
            kind=EventKind.AUTHORITY_ACTIVATED,
            actor=actor,
            now=now,
            details={"authority_id": authority_id, "kind": kind},
        )

    def _bundle_changed(self, tx: Tx, now: datetime, actor: str, *, reason: str) -> None:
        sequence = tx.bump_counter("bundle_sequence")
        tx.append_audit(
            kind=EventKind.BUNDLE_CHANGED,
            actor=actor,
            now=now,
            details={"sequence": sequence, "reason": reason},
        )

    def _load_signers(self) -> None:
        """Swap in the active authorities after a committed change."""
        signers = _Signers()
        with self.store.read() as tx:
            own = tx.list_authorities(server_id=self.settings.server_id)
        for a in own:
            if a.status != Status.ACTIVE:
                continue
            key = self.keys.load(a.key_id)
            if a.kind == AuthorityKind.X509 and a.certificate is not None:
                cert = x509.load_der_x509_certificate(a.certificate)
                signers.x509_signer = (a.id, SigningAuthority(cert, key, _load_chain(a.chain)))
            elif a.kind == AuthorityKind.JWT and a.kid is not None:
                signers.jwt_signer = (a.id, a.kid, key)
        if signers.x509_signer is not None:
            # Once per authority rather than per SVID: its path must reach our own bundle.
            _, authority = signers.x509_signer
            # The SVID self-check relies on this: the authority's own certificates obey
            # X509-SVID §4 (checked here, once, rather than with every SVID).
            for cert in authority.chain or (authority.certificate,):
                validate_signing_certificate(cert, self.trust_domain)
            verify_chain(
                authority.chain or (authority.certificate,),
                self.bundle().x509_authorities,
                now=self.clock(),
            )
        self._signers = signers

    # -- bundle -----------------------------------------------------------------------------
    def bundle(self) -> TrustBundle:
        """This trust domain's bundle: every authority of every replica not revoked/expired."""
        now = self.clock()
        with self.store.read() as tx:
            authorities = tx.list_authorities()
            sequence = tx.counter("bundle_sequence")
        roots: list[x509.Certificate] = []
        if self.settings.upstream is not None:
            roots.append(self.settings.upstream.root)
        jwt_keys: dict[str, PublicKey] = {}
        for a in authorities:
            if a.status not in (Status.PREPARED, Status.ACTIVE, Status.OLD) or a.not_after <= now:
                continue
            if a.kind == AuthorityKind.X509 and a.certificate is not None and not a.chain:
                roots.append(x509.load_der_x509_certificate(a.certificate))
            elif a.kind == AuthorityKind.JWT and a.kid is not None:
                pub = serialization.load_der_public_key(a.public_key)
                jwt_keys[a.kid] = pub  # type: ignore[assignment]
        return TrustBundle(
            trust_domain=self.trust_domain,
            x509_authorities=tuple(roots),
            jwt_authorities=MappingProxyType(jwt_keys),
            sequence=sequence,
            refresh_hint=self.settings.refresh_hint,
        )

    @_notifies
    def set_federated_bundle(
        self,
        trust_domain: str,
        data: bytes,
        actor: str,
        *,
        fmt: str = "spiffe",
        endpoint_url: str | None = None,
        endpoint_spiffe_id: str | None = None,
    ) -> TrustBundle:
        td = parse_trust_domain(trust_domain, "trust_domain")
        if td == self.trust_domain:
            raise InvalidArgument(
                "trust_domain", "must not be this server's own trust domain (use rotation)"
            )
        if fmt == "spiffe":
            parsed = from_spiffe_json(td, data)
        elif fmt == "pem":
            parsed = from_pem(td, data)
        else:
            raise InvalidArgument("format", "must be spiffe or pem", fmt)
        if endpoint_url is not None:
            check_endpoint_url(endpoint_url)
        if endpoint_spiffe_id is not None:
            endpoint_id = parse_spiffe_id(endpoint_spiffe_id, "endpoint_spiffe_id")
            if endpoint_id.trust_domain != td:
                raise InvalidArgument(
                    "endpoint_spiffe_id", f"must be in the federated trust domain {td}"
                )
        now = self.clock()
        with self.store.write() as tx:
            tx.set_federated_bundle(
                FederatedBundleRecord(
                    trust_domain=td.name,
                    jwks=to_spiffe_json(parsed).decode(),
                    sequence=parsed.sequence,
                    endpoint_url=endpoint_url,
                    endpoint_spiffe_id=endpoint_spiffe_id,
                    refreshed_at=now if endpoint_url else None,
                    updated_at=now,
                )
            )
            tx.append_audit(
                kind=EventKind.FEDERATED_BUNDLE_SET,
                actor=actor,
                now=now,
                details={
                    "trust_domain": td.name,
                    "x509_authorities": len(parsed.x509_authorities),
                    "jwt_authorities": len(parsed.jwt_authorities),
                    "sequence": parsed.sequence,
                },
            )
        return parsed

    @_notifies
    def refresh_federated_bundle(self, trust_domain: str, actor: str) -> bool:
        """Fetch ``trust_domain``'s bundle from its endpoint; store and audit it if it changed."""
        td = parse_trust_domain(trust_domain, "trust_domain")
        with self.store.read() as tx:
            record = tx.get_federated_bundle(td.name)
        if not record.endpoint_url:
            raise InvalidArgument("trust_domain", f"{td.name} has no bundle endpoint configured")
        current = from_spiffe_json(td, record.jwks.encode())
        expected = SpiffeId(record.endpoint_spiffe_id) if record.endpoint_spiffe_id else None
        data = self.fetcher(record.endpoint_url, expected, current.x509_authorities)
        fetched = from_spiffe_json(td, data)
        now = self.clock()
        changed = to_spiffe_json(fetched) != to_spiffe_json(current)
        with self.store.write() as tx:
            tx.set_federated_bundle(
                replace(
                    record,
                    jwks=to_spiffe_json(fetched).decode() if changed else record.jwks,
                    sequence=fetched.sequence,
                    refreshed_at=now,
                    updated_at=now if changed else record.updated_at,
                )
            )
            if changed:
                tx.append_audit(
                    kind=EventKind.FEDERATED_BUNDLE_SET,
                    actor=actor,
                    now=now,
                    details={
                        "trust_domain": td.name,
                        "source": record.endpoint_url,
                        "x509_authorities": len(fetched.x509_authorities),
                        "jwt_authorities": len(fetched.jwt_authorities),
                        "sequence": fetched.sequence,
                    },
                )
        return changed

    def refresh_due_federated_bundles(self, actor: str = "federation") -> None:
        """The refresh job: every endpoint-backed bundle whose refresh hint has passed."""
        now = self.clock()
        with self.store.read() as tx:
            records = tx.list_federated_bundles()
        for record in records:
            if not record.endpoint_url:
                continue
            hint = from_spiffe_json(
                TrustDomain(record.trust_domain), record.jwks.encode()
            ).refresh_hint
            if record.refreshed_at is not None and now < record.refreshed_at + hint:
                continue
            try:
                self.refresh_federated_bundle(record.trust_domain, actor)
            except CaError as err:
                # Keep the last good bundle; the operator sees why in the log and retries later.
                log.warning(
                    "federated bundle refresh failed",
                    extra={"trust_domain": record.trust_domain, "error": str(err)},
                )

    def federated_bundles(self) -> list[TrustBundle]:
        with self.store.read() as tx:
            records = tx.list_federated_bundles()
        return [from_spiffe_json(TrustDomain(r.trust_domain), r.jwks.encode()) for r in records]

    def federated_bundle(self, trust_domain: str) -> TrustBundle:
        td = parse_trust_domain(trust_domain, "trust_domain")
        with self.store.read() as tx:
            record = tx.get_federated_bundle(td.name)
        return from_spiffe_json(td, record.jwks.encode())

    @_notifies
    def delete_federated_bundle(self, trust_domain: str, actor: str) -> None:
        td = parse_trust_domain(trust_domain, "trust_domain")
        now = self.clock()
        with self.store.write() as tx:
            tx.delete_federated_bundle(td.name)
            tx.append_audit(
                kind=EventKind.FEDERATED_BUNDLE_DELETED,
                actor=actor,
                now=now,
                details={"trust_domain": td.name},
            )

    # -- entries ----------------------------------------------------------------------------
    @_notifies
    def create_entry(self, spec: EntrySpec, actor: str) -> RegistrationEntry:
        now = self.clock()
        entry = validate_entry(spec, self.trust_domain, now=now)
        with self.store.write() as tx:
            created = tx.create_entry(entry, now)
            tx.append_audit(
                kind=EventKind.ENTRY_CREATED,
                actor=actor,
                now=now,
                spiffe_id=str(created.spiffe_id),
                details=_entry_details(created),
            )
        return created

    @_notifies
    def update_entry(self, entry_id: str, spec: EntrySpec, actor: str) -> RegistrationEntry:
        now = self.clock()
        entry = replace(validate_entry(spec, self.trust_domain, now=now), id=entry_id)
        with self.store.write() as tx:
            updated = tx.update_entry(entry, now)
            tx.append_audit(
                kind=EventKind.ENTRY_UPDATED,
                actor=actor,
                now=now,
                spiffe_id=str(updated.spiffe_id),
                details=_entry_details(updated),
            )
        return updated

    @_notifies
    def delete_entry(self, entry_id: str, actor: str) -> RegistrationEntry:
        now = self.clock()
        with self.store.write() as tx:
            deleted = tx.delete_entry(entry_id, now)
            tx.append_audit(
                kind=EventKind.ENTRY_DELETED,
                actor=actor,
                now=now,
                spiffe_id=str(deleted.spiffe_id),
                details={"id": deleted.id, "revision": deleted.revision},
            )
        return deleted

    def is_admin(self, spiffe_id: SpiffeId) -> bool:
        """Whether an entry marked ``admin`` carries this SPIFFE ID (TCP admin API access)."""
        with self.store.read() as tx:
            return any(e.admin for e in tx.list_entries(spiffe_id=str(spiffe_id)))

    def get_entry(self, entry_id: str) -> RegistrationEntry:
        with self.store.read() as tx:
            return tx.get_entry(entry_id)

    def list_entries(
        self,
        *,
        spiffe_id: str | None = None,
        parent_id: str | None = None,
        selector: str | None = None,
    ) -> list[RegistrationEntry]:
        with self.store.read() as tx:
            return tx.list_entries(spiffe_id=spiffe_id, parent_id=parent_id, selector=selector)

    # -- join tokens ------------------------------------------------------------------------
    def generate_token(
        self, actor: str, *, ttl: timedelta = DEFAULT_JOIN_TOKEN_TTL, spiffe_id: str | None = None
    ) -> IssuedToken:
        if not timedelta(seconds=1) <= ttl <= MAX_JOIN_TOKEN_TTL:
            raise InvalidArgument(
                "ttl", f"must be 1..{int(MAX_JOIN_TOKEN_TTL.total_seconds())} seconds", ttl
            )
        alias = None
        if spiffe_id is not None:
            alias = parse_spiffe_id(spiffe_id, "spiffe_id")
            if alias.trust_domain != self.trust_domain:
                raise InvalidArgument("spiffe_id", f"must be in trust domain {self.trust_domain}")
        token_id = str(uuid.uuid4())
        secret = secrets.token_urlsafe(32)
        now = self.clock()
        expires_at = now + ttl
        with self.store.write() as tx:
            tx.insert_token(
                token_id, token_hash(secret), str(alias) if alias else None, now, expires_at
            )
            tx.append_audit(
                kind=EventKind.TOKEN_CREATED,
                actor=actor,
                now=now,
                spiffe_id=str(alias) if alias else None,
                details={"token_id": token_id, "expires_at": expires_at.isoformat()},
            )
        agent_id = SpiffeId(
            f"{self.trust_domain.as_spiffe_id()}{AGENT_PATH_PREFIX}join_token/{token_id}"
        )
        return IssuedToken(token_id, secret, agent_id, alias, expires_at)

    # -- signing ----------------------------------------------------------------------------
    def _x509_signer(self) -> tuple[str, SigningAuthority]:
        signer = self._signers.x509_signer
        if signer is None:
            raise AuthorityUnavailable("no active X.509 authority; is the server started?")
        return signer

    def sign_x509_svids(self, requests: Sequence[X509Request], actor: str) -> list[IssuedX509]:
        """Sign a batch, validate each result, audit all in one transaction."""
        authority_id, authority = self._x509_signer()
        now = self.clock()
        trust_domain = self.trust_domain
        not_before = max(now - CLOCK_SKEW, authority.certificate.not_valid_before_utc)
        issued: list[IssuedX509] = []
        records: list[AuditRecord] = []
        iso: dict[datetime, str] = {}  # a batch's SVIDs share one or two not-after times
        for req in requests:
            if req.spiffe_id.trust_domain != trust_domain:
                raise InvalidArgument("spiffe_id", f"must be in trust domain {trust_domain}")
            ttl = req.ttl or self.settings.x509_svid_ttl
            chain = sign_x509_svid(
                authority,
                req.public_key,
                req.spiffe_id,
                not_before=not_before,
                not_after=now + ttl,
                serial=random_serial(),
                dns_names=req.dns_names,
            )
            # Sign, then check our own output before it leaves (SPIRE does the same).
            leaf = chain[0]
            check_signed_x509_svid(leaf, spiffe_id=req.spiffe_id, issuer=authority.certificate)
            issued.append(IssuedX509(req.spiffe_id, tuple(chain), authority_id))
            not_after = leaf.not_valid_after_utc  # what the leaf says, as IssuedX509.not_after
            records.append(
                AuditRecord(
                    kind=EventKind.X509_SVID_ISSUED,
                    actor=actor,
                    at=now,
                    spiffe_id=str(req.spiffe_id),
                    authority_id=authority_id,
                    not_after=not_after,
                    details={
                        "serial": f"{leaf.serial_number:#x}",
                        "not_after": iso.get(not_after)
                        or iso.setdefault(not_after, not_after.isoformat()),
                        "authority_id": authority_id,
                    },
                )
            )
        with self.store.write() as tx:
            tx.append_audit_batch(records, returning=False)
        return issued

    def mint_jwt_svid(
        self, spiffe_id: str, audience: Sequence[str], actor: str, *, ttl: timedelta | None = None
    ) -> IssuedJwt:
        sid = parse_spiffe_id(spiffe_id, "spiffe_id")
        if sid.trust_domain != self.trust_domain:
            raise InvalidArgument("spiffe_id", f"must be in trust domain {self.trust_domain}")
        if not audience or len(audience) > MAX_AUDIENCES or not all(a for a in audience):
            raise InvalidArgument("audience", f"1..{MAX_AUDIENCES} non-empty audiences required")
        signer = self._signers.jwt_signer
        if signer is None:
            raise AuthorityUnavailable("no active JWT authority; is the server started?")
        authority_id, kid, key = signer
        now = self.clock()
        ttl = ttl or self.settings.jwt_svid_ttl
        with self.store.read() as tx:
            record = tx.get_authority(authority_id)
        expires_at = min(now + ttl, record.not_after)
        token = sign_jwt_svid(key, kid, sid, audience, issued_at=now, expires_at=expires_at)
        with self.store.write() as tx:
            tx.append_audit(
                kind=EventKind.JWT_SVID_ISSUED,
                actor=actor,
                now=now,
                spiffe_id=str(sid),
                authority_id=authority_id,
                not_after=expires_at,
                details={
                    "kid": kid,
                    "audience": list(audience),
                    "not_after": expires_at.isoformat(),
                    "authority_id": authority_id,
                },
            )
        return IssuedJwt(sid, token, expires_at, authority_id)

    # -- audit ------------------------------------------------------------------------------
    def verify_audit(self) -> ChainVerdict:
        with self.store.read() as tx:
            seq, head = tx.audit_head()
            return verify_audit_chain(tx.iter_audit(), head_seq=seq, head_hash=head)

    def record_admin_login(self, actor: str, how: str) -> None:
        with self.store.write() as tx:
            tx.append_audit(
                kind=EventKind.ADMIN_LOGIN, actor=actor, now=self.clock(), details={"via": how}
            )


def token_hash(secret: str) -> str:
    """Join tokens are stored as SHA-256 digests; the secret is shown once and never stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _entry_details(entry: RegistrationEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "parent_id": str(entry.parent_id),
        "selectors": [str(s) for s in entry.selectors],
        "revision": entry.revision,
        "admin": entry.admin,
        "downstream": entry.downstream,
    }
