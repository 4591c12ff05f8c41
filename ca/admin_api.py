"""The admin REST API (FastAPI), served on the server's Unix socket.

Owns request/response models and the mapping of ``ca`` errors to RFC 9457 problem details that
name the field and the rule. Every request is authenticated by the kernel: the server passes the
caller's peer credentials (SO_PEERCRED) in the ASGI scope, and only allowed uids get through.
Changes are audited by the service with the caller's uid as actor.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from spiffe import SpiffeId

from .audit import AuditEvent, EventKind
from .authority import AuthorityKind
from .bundle import to_pem, to_spiffe_json
from .datastore import AuthorityRecord, DatastoreError
from .entries import EntrySpec, RegistrationEntry, parse_spiffe_id
from .errors import (
    AuthorityUnavailable,
    CaError,
    Conflict,
    InvalidArgument,
    InvalidSvid,
    NotFound,
    PermissionDenied,
)
from .federation import FederationError
from .nodeapi.admin import agents_router
from .policies import PolicyStore
from .service import CaService, X509Request
from .x509svid import public_key_from_csr, public_key_from_der

log = logging.getLogger(__name__)

PEER_SCOPE_KEY = "meshid.peer"
MAX_LIST = 10_000  # one page of a listing; the CLI pages through larger sets


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntryIn(Model):
    spiffe_id: str = Field(max_length=2048)
    parent_id: str = Field(max_length=2048)
    selectors: list[str] = Field(min_length=1, max_length=64)
    x509_svid_ttl: int = Field(default=0, ge=0)
    jwt_svid_ttl: int = Field(default=0, ge=0)
    dns_names: list[str] = Field(default_factory=list, max_length=32)
    hint: str = Field(default="", max_length=128)
    admin: bool = False
    downstream: bool = False
    federates_with: list[str] = Field(default_factory=list, max_length=64)
    expires_at: datetime | None = None

    def spec(self) -> EntrySpec:
        return EntrySpec(**self.model_dump())


class EntryOut(Model):
    id: str
    spiffe_id: str
    parent_id: str
    selectors: list[str]
    x509_svid_ttl: int
    jwt_svid_ttl: int
    dns_names: list[str]
    hint: str
    admin: bool
    downstream: bool
    federates_with: list[str]
    expires_at: datetime | None
    revision: int
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def of(cls, e: RegistrationEntry) -> EntryOut:
        return cls(
            id=e.id,
            spiffe_id=str(e.spiffe_id),
            parent_id=str(e.parent_id),
            selectors=[str(s) for s in e.selectors],
            x509_svid_ttl=int(e.x509_svid_ttl.total_seconds()) if e.x509_svid_ttl else 0,
            jwt_svid_ttl=int(e.jwt_svid_ttl.total_seconds()) if e.jwt_svid_ttl else 0,
            dns_names=list(e.dns_names),
            hint=e.hint,
            admin=e.admin,
            downstream=e.downstream,
            federates_with=[t.name for t in e.federates_with],
            expires_at=e.expires_at,
            revision=e.revision,
            created_at=e.created_at,
            updated_at=e.updated_at,
        )


class TokenIn(Model):
    spiffe_id: str | None = Field(default=None, max_length=2048)
    ttl: int = Field(default=600, ge=1)


class TokenOut(Model):
    id: str
    token: str
    agent_id: str
    spiffe_id: str | None
    expires_at: datetime


class AuthorityOut(Model):
    id: str
    kind: str
    server_id: str
    status: str
    key_type: str
    kid: str | None
    not_before: datetime
    not_after: datetime
    tainted: bool
    activated_at: datetime | None
    revoked_at: datetime | None
    certificate_pem: str | None
    public_key_pem: str

    @classmethod
    def of(cls, a: AuthorityRecord) -> AuthorityOut:
        pem = None
        if a.certificate is not None:
            pem = (
                x509.load_der_x509_certificate(a.certificate)
                .public_bytes(serialization.Encoding.PEM)
                .decode()
            )
        pub = serialization.load_der_public_key(a.public_key).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(
            id=a.id,
            kind=a.kind,
            server_id=a.server_id,
            status=a.status,
            key_type=a.key_type,
            kid=a.kid,
            not_before=a.not_before,
            not_after=a.not_after,
            tainted=a.tainted,
            activated_at=a.activated_at,
            revoked_at=a.revoked_at,
            certificate_pem=pem,
            public_key_pem=pub.decode(),
        )


class BundleIn(Model):
    format: Literal["spiffe", "pem"] = "spiffe"
    data: str = Field(max_length=1_000_000)
    endpoint_url: str | None = Field(default=None, max_length=2048)
    endpoint_spiffe_id: str | None = Field(default=None, max_length=2048)


class X509MintIn(Model):
    spiffe_id: str = Field(max_length=2048)
    csr: str | None = Field(
        default=None, max_length=65_536, description="PKCS#10 CSR, PEM or base64 DER"
    )
    public_key: str | None = Field(
        default=None,
        max_length=65_536,
        description="SubjectPublicKeyInfo, PEM or base64 DER (instead of a CSR)",
    )
    ttl: int = Field(default=0, ge=0, le=30 * 86400)
    dns_names: list[str] = Field(default_factory=list, max_length=32)


class X509MintOut(Model):
    spiffe_id: str
    serial: str
    not_after: datetime
    chain_pem: str
    bundle_pem: str


class JwtMintIn(Model):
    spiffe_id: str = Field(max_length=2048)
    audience: list[str] = Field(min_length=1, max_length=16)
    ttl: int = Field(default=0, ge=0, le=86400)


class JwtMintOut(Model):
    spiffe_id: str
    token: str
    expires_at: datetime


class AuditOut(Model):
    seq: int
    at: datetime
    kind: str
    actor: str
    spiffe_id: str | None
    details: dict[str, Any]
    hash: str

    @classmethod
    def of(cls, ev: AuditEvent) -> AuditOut:
        return cls(
            seq=ev.seq,
            at=ev.at,
            kind=ev.kind,
            actor=ev.actor,
            spiffe_id=ev.spiffe_id,
            details=ev.details,
            hash=ev.hash,
        )


class PolicyApplyIn(Model):
    text: str = Field(max_length=1_000_000, description="YAML, one or more documents")
    source: str = Field(default="<request>", max_length=256, description="file name for errors")


class PolicyOut(Model):
    name: str
    revision: int
    document: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class VerifyOut(Model):
    ok: bool
    events_checked: int
    first_bad_seq: int | None
    reason: str


_STATUS: dict[type[CaError], tuple[int, str]] = {
    InvalidArgument: (400, "invalid-argument"),
    InvalidSvid: (400, "invalid-svid"),
    NotFound: (404, "not-found"),
    Conflict: (409, "conflict"),
    PermissionDenied: (403, "permission-denied"),
    AuthorityUnavailable: (503, "unavailable"),
    DatastoreError: (503, "datastore-unavailable"),
    FederationError: (502, "bundle-endpoint-failed"),
}


def problem(status: int, kind: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": f"urn:meshid:problem:{kind}", "title": kind, "status": status, "detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


@dataclass
class Peer:
    """Who is on the other end of an admin connection, as the transport established it.

    On the Unix socket the kernel tells the uid (SO_PEERCRED); over TCP the client's X509-SVID,
    verified against the current authorities, tells the SPIFFE ID. One object per connection.
    """

    via: Literal["unix", "mtls"]
    uid: int | None = None
    pid: int | None = None
    spiffe_id: str | None = None
    error: str | None = None
    logged_in: bool = False

    @property
    def actor(self) -> str:
        return self.spiffe_id if self.via == "mtls" and self.spiffe_id else f"uid:{self.uid}"


def _peer(request: Request) -> Peer | None:
    peer = request.scope.get(PEER_SCOPE_KEY)
    return peer if isinstance(peer, Peer) else None


def _actor(request: Request) -> str:
    peer = _peer(request)
    if peer is None:
        raise PermissionDenied("caller not identified")
    return peer.actor


Actor = Annotated[str, Depends(_actor)]


def _pem_or_b64(text: str, field: str) -> bytes:
    data = text.encode()
    if b"-----BEGIN" in data:
        return data
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as err:
        raise InvalidArgument(field, "must be PEM or base64 DER") from err


def create_admin_app(service: CaService, *, allowed_uids: frozenset[int]) -> FastAPI:
    """Build the admin API over ``service``; only ``allowed_uids`` may call it."""
    app = FastAPI(
        title="meshid server admin API",
        version="1",
        description="Registration, authorities, bundles, minting and the audit log.",
    )

    def _refusal(peer: Peer | None) -> str | None:
        if peer is None:
            return "caller not identified"
        if peer.via == "unix":
            return None if peer.uid in allowed_uids else "caller is not an allowed admin uid"
        if peer.error is not None or peer.spiffe_id is None:
            return "no valid client SVID"
        if not service.is_admin(SpiffeId(peer.spiffe_id)):
            return "caller's SPIFFE ID has no admin entry"
        return None

    @app.middleware("http")
    async def _authenticate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        peer = _peer(request)
        refusal = await run_in_threadpool(_refusal, peer)
        if refusal is not None:
            # Peers get a terse answer; the log gets the detail.
            log.info(
                "admin request refused",
                extra={
                    "reason": refusal,
                    "detail": peer.error if peer else None,
                    "path": request.url.path,
                },
            )
            return problem(403, "permission-denied", refusal)
        assert peer is not None
        if peer.via == "mtls" and not peer.logged_in:
            # One admin.login per mTLS connection: the caller presented a credential. Unix
            # socket callers are identified by the kernel on every request instead, and their
            # changes carry their uid.
            peer.logged_in = True
            await run_in_threadpool(service.record_admin_login, peer.actor, peer.via)
        return await call_next(request)

    @app.exception_handler(CaError)
    async def _ca_error(_request: Request, err: CaError) -> JSONResponse:
        status, kind = next(
            (v for k, v in _STATUS.items() if isinstance(err, k)), (500, "internal")
        )
        if status >= 500:
            log.error("admin request failed", exc_info=err)
        field = err.field if isinstance(err, InvalidArgument) else None
        rule = err.rule if isinstance(err, InvalidArgument) else None
        return problem(status, kind, str(err), field=field, rule=rule)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        rule = str(first.get("msg", "invalid"))
        return problem(400, "invalid-argument", f"{field}: {rule}", field=field, rule=rule)

    @app.get("/v1/health")
    def health() -> dict[str, object]:
        bundle = service.bundle()
        return {
            "status": "ok",
            "trust_domain": service.trust_domain.name,
            "bundle_sequence": bundle.sequence,
            "x509_authorities": len(bundle.x509_authorities),
        }

    @app.post("/v1/entries", status_code=201)
    def create_entry(body: EntryIn, actor: Actor) -> EntryOut:
        return EntryOut.of(service.create_entry(body.spec(), actor))

    @app.get("/v1/entries")
    def list_entries(
        spiffe_id: str | None = None, parent_id: str | None = None, selector: str | None = None
    ) -> list[EntryOut]:
        return [
            EntryOut.of(e)
            for e in service.list_entries(
                spiffe_id=spiffe_id, parent_id=parent_id, selector=selector
            )
        ]

    @app.get("/v1/entries/{entry_id}")
    def get_entry(entry_id: str) -> EntryOut:
        return EntryOut.of(service.get_entry(entry_id))

    @app.put("/v1/entries/{entry_id}")
    def update_entry(entry_id: str, body: EntryIn, actor: Actor) -> EntryOut:
        return EntryOut.of(service.update_entry(entry_id, body.spec(), actor))

    @app.delete("/v1/entries/{entry_id}")
    def delete_entry(entry_id: str, actor: Actor) -> EntryOut:
        return EntryOut.of(service.delete_entry(entry_id, actor))

    @app.post("/v1/tokens", status_code=201)
    def generate_token(body: TokenIn, actor: Actor) -> TokenOut:
        t = service.generate_token(actor, ttl=timedelta(seconds=body.ttl), spiffe_id=body.spiffe_id)
        return TokenOut(
            id=t.id,
            token=t.token,
            agent_id=str(t.agent_id),
            spiffe_id=str(t.alias_id) if t.alias_id else None,
            expires_at=t.expires_at,
        )

    @app.get("/v1/bundle")
    def show_bundle(
        fmt: Annotated[Literal["pem", "spiffe"], Query(alias="format")] = "pem",
    ) -> Response:
        bundle = service.bundle()
        if fmt == "pem":
            return Response(to_pem(bundle), media_type="application/x-pem-file")
        return Response(to_spiffe_json(bundle), media_type="application/json")

    @app.get("/v1/bundles")
    def list_bundles() -> list[dict[str, Any]]:
        return [
            {"trust_domain": b.trust_domain.name, "bundle": to_spiffe_json(b).decode()}
            for b in service.federated_bundles()
        ]

    @app.get("/v1/bundles/{trust_domain}")
    def get_bundle(
        trust_domain: str,
        fmt: Annotated[Literal["pem", "spiffe"], Query(alias="format")] = "spiffe",
    ) -> Response:
        bundle = service.federated_bundle(trust_domain)
        if fmt == "pem":
            return Response(to_pem(bundle), media_type="application/x-pem-file")
        return Response(to_spiffe_json(bundle), media_type="application/json")

    @app.put("/v1/bundles/{trust_domain}")
    def set_bundle(trust_domain: str, body: BundleIn, actor: Actor) -> dict[str, Any]:
        b = service.set_federated_bundle(
            trust_domain,
            body.data.encode(),
            actor,
            fmt=body.format,
            endpoint_url=body.endpoint_url,
            endpoint_spiffe_id=body.endpoint_spiffe_id,
        )
        return {"trust_domain": b.trust_domain.name, "sequence": b.sequence}

    @app.post("/v1/bundles/{trust_domain}/refresh")
    def refresh_bundle(trust_domain: str, actor: Actor) -> dict[str, Any]:
        changed = service.refresh_federated_bundle(trust_domain, actor)
        bundle = service.federated_bundle(trust_domain)
        return {"trust_domain": trust_domain, "changed": changed, "sequence": bundle.sequence}

    @app.delete("/v1/bundles/{trust_domain}", status_code=204)
    def delete_bundle(trust_domain: str, actor: Actor) -> Response:
        service.delete_federated_bundle(trust_domain, actor)
        return Response(status_code=204)

    @app.get("/v1/authorities/{kind}")
    def list_authorities(kind: AuthorityKind) -> list[AuthorityOut]:
        return [AuthorityOut.of(a) for a in service.list_authorities(kind)]

    @app.post("/v1/authorities/{kind}/prepare", status_code=201)
    def prepare(kind: AuthorityKind, actor: Actor) -> AuthorityOut:
        return AuthorityOut.of(service.prepare(kind, actor))

    @app.post("/v1/authorities/{kind}/{authority_id}/activate")
    def activate(kind: AuthorityKind, authority_id: str, actor: Actor) -> AuthorityOut:
        return AuthorityOut.of(service.activate(kind, authority_id, actor))

    @app.post("/v1/authorities/{kind}/{authority_id}/taint")
    def taint(kind: AuthorityKind, authority_id: str, actor: Actor) -> AuthorityOut:
        return AuthorityOut.of(service.taint(kind, authority_id, actor))

    @app.post("/v1/authorities/{kind}/{authority_id}/revoke")
    def revoke(
        kind: AuthorityKind, authority_id: str, actor: Actor, force: bool = False
    ) -> AuthorityOut:
        return AuthorityOut.of(service.revoke(kind, authority_id, actor, force=force))

    @app.post("/v1/x509/mint")
    def mint_x509(body: X509MintIn, actor: Actor) -> X509MintOut:
        spiffe_id = parse_spiffe_id(body.spiffe_id, "spiffe_id")
        if (body.csr is None) == (body.public_key is None):
            raise InvalidArgument("csr", "give exactly one of csr and public_key")
        if body.csr is not None:
            public_key = public_key_from_csr(_pem_or_b64(body.csr, "csr"))
        else:
            assert body.public_key is not None
            public_key = public_key_from_der(_pem_or_b64(body.public_key, "public_key"))
        ttl = timedelta(seconds=body.ttl) if body.ttl else None
        [svid] = service.sign_x509_svids(
            [X509Request(spiffe_id, public_key, ttl, tuple(body.dns_names))], actor
        )
        return X509MintOut(
            spiffe_id=str(svid.spiffe_id),
            serial=f"{svid.serial:#x}",
            not_after=svid.not_after,
            chain_pem="".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in svid.chain
            ),
            bundle_pem=to_pem(service.bundle()).decode(),
        )

    @app.post("/v1/jwt/mint")
    def mint_jwt(body: JwtMintIn, actor: Actor) -> JwtMintOut:
        ttl = timedelta(seconds=body.ttl) if body.ttl else None
        jwt = service.mint_jwt_svid(body.spiffe_id, body.audience, actor, ttl=ttl)
        return JwtMintOut(spiffe_id=str(jwt.spiffe_id), token=jwt.token, expires_at=jwt.expires_at)

    @app.get("/v1/audit")
    def list_audit(
        spiffe_id: str | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 1000,
    ) -> list[AuditOut]:
        if since is not None and since.tzinfo is None:
            raise InvalidArgument("since", "must carry a time zone (RFC 3339)", since.isoformat())
        with service.store.read() as tx:
            events = tx.list_audit(
                spiffe_id=spiffe_id, kind=kind, since=since, after_seq=after, limit=limit
            )
        return [AuditOut.of(e) for e in events]

    @app.post("/v1/audit/verify")
    def verify_audit() -> VerifyOut:
        v = service.verify_audit()
        return VerifyOut(
            ok=v.ok, events_checked=v.events_checked, first_bad_seq=v.first_bad_seq, reason=v.reason
        )

    policies = PolicyStore(service)

    @app.post("/v1/policies")
    def apply_policies(body: PolicyApplyIn, actor: Actor) -> dict[str, Any]:
        result = policies.apply(body.text, body.source, actor)
        return {
            "applied": [
                {"name": a.name, "revision": a.revision, "changed": a.changed}
                for a in result.applied
            ],
            "warnings": list(result.warnings),
        }

    @app.get("/v1/policies")
    def list_policies() -> list[PolicyOut]:
        return [PolicyOut(**p.__dict__) for p in policies.list()]

    @app.get("/v1/policies/{name}")
    def show_policy(name: str) -> PolicyOut:
        return PolicyOut(**policies.get(name).__dict__)

    @app.delete("/v1/policies/{name}", status_code=204)
    def delete_policy(name: str, actor: Actor) -> Response:
        policies.delete(name, actor)
        return Response(status_code=204)

    @app.get("/v1/audit/kinds")
    def audit_kinds() -> list[str]:
        return sorted(v for k, v in vars(EventKind).items() if k.isupper())

    app.include_router(agents_router(service, _actor))
    return app
