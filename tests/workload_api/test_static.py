"""StaticIdentityProvider: replace bumps the version and wakes waiters, from any thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.bundle import to_pem
from workload_api.errors import IdentityUnavailable, InvalidRequest
from workload_api.static import StaticIdentityProvider, bundle_der_from_pem, identity_from_pem

from . import _pki


def test_replace_bumps_the_version_and_wakes_waiters() -> None:
    provider = StaticIdentityProvider(_pki.snapshot([], version=4))

    async def scenario() -> None:
        waiting = asyncio.ensure_future(provider.wait_changed(4))
        await asyncio.sleep(0)
        assert provider.waiters == 1 and not waiting.done()
        installed = provider.replace(_pki.snapshot([], version=1))  # its own version is ignored
        assert installed.version == 5
        assert (await waiting) is installed
        assert await provider.wait_changed(4) is installed  # already different: no wait
        assert provider.waiters == 0

    asyncio.run(scenario())


def test_replace_from_another_thread_wakes_the_loop() -> None:
    provider = StaticIdentityProvider(_pki.snapshot([]))

    async def scenario() -> int:
        waiting = asyncio.ensure_future(provider.wait_changed(1))
        await asyncio.sleep(0)
        thread = threading.Thread(target=provider.replace, args=(_pki.snapshot([]),))
        thread.start()
        snapshot = await asyncio.wait_for(waiting, 10)
        thread.join()
        return snapshot.version

    assert asyncio.run(scenario()) == 2


def test_a_cancelled_wait_leaves_no_waiter() -> None:
    provider = StaticIdentityProvider(_pki.snapshot([]))

    async def scenario() -> None:
        waiting = asyncio.ensure_future(provider.wait_changed(1))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(scenario())
    assert provider.waiters == 0


def test_jwt_svids_need_a_signer() -> None:
    web = _pki.identity(_pki.WEB, {"unix:uid:0"}, entry_id="web")
    unsigned = StaticIdentityProvider(_pki.snapshot([web]))
    with pytest.raises(IdentityUnavailable, match="no JWT signer"):
        asyncio.run(unsigned.fetch_jwt_svid("web", ["a"]))
    signed = StaticIdentityProvider(_pki.snapshot([web]), jwt_signer=_pki.jwt_signer())
    token = asyncio.run(signed.fetch_jwt_svid("web", ["a"]))
    assert token.spiffe_id == _pki.WEB and token.token.count(".") == 2
    with pytest.raises(IdentityUnavailable, match="no longer in the snapshot"):
        asyncio.run(signed.fetch_jwt_svid("gone", ["a"]))


def test_identities_and_bundles_load_from_pem_files() -> None:
    made = _pki.identity(_pki.WEB, {"unix:uid:0"})
    chain_pem = b"".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        for der in made.cert_chain
    )
    key_pem = serialization.load_der_private_key(made.private_key, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    loaded = identity_from_pem("web", chain_pem, key_pem, ["unix:uid:0"], hint="internal")
    assert loaded.spiffe_id == _pki.WEB
    assert loaded.cert_chain == made.cert_chain
    assert loaded.private_key == made.private_key
    assert loaded.selectors == frozenset({"unix:uid:0"}) and loaded.hint == "internal"
    authority = _pki.authority()
    assert bundle_der_from_pem(to_pem(authority.bundle)) == authority.x509_der


@pytest.mark.parametrize(
    ("chain", "key", "reason"),
    [(b"junk", b"junk", "X509-SVID files of entry 'bad'"), (b"", b"", "X509-SVID files")],
    ids=["garbage", "empty"],
)
def test_bad_pem_files_are_refused(chain: bytes, key: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        identity_from_pem("bad", chain, key, ["unix:uid:0"])
    with pytest.raises(InvalidRequest, match="not PEM certificates"):
        bundle_der_from_pem(b"junk")
