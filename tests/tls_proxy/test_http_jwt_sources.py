"""Where the inbound proxy's JWT authorities come from: the Workload API (``FetchJWTBundles``
through py-spiffe's ``JwtSource``, federated trust domains included) or one file per trust domain.

client → outbound proxy (files) → mTLS → inbound proxy → echo app; tokens are minted with the
trust domains' JWT keys and carried in ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId

from ca.jwtsvid import sign_jwt_svid
from tests.workload_api import _pki as wl_pki
from tests.workload_api._harness import LoopThread, self_attestor, socket_folder
from tls_proxy import ConfigError, parse_config
from workload_api.server import WorkloadApiServer
from workload_api.static import StaticIdentityProvider

from ._harness import Running, inbound_listener, running
from ._http import Client, http_echo_app

WEB = wl_pki.WEB
CLIENT = "spiffe://example.org/client"
PARTNER_APP = f"spiffe://{wl_pki.PARTNER}/frontend"
OTHER_APP = f"spiffe://{wl_pki.OTHER}/frontend"

# Principals of our own and of the partner trust domain may call; the policy only ever sees
# principals whose tokens validated.
REQUIRE_JWT = f"""\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: jwt-callers}}
spec:
  selector: {{spiffe_ids: ["{WEB}"]}}
  action: ALLOW
  rules:
    - from: [{{source: {{request_principals: ["{CLIENT}", "{PARTNER_APP}"]}}}}]
"""


def token(subject: str, audience: str = WEB) -> str:
    """A JWT-SVID for ``subject`` signed by its trust domain's JWT authority."""
    issuer = wl_pki.authority(SpiffeId(subject).trust_domain.name)
    now = datetime.now(UTC)
    return sign_jwt_svid(
        issuer.jwt_key,
        issuer.kid,
        SpiffeId(subject),
        [audience],
        issued_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(minutes=5),
    )


