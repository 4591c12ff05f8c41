"""The node agent (lands with issue 3).

Owns node attestation (agent side), entry sync, workload key generation, the SVID cache and its
rotation. It must not sign anything nor touch the server's database.
"""
