"""JWT-SVID request principals through two real proxies: client → outbound → mTLS → inbound.

The inbound proxy holds a JWT bundle file (``jwt.bundle``) of a test authority; tokens are
minted with ``ca.jwtsvid.sign_jwt_svid`` and carried in ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from spiffe import SpiffeId, TrustDomain

from ca.bundle import TrustBundle, to_spiffe_json
from ca.jwtsvid import new_kid, sign_jwt_svid
from ca.keys import KeyType, PrivateKey, generate_key
from tls_proxy.jwt_auth import bearer_token

from ._http import Client
from ._pki import CLIENT, TD, WEB
from .test_http import mesh, run

REQUIRE_CLIENT_JWT = """\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {name: jwt-client}
spec:
  selector: {spiffe_ids: ["spiffe://example.org/web"]}
  action: ALLOW
  rules:
    - from: [{source: {request_principals: ["spiffe://example.org/client"]}}]
"""

CLAIM_POLICY = """\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {name: jwt-claim}
spec:
  selector: {spiffe_ids: ["spiffe://example.org/web"]}
  action: ALLOW
  rules:
    - when: [{key: "request.auth.claims[aud]", values: ["api.example.org"]}]
"""


@dataclass(frozen=True)
class JwtAuthority:
    key: PrivateKey
    kid: str

    @classmethod
    def new(cls) -> JwtAuthority:
        return cls(generate_key(KeyType.EC_P256), new_kid())

    def bundle_json(self) -> bytes:
        return to_spiffe_json(
            TrustBundle(
                trust_domain=TrustDomain(TD),
                x509_authorities=(),
                jwt_authorities={self.kid: self.key.public_key()},
                sequence=1,
                refresh_hint=timedelta(minutes=5),
            )
        )

    def token(
        self,
        subject: str = CLIENT,
        audience: Sequence[str] = (WEB,),
        *,
        issued: timedelta = timedelta(minutes=-1),
        ttl: timedelta = timedelta(minutes=5),
    ) -> str:
        issued_at = datetime.now(UTC) + issued
        return sign_jwt_svid(
            self.key,
            self.kid,
            SpiffeId(subject),
            list(audience),
            issued_at=issued_at,
            expires_at=issued_at + ttl,
        )


def tampered(token: str, subject: str) -> str:
    """``token`` with its payload's ``sub`` replaced and the original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = subject
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


async def get(port: int, token: str | None, path: str = "/api") -> tuple[int, bytes]:
    client = await Client.open(port)
    try:
        headers = [] if token is None else [("authorization", f"Bearer {token}")]
        reply = await client.request("GET", path, headers)
    finally:
        await client.close()
    return reply.status, reply.body


def write_bundle(tmp: Path, authority: JwtAuthority) -> None:
    (tmp / "jwt_bundle.json").write_bytes(authority.bundle_json())


def test_a_valid_jwt_svid_gives_the_request_principal_a_policy_allows(tmp_path: Path) -> None:
    authority = JwtAuthority.new()
    write_bundle(tmp_path, authority)

    async def main() -> None:
        async with mesh(
            tmp_path, policy=REQUIRE_CLIENT_JWT, jwt={"bundle": "jwt_bundle.json"}
        ) as m:
            status, body = await get(m.out_port, authority.token())
            assert status == 200
            assert json.loads(body)["target"] == "/api"
            # a valid token of another workload is authenticated but not allowed
            status, body = await get(m.out_port, authority.token("spiffe://example.org/other"))
            assert (status, body) == (403, b"RBAC: access denied")
            await asyncio.sleep(0.1)
            allowed, denied = m.requests()
            assert allowed["verdict"]["decision"] == "allow"
            assert denied["status"] == 403

    run(main)


