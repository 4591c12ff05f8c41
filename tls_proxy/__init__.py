"""The mTLS sidecar proxy (lands with issue 4).

Owns listeners, identity from the Workload API, the filter chain, HTTP codecs, upstream pools and
load balancing. It must not evaluate policy itself: it calls ``authz``.
"""