def write_files(folder: Path, identity: wl_pki.X509Identity) -> dict[str, str]:
    """``identity`` and our trust domain's X.509 bundle as the PEM files a proxy reads."""
    folder.mkdir(parents=True, exist_ok=True)
    chain = b"".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        for der in identity.cert_chain
    )
    key = serialization.load_der_private_key(identity.private_key, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    bundle = wl_pki.authority(wl_pki.TD).signing.certificate.public_bytes(
        serialization.Encoding.PEM
    )
    (folder / "svid.pem").write_bytes(chain)
    (folder / "svid.key").write_bytes(key)
    (folder / "svid.key").chmod(0o600)
    (folder / "bundle.pem").write_bytes(bundle)
    return {
        k: str(folder / f)
        for k, f in [("cert", "svid.pem"), ("key", "svid.key"), ("bundle", "bundle.pem")]
    }


class Mesh:
    def __init__(self, inbound: Running, out_port: int) -> None:
        self.inbound = inbound
        self.out_port = out_port

    async def status(self, bearer: str) -> int:
        client = await Client.open(self.out_port)
        try:
            reply = await client.request("GET", "/api", [("authorization", f"Bearer {bearer}")])
        finally:
            await client.close()
        return reply.status


@asynccontextmanager
async def mesh(tmp: Path, identity: dict[str, Any], jwt: dict[str, Any]) -> AsyncIterator[Mesh]:
    (tmp / "policy.yaml").write_text(REQUIRE_JWT)
    async with http_echo_app() as app:
        web = {
            "identity": identity,
            "admin": {"listen": "127.0.0.1:0"},
            "timeouts": {"drain": 2, "handshake": 5},
            "inbound": [inbound_listener(app.port, "http")],
            "policy": {"file": "policy.yaml"},
            "jwt": jwt,
        }
        async with running(web, tmp) as inbound:
            client = {
                "identity": write_files(tmp / "client", wl_pki.identity(CLIENT, [])),
                "admin": {"listen": "127.0.0.1:0"},
                "outbound": [
                    {
                        "name": "to-web",
                        "listen": "127.0.0.1:0",
                        "upstream": [f"127.0.0.1:{inbound.port('web')}"],
                        "expect_ids": [WEB],
                        "protocol": "http",
                    }
                ],
            }
            async with running(client, tmp) as outbound:
                yield Mesh(inbound, outbound.port("to-web"))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def test_jwt_bundles_from_the_workload_api_include_federated_ones_and_follow_updates(
    tmp_path: Path,
) -> None:
    web = wl_pki.identity(WEB, ["unix:uid:" + str(os.getuid())], federates_with=[wl_pki.PARTNER])
    provider = StaticIdentityProvider(wl_pki.snapshot([web]))
    folder = socket_folder()
    loop = LoopThread()
    server = WorkloadApiServer(provider, self_attestor(), folder / "api.sock")
    loop.run(server.start())
    identity = {"workload_api": f"unix://{server.socket_path}", "timeout": 10}

    async def main() -> None:
        async with mesh(tmp_path, identity, jwt={}) as m:
            bundles = m.inbound.proxy.jwt_bundles
            assert bundles is not None
            # ours and the partner's (our entry federates with it), not other.org's
            assert set(bundles.keys) == {wl_pki.TD, wl_pki.PARTNER}
            assert await m.status(token(CLIENT)) == 200
            assert await m.status(token(PARTNER_APP)) == 200
            assert await m.status(token(OTHER_APP)) == 401  # no bundle for other.org
            assert await m.status(token("spiffe://example.org/intruder")) == 403

            # the agent stops serving the partner's bundle: its tokens stop validating
            provider.replace(wl_pki.snapshot([web], version=2, trust_domains=(wl_pki.TD,)))

            async def partner_gone() -> bool:
                return wl_pki.PARTNER not in bundles.keys

            await eventually(partner_gone)
            assert await m.status(token(PARTNER_APP)) == 401
            assert await m.status(token(CLIENT)) == 200
            assert bundles.last_error is None

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        loop.run(server.stop(timedelta(seconds=2)))
        loop.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_federated_jwt_bundle_files(tmp_path: Path) -> None:
    identity = write_files(tmp_path / "web", wl_pki.identity(WEB, []))
    for name in (wl_pki.TD, wl_pki.PARTNER):
        (tmp_path / f"{name}.json").write_bytes(wl_pki.authority(name).jwks)

    async def main() -> None:
        jwt = {
            "bundle": f"{wl_pki.TD}.json",
            "federated": {wl_pki.PARTNER: f"{wl_pki.PARTNER}.json"},
        }
        async with mesh(tmp_path, identity, jwt=jwt) as m:
            assert await m.status(token(CLIENT)) == 200
            assert await m.status(token(PARTNER_APP)) == 200
            assert await m.status(token(OTHER_APP)) == 401
        # without the partner's file its tokens do not validate
        async with mesh(tmp_path, identity, jwt={"bundle": f"{wl_pki.TD}.json"}) as m:
            assert await m.status(token(PARTNER_APP)) == 401
            assert await m.status(token(CLIENT)) == 200

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_bad_federated_file_keeps_the_last_good_set(tmp_path: Path) -> None:
    identity = write_files(tmp_path / "web", wl_pki.identity(WEB, []))
    for name in (wl_pki.TD, wl_pki.PARTNER):
        (tmp_path / f"{name}.json").write_bytes(wl_pki.authority(name).jwks)

    async def main() -> None:
        jwt = {
            "bundle": f"{wl_pki.TD}.json",
            "federated": {wl_pki.PARTNER: f"{wl_pki.PARTNER}.json"},
            "poll_interval": 0.05,
        }
        async with mesh(tmp_path, identity, jwt=jwt) as m:
            bundles = m.inbound.proxy.jwt_bundles
            assert bundles is not None
            (tmp_path / f"{wl_pki.PARTNER}.json").write_text("{not json")

            async def failed() -> bool:
                return bundles.last_error is not None

            await eventually(failed)
            assert f"jwt.federated.{wl_pki.PARTNER}" in (bundles.last_error or "")
            assert await m.status(token(PARTNER_APP)) == 200
            assert await m.status(token(CLIENT)) == 200

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize(
    ("jwt", "identity", "message"),
    [
        (
            {},
            {"cert": "c", "key": "k", "bundle": "b"},
            "jwt: expected jwt.bundle: with identity from files there is no Workload API",
        ),
        (
            {"federated": {"partner.org": "p.json"}},
            {"workload_api": "unix:///tmp/x.sock"},
            "jwt: expected jwt.bundle with jwt.federated",
        ),
        (
            {"bundle": "b.json", "federated": {"Partner.Org": "p.json"}},
            {"workload_api": "unix:///tmp/x.sock"},
            "jwt.federated: expected a lower-case trust domain name",
        ),
    ],
)
def test_jwt_source_config_errors_name_the_key(
    jwt: dict[str, Any], identity: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"identity": identity, "jwt": jwt}, "proxy.yaml")
    assert message in str(err.value), str(err.value)


def test_config_resolves_federated_files_against_the_config_folder(tmp_path: Path) -> None:
    config = parse_config(
        {
            "identity": {"workload_api": "unix:///tmp/x.sock"},
            "jwt": {"bundle": "own.json", "federated": {"partner.org": "p.json"}},
        },
        "proxy.yaml",
        tmp_path,
    )
    assert config.jwt is not None
    assert config.jwt.federated == {"partner.org": tmp_path / "p.json"}
    assert json.loads(json.dumps(config.public_dict()))["jwt"]["federated"] == {
        "partner.org": str(tmp_path / "p.json")
    }
