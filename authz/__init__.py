"""Authorization policy for meshid: the model, the parser and the pure decision engine.

Owns AuthorizationPolicy documents (``apiVersion: meshid/v1``) and their meaning, which follows
Istio's AuthorizationPolicy: DENY before ALLOW, a default posture for workloads no ALLOW policy
selects, AUDIT and dry-run policies reported but never enforced, HTTP-only fields handled as
Istio does on L4 connections. Every decision is a typed ``Verdict`` naming the deciding policy
and rule, or why none decided.

It must not do I/O of any kind: no files, sockets, clocks or logging. Callers (the proxy, the
server, the CLI) read policy text, validate JWTs, normalize paths, log and count; this package
takes values and returns values. ``Engine.evaluate`` never raises; a policy set that cannot be
parsed is replaced by ``Engine.deny_all(reason)`` so the caller fails closed and says why.
"""

from authz.engine import Engine
from authz.errors import AuthzError, PolicyError
from authz.model import (
    CONDITION_KEYS,
    Action,
    Condition,
    Operation,
    Policy,
    Rule,
    Source,
)
from authz.parser import (
    ParseResult,
    PolicyWarning,
    parse_policies,
    parse_policy_dict,
    policy_to_dict,
)
from authz.posture import DEFAULT_POSTURE, Posture
from authz.request import Request
from authz.verdict import DryRunResult, PolicyMatch, Verdict

__all__ = [
    "CONDITION_KEYS",
    "DEFAULT_POSTURE",
    "Action",
    "AuthzError",
    "Condition",
    "DryRunResult",
    "Engine",
    "Operation",
    "ParseResult",
    "Policy",
    "PolicyError",
    "PolicyMatch",
    "PolicyWarning",
    "Posture",
    "Request",
    "Rule",
    "Source",
    "Verdict",
    "parse_policies",
    "parse_policy_dict",
    "policy_to_dict",
]
