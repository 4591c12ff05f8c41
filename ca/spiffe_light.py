"""py-spiffe's pure types without its Workload API client, for the sidecar process.

py-spiffe's package ``__init__`` imports its Workload API client, and with it grpc and
protobuf (~20 MiB of a sidecar's RSS), even where only ``SpiffeId`` and ``TrustDomain`` are
used, as with identity from files. ``load_core`` registers the ``spiffe`` package without
running that ``__init__`` and imports just that pure module (and ``spiffe.errors``); not even
``X509Svid``, whose module pulls pyasn1 and pem (~3.5 MiB; the proxy reads its identity files
with cryptography). ``load_all`` runs the real ``__init__`` in place once the Workload API
identity is configured. ``meshid proxy run`` calls ``load_core`` before anything imports
py-spiffe; every other process imports py-spiffe as usual and both calls change nothing.
It must not be used to reach anything of py-spiffe beyond those names before ``load_all``.
"""

from __future__ import annotations

import importlib.util
import sys

_PARTIAL = "_meshid_partial"  # set on the package object while its __init__ has not run


def load_core() -> None:
    """Make ``from spiffe import SpiffeId, TrustDomain`` cost no grpc (nor pyasn1)."""
    if "spiffe" in sys.modules:
        return
    spec = importlib.util.find_spec("spiffe")
    if spec is None or spec.loader is None:
        return  # not installed: the ordinary import will say so
    package = importlib.util.module_from_spec(spec)
    sys.modules["spiffe"] = package
    try:
        from spiffe.spiffe_id.spiffe_id import SpiffeId, TrustDomain  # noqa: PLC0415
    except BaseException:
        del sys.modules["spiffe"]
        raise
    package.SpiffeId = SpiffeId  # type: ignore[attr-defined]
    package.TrustDomain = TrustDomain  # type: ignore[attr-defined]
    setattr(package, _PARTIAL, True)


def load_all() -> None:
    """Complete the ``spiffe`` package (its Workload API client included)."""
    package = sys.modules.get("spiffe")
    if package is None or not getattr(package, _PARTIAL, False):
        import spiffe  # noqa: F401, PLC0415  the ordinary, complete import

        return
    assert package.__spec__ is not None and package.__spec__.loader is not None
    package.__spec__.loader.exec_module(package)
    setattr(package, _PARTIAL, False)
