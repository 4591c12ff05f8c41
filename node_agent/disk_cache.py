"""An optional on-disk copy of the agent's state, so a restart during a server outage serves
workloads at once (``persist_svid_cache: true``; off by default).

Owns the file format and nothing else: entries, their SVIDs and keys, the bundles and the sync
revision, as one JSON document written atomically with mode 0600 in the agent's data dir (the
folder is 0700 and already holds the agent's own key, whose holder could obtain all of these
SVIDs from the server anyway). Off by default: the workload keys then never touch the disk.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ca.keys import write_private_file

from .cache import HeldX509
from .errors import AgentError
from .sync_state import AgentEntry, BundleDoc

FORMAT_VERSION = 1  # bump on any incompatible change; an unknown version is ignored


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _bundle(doc: BundleDoc) -> dict[str, Any]:
    return {
        "trust_domain": doc.trust_domain,
        "spiffe_bundle": _b64(doc.spiffe_bundle),
        "sequence": doc.sequence,
        "tainted": sorted(_b64(k) for k in doc.tainted),
    }


def _unbundle(d: dict[str, Any]) -> BundleDoc:
    return BundleDoc(
        d["trust_domain"],
        _unb64(d["spiffe_bundle"]),
        int(d["sequence"]),
        frozenset(_unb64(k) for k in d["tainted"]),
    )


def save(
    path: Path,
    *,
    revision: int,
    entries: dict[str, AgentEntry],
    svids: dict[str, HeldX509],
    bundle: BundleDoc | None,
    federated: dict[str, BundleDoc],
) -> None:
    doc = {
        "version": FORMAT_VERSION,
        "revision": revision,
        "entries": [{**asdict(e), "selectors": sorted(e.selectors)} for e in entries.values()],
        "svids": [
            {
                **asdict(s),
                "cert_chain": [_b64(c) for c in s.cert_chain],
                "private_key": _b64(s.private_key),
                "authority_key_id": _b64(s.authority_key_id) if s.authority_key_id else None,
            }
            for s in svids.values()
        ],
        "bundle": _bundle(bundle) if bundle else None,
        "federated": [_bundle(b) for b in federated.values()],
    }
    write_private_file(path, json.dumps(doc, separators=(",", ":")).encode())


def load(
    path: Path,
) -> tuple[int, dict[str, AgentEntry], dict[str, HeldX509], BundleDoc | None, dict[str, BundleDoc]]:
    """Read the file written by ``save``; ``AgentError`` if it is unusable."""
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("version") != FORMAT_VERSION:
            raise AgentError(f"{path}: unknown format version {doc.get('version')!r}")
        entries = {}
        for e in doc["entries"]:
            entry = AgentEntry(
                **{
                    **e,
                    "selectors": frozenset(e["selectors"]),
                    "dns_names": tuple(e["dns_names"]),
                    "federates_with": tuple(e["federates_with"]),
                }
            )
            entries[entry.id] = entry
        svids = {}
        for s in doc["svids"]:
            held = HeldX509(
                entry_id=s["entry_id"],
                entry_revision=int(s["entry_revision"]),
                cert_chain=tuple(_unb64(c) for c in s["cert_chain"]),
                private_key=_unb64(s["private_key"]),
                not_before=float(s["not_before"]),
                not_after=float(s["not_after"]),
                authority_key_id=_unb64(s["authority_key_id"]) if s["authority_key_id"] else None,
            )
            svids[held.entry_id] = held
        bundle = _unbundle(doc["bundle"]) if doc["bundle"] else None
        federated = {b.trust_domain: b for b in map(_unbundle, doc["federated"])}
        return int(doc["revision"]), entries, svids, bundle, federated
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AgentError(f"{path}: unusable SVID cache: {err}") from err
