"""Proxy filters, one per module, and ``build_chain``, which assembles them in order.

Order matters only for ``on_connection`` (the first ``Deny`` wins); every filter's ``on_close``
runs. Observers come first so that they see every connection, ``authz`` last among the
connection-level deciders. New filters (rate limits, telemetry) add a line here.
"""

from __future__ import annotations

from typing import IO

from ..config import ProxyConfig
from ..jwt_auth import JwtBundles
from ..metrics import ProxyMetrics
from .access_log import AccessLogFilter, access_record, request_record
from .authz import AuthzFilter, PolicyStore
from .base import Connection, ConnectionFilter, Deny, FilterChain, RequestFilter
from .metrics import MetricsFilter


def build_chain(
    config: ProxyConfig,
    *,
    policies: PolicyStore,
    metrics: ProxyMetrics,
    access_log_stream: IO[str] | None = None,
    jwt_bundles: JwtBundles | None = None,
) -> FilterChain:
    """The filter chain of ``config``, in order (connection and request level)."""
    metrics_filter = MetricsFilter(metrics)
    filters: list[ConnectionFilter] = [metrics_filter]
    requests: list[RequestFilter] = [metrics_filter]
    if config.access_log.path is not None or access_log_stream is not None:
        access_log = AccessLogFilter(config.access_log, access_log_stream)
        filters.append(access_log)
        requests.append(access_log)
    authz = AuthzFilter(
        policies,
        metrics,
        debug=config.debug,
        jwt_bundles=jwt_bundles,
        jwt_audiences=() if config.jwt is None else config.jwt.audiences,
    )
    filters.append(authz)
    requests.append(authz)
    return FilterChain(filters, requests)


__all__ = [
    "AccessLogFilter",
    "AuthzFilter",
    "Connection",
    "ConnectionFilter",
    "Deny",
    "FilterChain",
    "MetricsFilter",
    "PolicyStore",
    "RequestFilter",
    "access_record",
    "build_chain",
    "request_record",
]
