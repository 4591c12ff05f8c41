"""Response composition, table-driven: matching, default identity, hints, bundles, JWT rules.

No I/O: snapshots hold real SVIDs and bundles from our CA code, composition returns messages.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.json_format import MessageToDict
from hypothesis import given
from hypothesis import strategies as st
from spiffe import SpiffeId

from ca.jwtsvid import sign_jwt_svid
from workload_api import compose
from workload_api._messages import JWTSVIDRequest, ValidateJWTSVIDRequest
from workload_api.errors import InvalidRequest, NoIdentity
from workload_api.provider import JwtIdentity, Snapshot, X509Identity

from . import _pki
from ._pki import ADMIN, DB, OTHER, PARTNER, TD, WEB


def _ident(
    spiffe_id: str,
    selectors: set[str],
    *,
    entry_id: str,
    hint: str = "",
    federates_with: tuple[str, ...] = (),
) -> X509Identity:
    # Composition only copies bytes around: placeholder DER keeps the table fast and readable.
    return X509Identity(
        entry_id=entry_id,
        spiffe_id=spiffe_id,
        selectors=frozenset(selectors),
        cert_chain=(f"leaf-{entry_id}".encode(), b"intermediate"),
        private_key=f"key-{entry_id}".encode(),
        hint=hint,
        federates_with=federates_with,
    )


WEB_UID = _ident(WEB, {"unix:uid:1000"}, entry_id="e-web", federates_with=(PARTNER,))
WEB_K8S = _ident(WEB, {"k8s:ns:prod", "k8s:sa:web"}, entry_id="e-web-k8s", hint="internal")
DB_UID = _ident(DB, {"unix:uid:1000", "unix:gid:50"}, entry_id="e-db", hint="internal")
ADMIN_ID = _ident(
    ADMIN, {"unix:uid:0"}, entry_id="e-admin", hint="external", federates_with=(OTHER, "gone.org")
)
NO_SELECTORS = _ident("spiffe://example.org/anyone", set(), entry_id="e-empty")

SNAPSHOT = Snapshot(
    version=7,
    ready=True,
    trust_domain=TD,
    identities=(WEB_UID, WEB_K8S, DB_UID, ADMIN_ID, NO_SELECTORS),
    x509_bundles={TD: b"our-ders", PARTNER: b"partner-ders", OTHER: b"other-ders"},
    jwt_bundles={TD: b'{"keys":[]}', PARTNER: b'{"keys":[1]}', OTHER: b'{"keys":[2]}'},
)


@dataclass(frozen=True)
class MatchCase:
    id: str
    selectors: set[str]
    matched: tuple[str, ...]  # entry ids, in order
    dropped: tuple[str, ...] = ()
    federated: tuple[str, ...] = field(default=())


MATCH_CASES = [
    MatchCase("nothing", set(), ()),
    MatchCase("one selector of two is not enough", {"unix:gid:50"}, ()),
    MatchCase("all selectors of one entry", {"unix:uid:1000"}, ("e-web",), federated=(PARTNER,)),
    MatchCase(
        "a superset matches every entry it covers, in snapshot order",
        {"unix:uid:1000", "unix:gid:50", "unix:user:alice"},
        ("e-web", "e-db"),
        federated=(PARTNER,),
    ),
    MatchCase(
        "a repeated hint drops the later identity",
        {"unix:uid:1000", "unix:gid:50", "k8s:ns:prod", "k8s:sa:web"},
        ("e-web", "e-web-k8s"),
        dropped=("e-db",),
        federated=(PARTNER,),
    ),
    MatchCase(
        "federated bundles missing from the snapshot are skipped",
        {"unix:uid:0"},
        ("e-admin",),
        federated=(OTHER,),
    ),
    MatchCase(
        "an identity without selectors matches nobody",
        {"unix:uid:1000", "unix:uid:0", "unix:gid:50"},
        ("e-web", "e-db", "e-admin"),
        federated=(PARTNER, OTHER),
    ),
]


@pytest.mark.parametrize("case", MATCH_CASES, ids=lambda case: case.id)
def test_matching_default_identity_and_hints(case: MatchCase) -> None:
    match = compose.match_identities(SNAPSHOT, case.selectors)
    assert tuple(i.entry_id for i in match.identities) == case.matched
    assert tuple(i.entry_id for i in match.dropped) == case.dropped
    if not case.matched:
        assert match.default is None
        with pytest.raises(NoIdentity, match="no identity issued"):
            compose.x509_svid_response(SNAPSHOT, match)
        return
    assert match.default is match.identities[0]
    response = compose.x509_svid_response(SNAPSHOT, match)
    assert [svid.spiffe_id for svid in response.svids] == [i.spiffe_id for i in match.identities]
    hints = [svid.hint for svid in response.svids if svid.hint]
    assert len(hints) == len(set(hints)), "hints are unique within a response"
    assert dict(response.federated_bundles) == {
        f"spiffe://{name}": SNAPSHOT.x509_bundles[name] for name in case.federated
    }
    bundles = compose.x509_bundles_response(SNAPSHOT, match)
    assert dict(bundles.bundles) == {
        "spiffe://example.org": b"our-ders",
        **{f"spiffe://{name}": SNAPSHOT.x509_bundles[name] for name in case.federated},
    }
    jwt_bundles = compose.jwt_bundles_response(SNAPSHOT, match)
    assert list(jwt_bundles.bundles) == list(bundles.bundles)


def test_x509_svid_fields() -> None:
    match = compose.match_identities(SNAPSHOT, {"unix:uid:0"})
    (svid,) = compose.x509_svid_response(SNAPSHOT, match).svids
    assert svid.spiffe_id == ADMIN
    assert svid.x509_svid == b"leaf-e-admin" + b"intermediate"  # DER chain, leaf first
    assert svid.x509_svid_key == b"key-e-admin"
    assert svid.bundle == b"our-ders"
    assert svid.hint == "external"


@pytest.mark.parametrize(
    ("allow", "expected"),
    [(False, None), (True, {"spiffe://example.org"})],
    ids=["denied by default", "allowed: our bundle only"],
)
def test_bundles_for_a_caller_without_identity(allow: bool, expected: set[str] | None) -> None:
    match = compose.match_identities(SNAPSHOT, {"unix:uid:4242"})
    if expected is None:
        with pytest.raises(NoIdentity):
            compose.x509_bundles_response(SNAPSHOT, match)
        with pytest.raises(NoIdentity):
            compose.jwt_bundles_response(SNAPSHOT, match)
        return
    assert set(compose.x509_bundles_response(SNAPSHOT, match, allow_unidentified=True).bundles) == (
        expected
    )
    assert set(compose.jwt_bundles_response(SNAPSHOT, match, allow_unidentified=True).bundles) == (
        expected
    )


@pytest.mark.parametrize(
    ("selectors", "request_", "outcome"),
    [
        ({"unix:uid:1000"}, JWTSVIDRequest(audience=[]), InvalidRequest),
        ({"unix:uid:1000"}, JWTSVIDRequest(audience=["a", ""]), InvalidRequest),
        ({"unix:uid:1000"}, JWTSVIDRequest(audience=["a"], spiffe_id="not an id"), InvalidRequest),
        ({"unix:uid:7"}, JWTSVIDRequest(audience=["a"]), NoIdentity),
        ({"unix:uid:1000"}, JWTSVIDRequest(audience=["a"], spiffe_id=ADMIN), NoIdentity),
        ({"unix:uid:1000", "unix:gid:50"}, JWTSVIDRequest(audience=["a", "b"]), ("e-web", "e-db")),
        (
            {"unix:uid:1000", "unix:gid:50"},
            JWTSVIDRequest(audience=["a", "a"], spiffe_id=DB),
            ("e-db",),
        ),
    ],
    ids=[
        "audience required",
        "empty audience",
        "malformed spiffe_id",
        "no identity",
        "spiffe_id not among the caller's",
        "one JWT-SVID per matched identity",
        "the requested identity only",
    ],
)
def test_jwt_svid_targets(
    selectors: set[str],
    request_: JWTSVIDRequest,
    outcome: type[Exception] | tuple[str, ...],
) -> None:
    match = compose.match_identities(SNAPSHOT, selectors)
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            compose.jwt_svid_targets(request_, match)
        return
    audiences, targets = compose.jwt_svid_targets(request_, match)
    assert tuple(t.entry_id for t in targets) == outcome
    assert audiences == tuple(dict.fromkeys(request_.audience))


def test_jwt_svid_response_carries_each_identity_hint() -> None:
    response = compose.jwt_svid_response(
        [(DB_UID, JwtIdentity(DB, "token-db")), (WEB_UID, JwtIdentity(WEB, "token-web"))]
    )
    assert [(s.spiffe_id, s.svid, s.hint) for s in response.svids] == [
        (DB, "token-db", "internal"),
        (WEB, "token-web", ""),
    ]


# --- ValidateJWTSVID, with real keys and tokens ----------------------------------------------

REAL = _pki.snapshot([_ident(WEB, {"unix:uid:1"}, entry_id="w", federates_with=(PARTNER,))])


def _token(spiffe_id: str, audience: list[str], *, expires_in: timedelta = _pki.JWT_TTL) -> str:
    issuer = _pki.authority(SpiffeId(spiffe_id).trust_domain.name)
    now = datetime.now(UTC)
    return sign_jwt_svid(
        issuer.jwt_key,
        issuer.kid,
        SpiffeId(spiffe_id),
        audience,
        issued_at=now - timedelta(minutes=10),
        expires_at=now + expires_in,
    )


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = ADMIN
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_validate_returns_the_id_and_claims() -> None:
    match = compose.match_identities(REAL, {"unix:uid:1"})
    token = _token(DB, ["billing", "audit"])
    response = compose.validate_jwt_svid(
        ValidateJWTSVIDRequest(audience="billing", svid=token), REAL, match
    )
    assert response.spiffe_id == DB
    claims = MessageToDict(response.claims)
    assert claims["sub"] == DB
    assert claims["aud"] == ["billing", "audit"]
    assert isinstance(claims["exp"], float)


def test_validate_accepts_a_federated_token_of_an_entitled_workload() -> None:
    match = compose.match_identities(REAL, {"unix:uid:1"})
    token = _token("spiffe://partner.org/api", ["web"])
    response = compose.validate_jwt_svid(
        ValidateJWTSVIDRequest(audience="web", svid=token), REAL, match
    )
    assert response.spiffe_id == "spiffe://partner.org/api"


@pytest.mark.parametrize(
    ("audience", "svid", "reason"),
    # Tokens are minted when the test runs, not when it is collected: a whole suite takes longer
    # than a token lives.
    [
        ("", lambda: _token(WEB, ["a"]), "audience: required"),
        ("a", lambda: "", "svid: required"),
        ("a", lambda: "not.a.jwt", "svid: "),
        ("b", lambda: _token(WEB, ["a"]), "svid: .*[Aa]udience"),
        ("a", lambda: _token(WEB, ["a"], expires_in=-timedelta(minutes=1)), "svid: .*expired"),
        ("a", lambda: _tampered(_token(WEB, ["a"])), "svid: .*[Ss]ignature"),
        (
            "a",
            lambda: _token("spiffe://other.org/x", ["a"]),
            "svid: no JWT bundle for trust domain",
        ),
    ],
    ids=[
        "audience missing",
        "token missing",
        "garbage",
        "wrong audience",
        "expired",
        "forged subject",
        "trust domain not federated with",
    ],
)
def test_validate_refuses_with_the_reason(
    audience: str, svid: Callable[[], str], reason: str
) -> None:
    match = compose.match_identities(REAL, {"unix:uid:1"})
    request = ValidateJWTSVIDRequest(audience=audience, svid=svid())
    with pytest.raises(InvalidRequest, match=reason):
        compose.validate_jwt_svid(request, REAL, match)


def test_validate_needs_an_identity_unless_allowed() -> None:
    match = compose.match_identities(REAL, {"unix:uid:2"})
    request = ValidateJWTSVIDRequest(audience="a", svid=_token(WEB, ["a"]))
    with pytest.raises(NoIdentity):
        compose.validate_jwt_svid(request, REAL, match)
    response = compose.validate_jwt_svid(request, REAL, match, allow_unidentified=True)
    assert response.spiffe_id == WEB


# --- properties --------------------------------------------------------------------------------

_SELECTOR = st.sampled_from([f"unix:uid:{n}" for n in range(4)] + ["k8s:ns:a", "k8s:ns:b"])


@given(
    entries=st.lists(
        st.tuples(st.frozensets(_SELECTOR, max_size=3), st.sampled_from(["", "x", "y"])),
        max_size=8,
    ),
    workload=st.frozensets(_SELECTOR),
)
def test_matching_properties(
    entries: list[tuple[frozenset[str], str]], workload: frozenset[str]
) -> None:
    identities = tuple(
        _ident(f"spiffe://example.org/w{n}", set(sel), entry_id=f"e{n}", hint=hint)
        for n, (sel, hint) in enumerate(entries)
    )
    snap = Snapshot(version=1, ready=True, trust_domain=TD, identities=identities)
    match = compose.match_identities(snap, workload)
    kept = [i for i in identities if i in match.identities]
    assert list(match.identities) == kept, "snapshot order is kept"
    for identity in match.identities + match.dropped:
        assert identity.selectors and identity.selectors <= workload
    hints = [i.hint for i in match.identities if i.hint]
    assert len(hints) == len(set(hints))
    assert {i.hint for i in match.dropped} <= set(hints)
