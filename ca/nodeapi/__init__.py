"""The node API: how agents attest, sync their entries and get SVIDs signed, and how proxies
watch the stored policies that select them (gRPC over TLS).

``node.proto`` is the contract; ``node_pb2*`` are generated from it with ``make proto`` and
committed. The agent side (``node_agent``) imports the generated messages and stubs from here,
so this package imports nothing else on its own. The server side:

- ``attestation``: join_token and x509pop rules (pure); ``authz``: which entries an agent may
  have (pure walk); ``sync``: what each SyncEntries stream sends; ``messages``: protobuf encoding;
- ``service``: attestation, authentication and signing over the CA service and datastore;
- ``policy_stream``: which stored policies each ``WatchPolicies`` caller (a proxy) receives;
- ``watch``: change detection (in-process notification and database polling);
- ``server``: the gRPC shell (grpclib over TLS); ``admin``: the ``/v1/agents`` admin routes.
"""
