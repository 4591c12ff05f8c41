"""The request an authorization decision is about, as the proxy observed it.

Owns the attributes the engine may read. Every value is already trusted by the time it is here:
``source_principal`` comes from the verified mTLS peer certificate, ``request_principal`` and
``claims`` from a JWT-SVID the caller has validated against the bundles, ``path`` from
``tls_proxy.path.normalize_path``. The engine validates nothing of that and does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Request:
    """One connection (``is_l4``) or one HTTP request to the protected workload.

    ``destination`` is the SPIFFE ID of the workload the proxy protects. ``headers`` maps
    lower-cased names to values; a repeated header is joined with ``","`` (RFC 9110 §5.3).
    ``host`` is the ``:authority`` or ``Host`` value and ``path`` the normalized request target
    (its query string, if any, is ignored by path matching). On an L4 connection the HTTP
    attributes are ignored even if set.
    """

    destination: str
    source_principal: str | None = None
    source_address: str | None = None
    destination_port: int | None = None
    is_l4: bool = False
    method: str | None = None
    host: str | None = None
    path: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    request_principal: str | None = None
    claims: Mapping[str, object] = field(default_factory=dict)
