"""Response composition: from a snapshot and a workload's selectors to Workload API messages.

Pure: takes values, returns values, no I/O, no clock, no logging. The server attests the caller,
asks this module what the caller may have, and sends the result. The rules (SPIFFE Workload API
§5 and SPIRE's practice):

- An identity matches when *all* its selectors are among the workload's. An identity without
  selectors matches nobody (fail closed: an empty set would otherwise match every process).
- Matched identities keep snapshot order; the first is the default identity (§5.3).
- Hints are unique within a response: an identity whose non-empty hint repeats an earlier
  matched one is dropped (the caller may log ``Match.dropped``).
- Bundle maps are keyed by trust domain ID (``spiffe://name``). Federated bundles are those of the
  union of the matched identities' ``federates_with``, in first-mention order; trust domains the
  snapshot holds no bundle for are skipped, and so is our own (it travels in ``bundle``).

It must not decide *who* the caller is (attestation) nor how SVIDs are obtained (the provider).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

import jwt
from spiffe import JwtBundle, JwtBundleSet, JwtSvid, SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from ._messages import (
    JWTSVID,
    X509SVID,
    JWTBundlesResponse,
    JWTSVIDRequest,
    JWTSVIDResponse,
    ValidateJWTSVIDRequest,
    ValidateJWTSVIDResponse,
    X509BundlesResponse,
    X509SVIDResponse,
)
from .errors import InvalidRequest, NoIdentity
from .provider import JwtIdentity, Snapshot, X509Identity

TRUST_DOMAIN_ID_PREFIX = "spiffe://"  # bundle maps are keyed by trust domain ID (Workload API §5)
NO_IDENTITY = "no identity issued"  # SPIRE's words: clients and operators recognise them


@dataclass(frozen=True)
class Match:
    """What a workload's selectors select from a snapshot."""

    identities: tuple[X509Identity, ...]  # snapshot order; the first is the default identity
    dropped: tuple[X509Identity, ...] = ()  # matched, but their hint repeated an earlier one

    @property
    def default(self) -> X509Identity | None:
        return self.identities[0] if self.identities else None


def match_identities(snapshot: Snapshot, selectors: Set[str]) -> Match:
    """The identities whose selectors are all among ``selectors``, hints made unique."""
    kept: list[X509Identity] = []
    dropped: list[X509Identity] = []
    hints: set[str] = set()
    for identity in snapshot.identities:
        if not identity.selectors or not identity.selectors <= selectors:
            continue
        if identity.hint:
            if identity.hint in hints:
                dropped.append(identity)
                continue
            hints.add(identity.hint)
        kept.append(identity)
    return Match(tuple(kept), tuple(dropped))


def trust_domain_id(name: str) -> str:
    """``example.org`` -> ``spiffe://example.org``, the key of every bundle map."""
    return TRUST_DOMAIN_ID_PREFIX + name


def federated_trust_domains(snapshot: Snapshot, identities: Iterable[X509Identity]) -> list[str]:
    """Names of the foreign trust domains the identities federate with, first mention first."""
    names: dict[str, None] = {}
    for identity in identities:
        for name in identity.federates_with:
            if name != snapshot.trust_domain:
                names.setdefault(name)
    return list(names)


def _bundles(
    snapshot: Snapshot, bundles: Mapping[str, bytes], match: Match, *, own: bool
) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if own and snapshot.trust_domain in bundles:
        out[trust_domain_id(snapshot.trust_domain)] = bundles[snapshot.trust_domain]
    for name in federated_trust_domains(snapshot, match.identities):
        if name in bundles:
            out[trust_domain_id(name)] = bundles[name]
    return out


def x509_svid_response(snapshot: Snapshot, match: Match) -> X509SVIDResponse:
    """FetchX509SVID: every matched SVID with our bundle, plus the federated bundles.

    Raises ``NoIdentity`` when nothing matched (the peer gets ``PermissionDenied``).
    """
    if not match.identities:
        raise NoIdentity(NO_IDENTITY)
    own_bundle = snapshot.x509_bundles.get(snapshot.trust_domain, b"")
    return X509SVIDResponse(
        svids=[
            X509SVID(
                spiffe_id=identity.spiffe_id,
                x509_svid=b"".join(identity.cert_chain),
                x509_svid_key=identity.private_key,
                bundle=own_bundle,
                hint=identity.hint,
            )
            for identity in match.identities
        ],
        federated_bundles=_bundles(snapshot, snapshot.x509_bundles, match, own=False),
    )


