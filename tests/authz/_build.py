"""Small builders so test tables read like policy documents.

Policies go through ``parse_policy_dict``, so every table row also exercises the parser.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from authz import Engine, Policy, Posture, Request, parse_policy_dict

TD = "example.org"
FEDERATED = "partner.org"
WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"
FRONTEND = "spiffe://example.org/frontend"
BATCH = "spiffe://example.org/batch"
PARTNER = "spiffe://partner.org/billing"
STRANGER = "spiffe://evil.org/frontend"
CI = "spiffe://example.org/ci"

_UNSET: Any = object()


def policy(
    name: str,
    action: str = "ALLOW",
    rules: Iterable[Mapping[str, Any]] | None = _UNSET,
    *,
    selector: Iterable[str] | None = (WEB,),
    dry_run: bool = False,
) -> Policy:
    """A policy from document-form rules; ``rules=None`` omits the key (no rules)."""
    spec: dict[str, Any] = {"action": action}
    if selector is not None:
        spec["selector"] = {"spiffe_ids": list(selector)}
    if rules is _UNSET:
        rules = [{}]
    if rules is not None:
        spec["rules"] = list(rules)
    if dry_run:
        spec["dry_run"] = True
    document = {
        "apiVersion": "meshid/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }
    return parse_policy_dict(document, "test").policies[0]


def rule(
    *,
    source: Iterable[Mapping[str, Any]] = (),
    operation: Iterable[Mapping[str, Any]] = (),
    when: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A document-form rule: each argument lists the entries of ``from``, ``to``, ``when``."""
    out: dict[str, Any] = {}
    if source:
        out["from"] = [{"source": dict(s)} for s in source]
    if operation:
        out["to"] = [{"operation": dict(o)} for o in operation]
    if when:
        out["when"] = [dict(w) for w in when]
    return out


def http(
    *,
    peer: str | None = FRONTEND,
    dest: str = WEB,
    method: str = "GET",
    path: str = "/",
    host: str = "web.example.org",
    port: int = 8443,
    address: str = "10.1.2.3",
    headers: Mapping[str, str] | None = None,
    jwt: str | None = None,
    claims: Mapping[str, object] | None = None,
) -> Request:
    """An HTTP request to ``dest``."""
    return Request(
        destination=dest,
        source_principal=peer,
        source_address=address,
        destination_port=port,
        method=method,
        host=host,
        path=path,
        headers=dict(headers or {}),
        request_principal=jwt,
        claims=dict(claims or {}),
    )


def tcp(
    *,
    peer: str | None = FRONTEND,
    dest: str = WEB,
    port: int = 5432,
    address: str = "10.1.2.3",
) -> Request:
    """An L4 connection to ``dest``."""
    return Request(dest, peer, address, port, is_l4=True)


def engine(
    policies: Iterable[Policy],
    *,
    default_posture: Posture = Posture.ALL_AUTHENTICATED,
    postures: Mapping[str, Posture] | None = None,
) -> Engine:
    """An engine for trust domain example.org federated with partner.org."""
    return Engine.compile(
        policies,
        trust_domain=TD,
        federated_trust_domains=[FEDERATED],
        default_posture=default_posture,
        postures=postures,
    )
