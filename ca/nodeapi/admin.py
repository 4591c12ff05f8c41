"""Admin API routes for attested agents: list, show, ban, evict.

Mounted by ``ca.admin_api.create_admin_app`` (its middleware authenticates every request; its
exception handlers turn ``ca`` errors into problem details). The agent's SPIFFE ID is the rest of
the path, as is or percent-encoded: ``/v1/agents/spiffe://example.org/meshid/agent/x509pop/ab12``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from ..datastore.nodes import AttestedNode
from ..service import CaService
from .service import NodeService


class AgentOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spiffe_id: str
    attestation_type: str
    selectors: list[str]
    aliases: list[str]
    serial: str
    previous_serial: str | None
    expires_at: datetime
    banned: bool
    created_at: datetime
    attested_at: datetime
    last_seen: datetime

    @classmethod
    def of(cls, node: AttestedNode) -> AgentOut:
        return cls(
            spiffe_id=node.spiffe_id,
            attestation_type=node.attestation_type,
            selectors=list(node.selectors),
            aliases=list(node.aliases),
            serial=f"{node.serial:#x}",
            previous_serial=f"{node.previous_serial:#x}" if node.previous_serial else None,
            expires_at=node.expires_at,
            banned=node.banned,
            created_at=node.created_at,
            attested_at=node.attested_at,
            last_seen=node.last_seen,
        )


def agents_router(service: CaService, actor: Callable[[Request], str]) -> APIRouter:
    """The ``/v1/agents`` routes; ``actor`` is the admin API's caller dependency."""
    nodes = NodeService(service)
    router = APIRouter(prefix="/v1/agents", tags=["agents"])
    # A default rather than an Annotated alias: annotations are strings here (PEP 563) and
    # FastAPI cannot resolve a name local to this function.
    caller = Depends(actor)

    @router.get("")
    def list_agents() -> list[AgentOut]:
        return [AgentOut.of(n) for n in nodes.list_agents()]

    @router.post("/{spiffe_id:path}/ban")
    def ban_agent(spiffe_id: str, who: str = caller) -> AgentOut:
        return AgentOut.of(nodes.ban(spiffe_id, who))

    @router.post("/{spiffe_id:path}/evict")
    def evict_agent(spiffe_id: str, who: str = caller) -> AgentOut:
        return AgentOut.of(nodes.evict(spiffe_id, who))

    @router.get("/{spiffe_id:path}")
    def show_agent(spiffe_id: str) -> AgentOut:
        return AgentOut.of(nodes.get_agent(spiffe_id))

    return router