def x509_bundles_response(
    snapshot: Snapshot, match: Match, *, allow_unidentified: bool = False
) -> X509BundlesResponse:
    """FetchX509Bundles: our bundle and the federated bundles the workload is entitled to.

    Without a matched identity this raises ``NoIdentity`` unless ``allow_unidentified`` (SPIRE's
    ``allow_unauthenticated_verifiers``), in which case the caller gets our bundle only.
    """
    if not match.identities and not allow_unidentified:
        raise NoIdentity(NO_IDENTITY)
    return X509BundlesResponse(bundles=_bundles(snapshot, snapshot.x509_bundles, match, own=True))


def jwt_bundles_response(
    snapshot: Snapshot, match: Match, *, allow_unidentified: bool = False
) -> JWTBundlesResponse:
    """FetchJWTBundles: as ``x509_bundles_response``, from the JWKS documents."""
    if not match.identities and not allow_unidentified:
        raise NoIdentity(NO_IDENTITY)
    return JWTBundlesResponse(bundles=_bundles(snapshot, snapshot.jwt_bundles, match, own=True))


def _audiences(values: Sequence[str]) -> tuple[str, ...]:
    if not values:
        raise InvalidRequest("audience: at least one audience is required (JWT-SVID §3.2)")
    if any(not value for value in values):
        raise InvalidRequest("audience: every audience must be non-empty (JWT-SVID §3.2)")
    return tuple(dict.fromkeys(values))


def jwt_svid_targets(
    request: JWTSVIDRequest, match: Match
) -> tuple[tuple[str, ...], tuple[X509Identity, ...]]:
    """FetchJWTSVID, first half: the audiences and the identities to mint JWT-SVIDs for.

    With ``spiffe_id`` set: the first matched identity with that ID, else ``NoIdentity``; without
    it: every matched identity. The server then asks the provider for one token each.
    """
    audiences = _audiences(request.audience)
    if request.spiffe_id:
        try:
            SpiffeId(request.spiffe_id)
        except PySpiffeError as err:
            raise InvalidRequest(f"spiffe_id: {err}") from err
        for identity in match.identities:
            if identity.spiffe_id == request.spiffe_id:
                return audiences, (identity,)
        raise NoIdentity(NO_IDENTITY)
    if not match.identities:
        raise NoIdentity(NO_IDENTITY)
    return audiences, match.identities


def jwt_svid_response(
    minted: Iterable[tuple[X509Identity, JwtIdentity]],
) -> JWTSVIDResponse:
    """FetchJWTSVID, second half: the tokens, with each identity's (unique) hint."""
    return JWTSVIDResponse(
        svids=[
            JWTSVID(spiffe_id=token.spiffe_id, svid=token.token, hint=identity.hint)
            for identity, token in minted
        ]
    )


def jwt_bundle_set(snapshot: Snapshot, match: Match) -> JwtBundleSet:
    """The JWT authorities a workload may validate against, as a py-spiffe ``JwtBundleSet``."""
    bundles = _bundles(snapshot, snapshot.jwt_bundles, match, own=True)
    parsed: dict[TrustDomain, JwtBundle] = {}
    for key, document in bundles.items():
        trust_domain = TrustDomain(key)
        parsed[trust_domain] = JwtBundle.parse(trust_domain, document)
    return JwtBundleSet(parsed)


def validate_jwt_svid(
    request: ValidateJWTSVIDRequest,
    snapshot: Snapshot,
    match: Match,
    *,
    allow_unidentified: bool = False,
) -> ValidateJWTSVIDResponse:
    """ValidateJWTSVID: check the token with py-spiffe against the workload's JWT bundles.

    ``InvalidRequest`` for a missing field or an invalid token (the reason is py-spiffe's);
    ``NoIdentity`` for a caller without identity unless ``allow_unidentified``.
    """
    if not request.audience:
        raise InvalidRequest("audience: required (JWT-SVID §3.2)")
    if not request.svid:
        raise InvalidRequest("svid: required")
    if not match.identities and not allow_unidentified:
        raise NoIdentity(NO_IDENTITY)
    bundles = jwt_bundle_set(snapshot, match)
    try:
        # The subject names the trust domain whose authorities must have signed the token; it is
        # read unverified only to pick the bundle, then py-spiffe verifies everything.
        subject = SpiffeId(_unverified_claims(request.svid).get("sub") or "")
        bundle = bundles.get_bundle_for_trust_domain(subject.trust_domain)
        if bundle is None:
            raise InvalidRequest(
                f"svid: no JWT bundle for trust domain {subject.trust_domain} "
                "(JWT-SVID §7: validate against the subject's trust domain)"
            )
        svid = JwtSvid.parse_and_validate(request.svid, bundle, {request.audience})
    except (PySpiffeError, jwt.PyJWTError) as err:
        raise InvalidRequest(f"svid: {err}") from err
    claims = _unverified_claims(svid.token)  # the token just verified: these claims are signed
    response = ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id))
    response.claims.update(claims)
    return response


def _unverified_claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims
