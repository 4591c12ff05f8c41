"""The SPIFFE Workload API served by the node agent.

Owns the gRPC service on a Unix socket (``server``), workload attestation (``attestors``) and
response composition (``compose``). It must not know how SVIDs are obtained: it asks a narrow
interface (``provider.IdentityProvider``) implemented by ``node_agent``, or by
``static.StaticIdentityProvider`` without an agent.
"""

from .attestors import (
    AttestorsConfig,
    CompositeAttestor,
    DockerAttestor,
    HttpsKubeletClient,
    K8sAttestor,
    K8sConfig,
    KubeletClient,
    KubeletConfig,
    SystemdAttestor,
    UnixAttestor,
    UnixConfig,
    WorkloadAttestor,
    build_attestor,
)
from .endpoint import DEFAULT_SOCKET_MODE, ENV_VAR, parse_endpoint_socket
from .errors import (
    AttestationFailed,
    IdentityUnavailable,
    InvalidEndpoint,
    InvalidRequest,
    NoIdentity,
    WorkloadApiError,
)
from .provider import IdentityProvider, JwtIdentity, Snapshot, X509Identity
from .server import WorkloadApiServer
from .static import StaticIdentityProvider, bundle_der_from_pem, identity_from_pem

__all__ = [
    "DEFAULT_SOCKET_MODE",
    "ENV_VAR",
    "AttestationFailed",
    "AttestorsConfig",
    "CompositeAttestor",
    "DockerAttestor",
    "HttpsKubeletClient",
    "IdentityProvider",
    "IdentityUnavailable",
    "InvalidEndpoint",
    "InvalidRequest",
    "JwtIdentity",
    "K8sAttestor",
    "K8sConfig",
    "KubeletClient",
    "KubeletConfig",
    "NoIdentity",
    "Snapshot",
    "StaticIdentityProvider",
    "SystemdAttestor",
    "UnixAttestor",
    "UnixConfig",
    "WorkloadApiError",
    "WorkloadApiServer",
    "WorkloadAttestor",
    "X509Identity",
    "build_attestor",
    "bundle_der_from_pem",
    "identity_from_pem",
    "parse_endpoint_socket",
]
