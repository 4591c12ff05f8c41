"""The mTLS sidecar proxy (issue 4).

Owns listeners (inbound mTLS, outbound mTLS), identity from files or the Workload API, SPIFFE
verification of peers, the filter chain, the HTTP/1.1 codec (``http1``, registered in
``codecs``), the admin server and transparent mode (``transparent``: iptables rules and the
original destination). HTTP/2, upstream pools and load balancing beyond round robin land
later, as filters and codecs behind the same listener code. It must not
evaluate policy itself: it calls ``authz``.
"""

from .config import ProxyConfig, load_config, parse_config
from .errors import (
    ConfigError,
    IdentityError,
    NoOriginalDestination,
    PeerRejected,
    ProxyError,
    RejectReason,
)
from .identity import (
    FileIdentitySource,
    IdentitySnapshot,
    IdentitySource,
    WorkloadApiIdentitySource,
)
from .proxy import READY_LINE, Proxy
from .spiffe_verify import verify_peer

__all__ = [
    "READY_LINE",
    "ConfigError",
    "FileIdentitySource",
    "IdentityError",
    "IdentitySnapshot",
    "IdentitySource",
    "NoOriginalDestination",
    "PeerRejected",
    "Proxy",
    "ProxyConfig",
    "ProxyError",
    "RejectReason",
    "WorkloadApiIdentitySource",
    "load_config",
    "parse_config",
    "verify_peer",
]
