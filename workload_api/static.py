"""A fixed, replaceable set of identities: an ``IdentityProvider`` without an agent.

For development, demos, tests, and serving SVIDs from files on a machine without a node agent.
It holds one snapshot; ``replace`` installs a new one with the next version and wakes every
stream waiting in ``wait_changed``. ``replace`` may be called from any thread (a file watcher,
a test thread): waiters are woken through their own event loop.

JWT-SVIDs need a signing key, which this module does not hold: pass a ``JwtSigner``; without one
``fetch_jwt_svid`` raises ``IdentityUnavailable`` (the peer gets ``Unavailable``).

It must not sign anything itself, nor read files after construction (``identity_from_pem`` and
``bundle_der_from_pem`` are helpers for the caller that loads them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Collection, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import X509Svid
from spiffe.errors import PySpiffeError

from .errors import IdentityUnavailable, InvalidRequest
from .provider import JwtIdentity, Snapshot, X509Identity

JwtSigner = Callable[[X509Identity, Sequence[str]], str]
"""Mint a JWT-SVID (compact JWS) for the identity and audiences; may raise IdentityUnavailable."""


class StaticIdentityProvider:
    """An ``IdentityProvider`` over one replaceable snapshot."""

    def __init__(self, snapshot: Snapshot, *, jwt_signer: JwtSigner | None = None) -> None:
        self._snapshot = snapshot
        self._jwt_signer = jwt_signer
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Snapshot]]] = []

    def current(self) -> Snapshot:
        return self._snapshot

    @property
    def waiters(self) -> int:
        """How many ``wait_changed`` calls are pending (teardown checks it is 0)."""
        with self._lock:
            return len(self._waiters)

    def replace(self, snapshot: Snapshot) -> Snapshot:
        """Install ``snapshot`` as the next version (its own ``version`` is ignored)."""
        with self._lock:
            installed = dataclasses.replace(snapshot, version=self._snapshot.version + 1)
            self._snapshot = installed
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future, installed)
        return installed

    async def wait_changed(self, version: int) -> Snapshot:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._snapshot.version != version:
                return self._snapshot
            future: asyncio.Future[Snapshot] = loop.create_future()
            waiter = (loop, future)
            self._waiters.append(waiter)
        try:
            return await future
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def fetch_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> JwtIdentity:
        if self._jwt_signer is None:
            raise IdentityUnavailable("JWT-SVIDs: this static provider has no JWT signer")
        for identity in self._snapshot.identities:
            if identity.entry_id == entry_id:
                token = self._jwt_signer(identity, audience)
                return JwtIdentity(spiffe_id=identity.spiffe_id, token=token, hint=identity.hint)
        raise IdentityUnavailable(f"entry {entry_id!r} is no longer in the snapshot")


def _resolve(future: asyncio.Future[Snapshot], snapshot: Snapshot) -> None:
    if not future.done():
        future.set_result(snapshot)


def identity_from_pem(
    entry_id: str,
    chain_pem: bytes,
    key_pem: bytes,
    selectors: Collection[str],
    *,
    hint: str = "",
    federates_with: Sequence[str] = (),
) -> X509Identity:
    """An ``X509Identity`` from an SVID's PEM chain (leaf first) and its PEM private key.

    py-spiffe parses and checks the SVID (X509-SVID §4 and §5) and takes the SPIFFE ID from the
    leaf; a bad file raises ``InvalidRequest`` naming py-spiffe's reason.
    """
    try:
        svid = X509Svid.parse(chain_pem, key_pem)
    except PySpiffeError as err:
        raise InvalidRequest(f"X509-SVID files of entry {entry_id!r}: {err}") from err
    return X509Identity(
        entry_id=entry_id,
        spiffe_id=str(svid.spiffe_id),
        selectors=frozenset(selectors),
        cert_chain=tuple(cert.public_bytes(serialization.Encoding.DER) for cert in svid.cert_chain),
        private_key=svid.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        hint=hint,
        federates_with=tuple(federates_with),
    )


def bundle_der_from_pem(pem: bytes) -> bytes:
    """PEM CA certificates as the Workload API's bundle encoding (concatenated DER)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise InvalidRequest(f"bundle: not PEM certificates ({err})") from err
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in certs)
