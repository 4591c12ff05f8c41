"""The node API: how agents attest, sync their entries and get SVIDs signed (gRPC over TLS).

``node.proto`` is the contract; ``node_pb2*`` are generated from it with ``make proto`` and
committed. The agent side (``node_agent``) imports the generated messages and stubs from here.
"""
