"""Imported first by ``meshid.cli``: slims the import graph of ``meshid proxy run``.

The sidecar runs beside every workload, so its memory counts. py-spiffe's package imports
its Workload API client (grpc and protobuf, ~20 MiB) on any ``import spiffe``; for ``proxy
run`` the package is registered with its pure types only (``ca.spiffe_light``) before
the CLI's modules import it, and the client is loaded later only if the configuration asks
for the Workload API. Every other command imports py-spiffe as usual.
"""

from __future__ import annotations

import sys

if sys.argv[1:3] == ["proxy", "run"]:
    from ca.spiffe_light import load_core

    load_core()
