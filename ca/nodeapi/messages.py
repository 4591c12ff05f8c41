"""Protobuf encoding of the node API's answers (``node.proto``).

Owns the mapping from domain values to messages and the split of one sync update into
responses: at most ``CHUNK_ENTRIES`` entries and about ``CHUNK_BYTES`` per message, so no
update, however large, meets a gRPC message-size limit (grpcio's default receive limit is 4 MiB).
Trust domains are named without the scheme (``example.org``), as in ``federates_with``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..entries import RegistrationEntry
from . import node_pb2
from .policy_stream import PolicySet
from .service import AgentSvid
from .sync import BundleDoc, Update, own_bundle_doc

CHUNK_ENTRIES = 1000  # entries per sync message
CHUNK_BYTES = 1024 * 1024  # and about this many bytes, whichever comes first
CHUNK_DELETED = 10_000  # deleted IDs per sync message (~40 bytes each)


def der_chain(chain: Sequence[x509.Certificate]) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in chain]


def bundle_message(doc: BundleDoc) -> node_pb2.Bundle:
    return node_pb2.Bundle(
        trust_domain=doc.trust_domain,
        spiffe_bundle=doc.document,
        sequence=doc.sequence,
        tainted_key_ids=list(doc.tainted),
    )


def policy_set_message(policy_set: PolicySet) -> node_pb2.PolicySet:
    return node_pb2.PolicySet(
        revision=policy_set.revision,
        policies=[
            node_pb2.StoredPolicy(name=p.name, document_json=p.document_json)
            for p in policy_set.policies
        ],
    )


def agent_svid_message(svid: AgentSvid) -> node_pb2.AgentSvid:
    return node_pb2.AgentSvid(
        spiffe_id=str(svid.spiffe_id),
        cert_chain=der_chain(svid.chain),
        selectors=list(svid.selectors),
        bundle=bundle_message(own_bundle_doc(svid.bundle)),
    )


def entry_message(entry: RegistrationEntry) -> node_pb2.Entry:
    return node_pb2.Entry(
        id=entry.id,
        spiffe_id=str(entry.spiffe_id),
        parent_id=str(entry.parent_id),
        selectors=[str(s) for s in entry.selectors],
        x509_svid_ttl=int(entry.x509_svid_ttl.total_seconds()) if entry.x509_svid_ttl else 0,
        jwt_svid_ttl=int(entry.jwt_svid_ttl.total_seconds()) if entry.jwt_svid_ttl else 0,
        dns_names=list(entry.dns_names),
        hint=entry.hint,
        admin=entry.admin,
        downstream=entry.downstream,
        federates_with=[td.name for td in entry.federates_with],
        expires_at=int(entry.expires_at.timestamp()) if entry.expires_at else 0,
        revision=entry.revision,
    )


def _entry_chunks(entries: Sequence[RegistrationEntry]) -> Iterator[list[node_pb2.Entry]]:
    chunk: list[node_pb2.Entry] = []
    size = 0
    for entry in entries:
        message = entry_message(entry)
        message_size = message.ByteSize()
        if chunk and (len(chunk) >= CHUNK_ENTRIES or size + message_size > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(message)
        size += message_size
    if chunk:
        yield chunk


def sync_responses(update: Update) -> list[node_pb2.SyncEntriesResponse]:
    """The messages of one update, in order; ``more`` on all but the last.

    The first carries the bundles. A full snapshot's messages all carry the new revision (the
    agent applies the snapshot at the last one); an incremental update's continuation messages
    carry the previous revision and only the last one the new revision.
    """
    responses: list[node_pb2.SyncEntriesResponse] = []
    for chunk in _entry_chunks(update.upserts):
        responses.append(node_pb2.SyncEntriesResponse(upserts=chunk))
    deleted = list(update.deleted_ids)
    for start in range(0, len(deleted), CHUNK_DELETED):
        responses.append(
            node_pb2.SyncEntriesResponse(deleted_ids=deleted[start : start + CHUNK_DELETED])
        )
    if not responses:
        responses.append(node_pb2.SyncEntriesResponse())
    first = responses[0]
    if update.bundle is not None:
        first.bundle.CopyFrom(bundle_message(update.bundle))
    if update.federated is not None:
        first.federated_bundles.extend(bundle_message(b) for b in update.federated)
        first.federated_bundles_set = True
    last = len(responses) - 1
    for index, response in enumerate(responses):
        response.full = update.full
        response.more = index < last
        final = index == last or update.full
        response.revision = update.revision if final else update.previous_revision
    return responses
