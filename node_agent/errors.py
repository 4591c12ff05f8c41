"""Errors of the node agent. ``AgentError`` is the package root."""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error raised by ``node_agent``."""


class AttestationError(AgentError):
    """The server refused this node (bad token, failed challenge, banned)."""


class ServerUnavailable(AgentError):
    """No configured server could be reached; the agent keeps serving from its cache."""


class PermissionDenied(AgentError):
    """The server refused the agent (banned, evicted, SVID not accepted)."""
