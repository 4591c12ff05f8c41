"""SPIFFE authentication of peers: a pure table over real and forged chains."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tls_proxy import PeerRejected, RejectReason, verify_peer

from ._pki import CLIENT, TD, WEB, forge_leaf, mint, new_authority

OURS = new_authority(TD)
PARTNER = new_authority("partner.org")
STRANGER = new_authority(TD)  # another CA claiming our trust domain
BUNDLES = {TD: (OURS.cert,), "partner.org": (PARTNER.cert,)}
NOW = datetime.now(UTC)  # a base for minting; checks use the time they run at
DER = Encoding.DER


def test_valid_svid_of_our_trust_domain_is_accepted() -> None:
    svid = mint(OURS, WEB)
    assert str(verify_peer(svid.chain_der, BUNDLES, now=datetime.now(UTC))) == WEB


def test_federated_peer_verifies_against_its_own_bundle() -> None:
    svid = mint(PARTNER, "spiffe://partner.org/api")
    peer = verify_peer(
        svid.chain_der, BUNDLES, now=datetime.now(UTC), expect_ids={"spiffe://partner.org/api"}
    )
    assert str(peer) == "spiffe://partner.org/api"


def test_chain_including_its_root_is_accepted() -> None:
    svid = mint(OURS, WEB)
    chain = [
        *svid.chain_der,
        OURS.cert.public_bytes(DER),
    ]
    assert str(verify_peer(chain, BUNDLES, now=datetime.now(UTC))) == WEB


CASES = [
    ("no-certificate", lambda: [], {}, RejectReason.NO_CLIENT_CERTIFICATE, "no certificate"),
    (
        "other-td-signed-by-our-root",
        lambda: forge_leaf(OURS, ["spiffe://partner.org/api"]).chain_der,
        {},
        RejectReason.WRONG_TRUST_DOMAIN,
        "signed by an authority of trust domain 'example.org'",
    ),
    (
        "trust-domain-without-bundle",
        lambda: mint(new_authority("other.org"), "spiffe://other.org/x").chain_der,
        {},
        RejectReason.WRONG_TRUST_DOMAIN,
        "no bundle",
    ),
    (
        "unknown-ca-same-trust-domain",
        lambda: mint(STRANGER, WEB).chain_der,
        {},
        RejectReason.UNKNOWN_CA,
        "unknown authority",
    ),
    (
        "two-uri-sans",
        lambda: forge_leaf(OURS, [WEB, CLIENT]).chain_der,
        {},
        RejectReason.NOT_AN_SVID,
        "URI",
    ),
    (
        "expired",
        lambda: mint(OURS, WEB, not_before=NOW - timedelta(hours=3)).chain_der,
        {},
        RejectReason.EXPIRED,
        "expired at",
    ),
    (
        "unexpected-id",
        lambda: mint(OURS, CLIENT).chain_der,
        {"expect_ids": {WEB}},
        RejectReason.UNEXPECTED_ID,
        "expected one of",
    ),
    (
        "a-ca-certificate-is-not-an-svid",
        lambda: [OURS.cert.public_bytes(DER)],
        {},
        RejectReason.NOT_AN_SVID,
        "non-root path",
    ),
    ("garbage", lambda: [b"not a certificate"], {}, RejectReason.NOT_AN_SVID, "unparsable"),
]


@pytest.mark.parametrize(
    ("chain", "options", "reason", "detail"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rejections_name_their_reason(chain, options, reason, detail) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PeerRejected, match=detail) as caught:
        verify_peer(chain(), BUNDLES, now=datetime.now(UTC), **options)
    assert caught.value.reason is reason
