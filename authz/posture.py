"""Default postures: what happens to a workload that no enforced ALLOW policy selects.

Owns the three postures and the shipped default. Pure values; no I/O.
"""

from __future__ import annotations

from enum import StrEnum


class Posture(StrEnum):
    """The decision for a workload without enforced ALLOW policies (DENY policies still apply)."""

    DENY = "deny"
    ALL_AUTHENTICATED = "all-authenticated"
    ALLOW = "allow"


# Any verified peer of our own or a federated trust domain: installing the mesh does not break
# traffic between meshed workloads, yet strangers (no SVID, unknown trust domain) are refused.
DEFAULT_POSTURE = Posture.ALL_AUTHENTICATED
