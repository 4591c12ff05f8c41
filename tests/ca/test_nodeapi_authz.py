"""The pure parts of the node API: the authorization walk, x509pop rules, message chunking."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpclib.protocol import Peer
from grpclib.server import Server
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe import SpiffeId, TrustDomain

from ca.config import load_server_config
from ca.entries import RESERVED_DNS_NAMES, EntrySpec, RegistrationEntry, Selector, validate_entry
from ca.errors import InvalidArgument
from ca.keys import KeyType, generate_key
from ca.nodeapi.attestation import (
    NodeCertificate,
    load_provisioning_cas,
    parse_node_chain,
    verify_challenge_response,
    verify_node_chain,
)
from ca.nodeapi.authz import Agent, Authorization, Denial, Grant, Rule, authorize
from ca.nodeapi.errors import Refused
from ca.nodeapi.messages import CHUNK_BYTES, sync_responses
from ca.nodeapi.sync import BundleDoc, Update
from ca.server_identity import SERVER_TLS_NAME
from tests.ca.nodeapi_support import ProvisioningCa

TD = "spiffe://example.org"
SERVER = f"{TD}/meshid/server"
AGENT = f"{TD}/meshid/agent/join_token/a"


def _e(entry_id: str, spiffe: str, parent: str, *selectors: str) -> RegistrationEntry:
    return RegistrationEntry(
        id=entry_id,
        spiffe_id=SpiffeId(spiffe if spiffe.startswith("spiffe://") else f"{TD}/{spiffe}"),
        parent_id=SpiffeId(parent if parent.startswith("spiffe://") else f"{TD}/{parent}"),
        selectors=tuple(Selector.parse(s) for s in (selectors or ("unix:uid:1",))),
        x509_svid_ttl=None,
        jwt_svid_ttl=None,
    )


def _walk(agent: Agent, entries: Iterable[RegistrationEntry]) -> Authorization:
    by_parent: dict[str, list[RegistrationEntry]] = defaultdict(list)
    for entry in entries:
        by_parent[str(entry.parent_id)].append(entry)

    def children_of(ids: Collection[str]) -> list[RegistrationEntry]:
        return [e for i in ids for e in by_parent.get(i, [])]

    return authorize(agent, SERVER, children_of)


PLAIN = Agent(AGENT)
ALIASED = Agent(AGENT, aliases=frozenset({f"{TD}/cluster/blue"}))
NODE = Agent(AGENT, node_selectors=frozenset({"x509pop:subject:cn:n1", "x509pop:san:dns:n1.x"}))

CASES = [
    # (agent, entries, {authorized id: rule})
    (PLAIN, [_e("1", "web", AGENT)], {"1": Rule.AGENT}),
    (PLAIN, [_e("1", "web", f"{TD}/meshid/agent/join_token/b")], {}),
    (
        PLAIN,
        [_e("1", "web", AGENT), _e("2", "side", "web"), _e("3", "deep", "side")],
        {"1": Rule.AGENT, "2": Rule.DESCENDANT, "3": Rule.DESCENDANT},
    ),
    # a cycle: web -> side -> web; the walk ends, each entry once
    (
        PLAIN,
        [_e("1", "web", AGENT), _e("2", "side", "web"), _e("3", "web", "side")],
        {"1": Rule.AGENT, "2": Rule.DESCENDANT, "3": Rule.DESCENDANT},
    ),
    # a cycle not reachable from the agent stays out
    (PLAIN, [_e("1", "x", "y"), _e("2", "y", "x")], {}),
    (
        ALIASED,
        [_e("1", "app", "cluster/blue"), _e("2", "app2", "app")],
        {"1": Rule.ALIAS, "2": Rule.DESCENDANT},
    ),
    (PLAIN, [_e("1", "app", "cluster/blue")], {}),
    # node entries: all selectors among the node's
    (
        NODE,
        [
            _e("n", "fleet", SERVER, "x509pop:subject:cn:n1"),
            _e("m", "fleet2", SERVER, "x509pop:subject:cn:n1", "x509pop:san:dns:n1.x"),
            _e("x", "other", SERVER, "x509pop:subject:cn:n1", "x509pop:san:dns:other"),
            _e("1", "app", "fleet"),
            _e("2", "app-of-other", "other"),
        ],
        {"n": Rule.NODE_ENTRY, "m": Rule.NODE_ENTRY, "1": Rule.NODE_ALIAS},
    ),
    # a node without selectors matches no node entry
    (PLAIN, [_e("n", "fleet", SERVER, "x509pop:subject:cn:n1")], {}),
    # an entry parented by the server is never a plain descendant
    (PLAIN, [_e("1", "web", AGENT), _e("2", "x", SERVER)], {"1": Rule.AGENT}),
    # an alias can never stand in for the server or another agent
    (
        Agent(AGENT, aliases=frozenset({SERVER, f"{TD}/meshid/agent/x509pop/other"})),
        [_e("1", "a", SERVER, "unix:uid:1"), _e("2", "b", f"{TD}/meshid/agent/x509pop/other")],
        {},
    ),
    # two entries with the same SPIFFE ID under different parents: both paths count
    (
        PLAIN,
        [_e("1", "web", AGENT), _e("2", "web", "elsewhere"), _e("3", "side", "web")],
        {"1": Rule.AGENT, "3": Rule.DESCENDANT},
    ),
]


@pytest.mark.parametrize(
    ("agent", "entries", "expected"),
    CASES,
    ids=[
        "direct",
        "other-agent",
        "transitive",
        "cycle",
        "unreachable-cycle",
        "alias",
        "alias-not-held",
        "node-entries",
        "no-node-selectors",
        "server-children-only-by-selectors",
        "reserved-aliases-ignored",
        "same-id-elsewhere",
    ],
)
def test_walk(agent: Agent, entries: list[RegistrationEntry], expected: dict[str, Rule]) -> None:
    result = _walk(agent, entries)
    assert {i: g.rule for i, g in result.grants.items()} == expected
    for entry in entries:
        verdict = result.check(entry.id)
        if entry.id in expected:
            assert isinstance(verdict, Grant) and verdict.entry == entry
        else:
            assert verdict == Denial(entry.id, "entry not authorized for this agent")


_ids = st.sampled_from(["a", "b", "c", "d", "e", "f"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_ids, st.one_of(_ids, st.just("AGENT"))), max_size=25))
def test_the_walk_is_the_closure_from_the_agent(edges: list[tuple[str, str]]) -> None:
    entries = [
        _e(str(n), child, AGENT if parent == "AGENT" else parent)
        for n, (child, parent) in enumerate(edges)
    ]
    result = _walk(PLAIN, entries)
    # The reference: a fixed point computed the slow way.
    reachable = {AGENT}
    changed = True
    while changed:
        changed = False
        for entry in entries:
            if str(entry.parent_id) in reachable and str(entry.spiffe_id) not in reachable:
                reachable.add(str(entry.spiffe_id))
                changed = True
    expected = {e.id for e in entries if str(e.parent_id) in reachable}
    assert set(result.grants) == expected
    assert result.parent_ids <= reachable


# -- x509pop --------------------------------------------------------------------------------
NOW = datetime.now(UTC)


def test_node_selectors_and_fingerprints() -> None:
    root = ProvisioningCa.create()
    inter = root.intermediate()
    node = inter.node("node-1", ("a.example", "b.example"))
    verified = verify_node_chain(
        parse_node_chain(node.pem(inter.certificate)), (root.certificate,), NOW
    )
    assert [c.subject for c in verified.path] == [
        node.certificate.subject,
        inter.certificate.subject,
        root.certificate.subject,
    ]
    selectors = verified.selectors()
    assert selectors[0] == "x509pop:subject:cn:node-1"
    assert sum(s.startswith("x509pop:ca:fingerprint:") for s in selectors) == 2
    assert selectors[-2:] == ("x509pop:san:dns:a.example", "x509pop:san:dns:b.example")


def _leaf(root: ProvisioningCa, **extensions: x509.ExtensionType) -> bytes:
    key = generate_key(KeyType.EC_P256)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n")]))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(root.certificate.not_valid_before_utc)
        .not_valid_after(root.certificate.not_valid_after_utc)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), False
        )
    )
    for ext in extensions.values():
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(root.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("extensions", "ok"),
    [
        ({}, True),
        ({"eku": x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])}, True),
        ({"eku": x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])}, False),
        ({"bc": x509.BasicConstraints(ca=True, path_length=None)}, False),
        (
            {"ku": x509.KeyUsage(False, False, True, False, False, False, False, False, False)},
            False,
        ),
    ],
    ids=["plain", "client-auth", "server-auth-only", "ca-leaf", "no-digital-signature"],
)
def test_node_certificate_rules(extensions: dict[str, x509.ExtensionType], ok: bool) -> None:
    root = ProvisioningCa.create()
    chain = parse_node_chain(_leaf(root, **extensions))
    if ok:
        verify_node_chain(chain, (root.certificate,), NOW)
    else:
        with pytest.raises(Refused, match="node certificate"):
            verify_node_chain(chain, (root.certificate,), NOW)


def test_challenge_signatures() -> None:
    root = ProvisioningCa.create()
    for key_type in (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048):
        node = root.node("n", (), key_type)
        verified = NodeCertificate(node.certificate, (node.certificate, root.certificate))
        verify_challenge_response(verified, b"c" * 32, node.sign(b"c" * 32))
        with pytest.raises(Refused, match="does not verify"):
            verify_challenge_response(verified, b"d" * 32, node.sign(b"c" * 32))
        with pytest.raises(Refused):
            verify_challenge_response(verified, b"c" * 32, b"")


def test_node_chain_parsing() -> None:
    with pytest.raises(InvalidArgument, match=r"params\.payload"):
        parse_node_chain(b"")
    with pytest.raises(InvalidArgument, match="PEM"):
        parse_node_chain(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# -- messages -------------------------------------------------------------------------------
def _bulk(count: int, selectors: int = 1) -> tuple[RegistrationEntry, ...]:
    return tuple(
        _e(f"{i:05d}", f"w/{i}", AGENT, *(f"k8s:label:{'x' * 900}{j}" for j in range(selectors)))
        for i in range(count)
    )


def test_sync_messages_are_chunked_by_count_and_size() -> None:
    bundle = BundleDoc("example.org", b"{}", 4)
    full = sync_responses(Update(9, True, _bulk(2500), (), bundle, (), 9))
    assert [len(m.upserts) for m in full] == [1000, 1000, 500]
    assert [m.more for m in full] == [True, True, False]
    assert all(m.full and m.revision == 9 for m in full)
    assert full[0].HasField("bundle") and full[0].federated_bundles_set
    assert not full[1].HasField("bundle") and not full[1].federated_bundles_set
    big = sync_responses(Update(9, True, _bulk(200, selectors=20)))
    assert len(big) > 1 and all(m.ByteSize() <= CHUNK_BYTES + 64 * 1024 for m in big)
    # An incremental update cut in the middle must not advance the agent's revision.
    inc = sync_responses(Update(12, False, _bulk(1500), ("gone",), None, None, 7))
    assert [m.revision for m in inc] == [7, 7, 12]
    assert list(inc[-1].deleted_ids) == ["gone"] and not inc[0].full
    [empty] = sync_responses(Update(5, False, federated=()))
    assert empty.federated_bundles_set and not empty.more and empty.revision == 5


# -- contracts with other modules ---------------------------------------------------------------
def test_the_server_tls_name_is_reserved_for_the_server() -> None:
    assert SERVER_TLS_NAME in RESERVED_DNS_NAMES
    spec = EntrySpec("spiffe://example.org/web", AGENT, ["unix:uid:1"], dns_names=["Meshid-Server"])
    with pytest.raises(InvalidArgument, match="reserved"):
        validate_entry(spec, TrustDomain("example.org"))


def test_grpclib_still_has_what_the_node_api_relies_on() -> None:
    """``ca/nodeapi/server.py`` reads ``Peer._transport`` and overrides
    ``Server._protocol_factory``; fail here, plainly, if a grpclib release renames them."""
    assert callable(getattr(Server, "_protocol_factory", None))
    sentinel = object()
    assert Peer(sentinel)._transport is sentinel  # type: ignore[arg-type]


def test_the_provisioning_ca_bundle_option(tmp_path: Path) -> None:
    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(ProvisioningCa.create().certificate.public_bytes(serialization.Encoding.PEM))
    config = load_server_config(
        None,
        {"trust_domain": "example.org", "data_dir": tmp_path, "x509pop_ca_bundle": bundle},
    )
    assert config.x509pop_ca_bundle == bundle
    assert len(load_provisioning_cas(bundle.read_bytes(), str(bundle))) == 1
    with pytest.raises(InvalidArgument, match="x509pop_ca_bundle"):
        load_provisioning_cas(b"not PEM", "cas.pem")
