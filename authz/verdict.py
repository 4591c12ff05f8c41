"""The typed result of an authorization decision and its explanation.

Owns ``Verdict`` (what was decided, by which policy and rule, and why), ``DryRunResult`` (what a
dry-run policy would have changed) and ``PolicyMatch`` (an AUDIT policy that matched). Values only:
the proxy turns them into a 403, an access-log line or a metric; nothing here logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz.model import Action


@dataclass(frozen=True, slots=True)
class PolicyMatch:
    """A policy and the index of its first rule that matched the request."""

    policy: str
    rule: int

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form."""
        return {"policy": self.policy, "rule": self.rule}


@dataclass(frozen=True, slots=True)
class DryRunResult:
    """What a ``dry_run: true`` policy would have decided had it been enforced.

    ``rule`` is the index of its first matching rule, ``None`` when none matched. ``allowed`` is
    the decision the engine would have made with this policy enforced alongside the enforced
    set, and ``reason`` explains that would-be decision.
    """

    policy: str
    action: Action
    rule: int | None
    allowed: bool
    reason: str

    @property
    def matched(self) -> bool:
        """Whether one of the policy's rules matched."""
        return self.rule is not None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form."""
        return {
            "policy": self.policy,
            "action": str(self.action),
            "rule": self.rule,
            "decision": "allow" if self.allowed else "deny",
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision and what made it.

    ``policy`` and ``rule`` name the enforced policy and rule index that decided, or are ``None``
    when nothing matched and a default decided; ``reason`` says which, in words ("no ALLOW
    policy matched: 3 considered"). ``dry_run`` lists every dry-run policy that selects the
    workload; ``audit`` lists the AUDIT policies that matched. Neither changes ``allowed``.
    """

    allowed: bool
    policy: str | None
    rule: int | None
    reason: str
    dry_run: tuple[DryRunResult, ...] = ()
    audit: tuple[PolicyMatch, ...] = ()

    @property
    def decision(self) -> str:
        """``"allow"`` or ``"deny"``."""
        return "allow" if self.allowed else "deny"

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form (the shape ``meshid policy check --output json`` prints)."""
        return {
            "decision": self.decision,
            "policy": self.policy,
            "rule": self.rule,
            "reason": self.reason,
            "dry_run": [result.as_dict() for result in self.dry_run],
            "audit": [match.as_dict() for match in self.audit],
        }