@pytest.mark.parametrize("case", ["wrong_audience", "expired", "tampered", "unknown_key"])
def test_an_invalid_token_is_answered_401_and_its_reason_logged_without_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    authority = JwtAuthority.new()
    write_bundle(tmp_path, authority)
    token = {
        "wrong_audience": lambda: authority.token(audience=["spiffe://example.org/other"]),
        "expired": lambda: authority.token(issued=timedelta(minutes=-10)),
        "tampered": lambda: tampered(authority.token("spiffe://example.org/other"), CLIENT),
        "unknown_key": lambda: JwtAuthority.new().token(),
    }[case]()
    reason = {
        "wrong_audience": "does not include",
        "expired": "expired",
        "tampered": "signature does not verify",
        "unknown_key": "is not in the JWT bundle",
    }[case]

    async def main() -> None:
        async with mesh(
            tmp_path, policy=REQUIRE_CLIENT_JWT, jwt={"bundle": "jwt_bundle.json"}
        ) as m:
            caplog.set_level(logging.INFO)
            client = await Client.open(m.out_port)
            reply = await client.request("GET", "/api", [("authorization", f"Bearer {token}")])
            await client.close()
            assert (reply.status, reply.body) == (401, b"Jwt verification fails")
            assert reply.headers["www-authenticate"].startswith("Bearer")
            assert m.app.seen == []
            await asyncio.sleep(0.1)
            (record,) = m.requests()
            assert (record["status"], record["error"]) == (401, "jwt_invalid")
            assert token not in m.inbound.log.getvalue()

    run(main)
    rejected = [r for r in caplog.records if r.getMessage() == "request JWT-SVID rejected"]
    assert rejected
    assert reason in rejected[0].__dict__["error"]
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


def test_no_token_means_no_request_principal_and_a_403(tmp_path: Path) -> None:
    authority = JwtAuthority.new()
    write_bundle(tmp_path, authority)

    async def main() -> None:
        async with mesh(
            tmp_path, policy=REQUIRE_CLIENT_JWT, jwt={"bundle": "jwt_bundle.json"}
        ) as m:
            assert await get(m.out_port, None) == (403, b"RBAC: access denied")
            # another scheme is no bearer token either
            client = await Client.open(m.out_port)
            reply = await client.request("GET", "/api", [("authorization", "Basic dTpw")])
            await client.close()
            assert (reply.status, reply.body) == (403, b"RBAC: access denied")

    run(main)


def test_a_configured_audience_is_accepted_and_claims_reach_the_policy(tmp_path: Path) -> None:
    authority = JwtAuthority.new()
    write_bundle(tmp_path, authority)

    async def main() -> None:
        async with mesh(
            tmp_path,
            policy=CLAIM_POLICY,
            jwt={"bundle": "jwt_bundle.json", "audiences": ["api.example.org"]},
        ) as m:
            assert (await get(m.out_port, authority.token(audience=["api.example.org"])))[0] == 200
            # our own SPIFFE ID is an accepted audience too, but the claim policy wants the other
            assert await get(m.out_port, authority.token()) == (403, b"RBAC: access denied")
            status, _ = await get(m.out_port, authority.token(audience=["elsewhere"]))
            assert status == 401

    run(main)


def test_without_a_jwt_block_the_authorization_header_is_not_looked_at(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as m:
            status, body = await get(m.out_port, "not-a-jwt")
            assert status == 200
            assert ["authorization", "Bearer not-a-jwt"] in json.loads(body)["headers"]

    run(main)


def test_the_jwt_bundle_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    old, new = JwtAuthority.new(), JwtAuthority.new()
    write_bundle(tmp_path, old)

    async def main() -> None:
        async with mesh(
            tmp_path,
            policy=REQUIRE_CLIENT_JWT,
            jwt={"bundle": "jwt_bundle.json", "poll_interval": 0.05},
        ) as m:
            assert (await get(m.out_port, new.token()))[0] == 401
            write_bundle(tmp_path, new)
            deadline = time.monotonic() + 5
            while (status := (await get(m.out_port, new.token()))[0]) != 200:
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.05)
            assert (await get(m.out_port, old.token()))[0] == 401
            # an unusable file keeps the last good keys
            (tmp_path / "jwt_bundle.json").write_text("{not json")
            await asyncio.sleep(0.3)
            assert (await get(m.out_port, new.token()))[0] == 200
            assert m.inbound.proxy.jwt_bundles is not None
            assert m.inbound.proxy.jwt_bundles.last_error is not None

    run(main)


def test_bearer_token_parsing() -> None:
    assert bearer_token({}) is None
    assert bearer_token({"authorization": "Basic abc"}) is None
    assert bearer_token({"authorization": "Bearer a.b.c"}) == "a.b.c"
    assert bearer_token({"authorization": "bearer  a.b.c "}) == "a.b.c"
