"""Errors of the Workload API package.

``WorkloadApiError`` is the root. Subclasses exist only where the server maps them to a gRPC
status (the table in ``docs/workload-api.md``). Messages say what failed, the offending value and
the rule; the server logs them and tells the peer only a terse reason.
"""

from __future__ import annotations


class WorkloadApiError(Exception):
    """Root of every error raised by the ``workload_api`` package."""


class InvalidRequest(WorkloadApiError):
    """A request field breaks a rule of the Workload API: the peer gets ``InvalidArgument``."""


class NoIdentity(WorkloadApiError):
    """The caller's selectors match no identity: the peer gets ``PermissionDenied``."""


class AttestationFailed(WorkloadApiError):
    """The caller could not be attested (gone, pid reused, an attestor failed).

    The peer gets ``PermissionDenied``: without attestation there is no identity to give.
    """


class IdentityUnavailable(WorkloadApiError):
    """The provider cannot produce an SVID right now (e.g. the server is unreachable).

    An ``IdentityProvider`` raises it from ``fetch_jwt_svid``; the peer gets ``Unavailable`` and
    retries with backoff.
    """


class InvalidEndpoint(WorkloadApiError):
    """A ``SPIFFE_ENDPOINT_SOCKET`` value or socket path this server cannot serve on."""
