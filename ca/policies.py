"""The server's policy store: apply, list, show and delete AuthorizationPolicy documents.

Owns the rules for storing policies: a document is parsed and validated by ``authz`` (a pure
library, which ``ca`` may import) before anything is written; an apply of several documents is
all or nothing; each stored change is audited in its transaction and bumps the policies revision
that proxies watch. It does not evaluate policies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from authz import PolicyError, parse_policies, parse_policy_dict, policy_to_dict
from authz.model import Policy

from .audit import EventKind
from .datastore import policies as store
from .errors import InvalidArgument
from .service import CaService

MAX_POLICY_TEXT = 1_000_000  # bytes of YAML in one apply; far above any real policy set


@dataclass(frozen=True)
class Applied:
    name: str
    revision: int
    changed: bool


@dataclass(frozen=True)
class ApplyResult:
    applied: tuple[Applied, ...]
    warnings: tuple[str, ...]


def parse_for_apply(text: str, source: str) -> tuple[tuple[Policy, ...], tuple[str, ...]]:
    """Parse ``text`` with the authz parser; its precise error becomes ``InvalidArgument``."""
    if len(text.encode()) > MAX_POLICY_TEXT:
        raise InvalidArgument("text", f"at most {MAX_POLICY_TEXT} bytes of policy YAML")
    try:
        result = parse_policies(text, source)
    except PolicyError as err:
        raise InvalidArgument("policy", str(err)) from err
    if not result.policies:
        raise InvalidArgument("policy", f"{source}: no AuthorizationPolicy document found")
    return result.policies, tuple(str(w) for w in result.warnings)


class PolicyStore:
    """Policies stored by the server; every change audited and announced."""

    def __init__(self, service: CaService) -> None:
        self.service = service

    def apply(self, text: str, source: str, actor: str) -> ApplyResult:
        policies, warnings = parse_for_apply(text, source)
        now = self.service.clock()
        applied: list[Applied] = []
        with self.service.store.write() as tx:
            for policy in policies:
                stored, changed = store.upsert(tx, policy.name, policy_to_dict(policy), now)
                applied.append(Applied(stored.name, stored.revision, changed))
                if changed:
                    tx.append_audit(
                        kind=EventKind.POLICY_APPLIED,
                        actor=actor,
                        now=now,
                        details={
                            "name": policy.name,
                            "revision": stored.revision,
                            "source": source,
                        },
                    )
        if any(a.changed for a in applied):
            self.service.notify_changed()
        return ApplyResult(tuple(applied), warnings)

    def delete(self, name: str, actor: str) -> None:
        now = self.service.clock()
        with self.service.store.write() as tx:
            store.delete(tx, name)
            tx.append_audit(
                kind=EventKind.POLICY_DELETED, actor=actor, now=now, details={"name": name}
            )
        self.service.notify_changed()

    def list(self) -> list[store.StoredPolicy]:
        with self.service.store.read() as tx:
            return store.list_all(tx)

    def get(self, name: str) -> store.StoredPolicy:
        with self.service.store.read() as tx:
            return store.get(tx, name)

    def revision(self) -> int:
        with self.service.store.read() as tx:
            return store.revision(tx)

    def policies(self) -> tuple[Sequence[Policy], int]:
        """Every stored policy, parsed, with the revision they are current at."""
        with self.service.store.read() as tx:
            rows = store.list_all(tx)
            revision = store.revision(tx)
        parsed: list[Policy] = []
        for row in rows:
            parsed.extend(parse_policy_dict(row.document, f"stored policy {row.name}").policies)
        return parsed, revision
