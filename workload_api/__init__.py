"""The SPIFFE Workload API served by the node agent (lands with issue 3).

Owns the gRPC service on a Unix socket, workload attestation and response composition. It must
not know how SVIDs are obtained: it asks a narrow interface provided by ``node_agent``.
"""
