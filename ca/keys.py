"""Private keys of the signing authorities, behind a small key-manager interface.

Owns key generation and storage. Keys on disk are PKCS#8 PEM files of mode 0600 in a 0700
folder, written atomically. No key material is ever logged or returned by an API; only key ids
travel.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Protocol, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .errors import CaError, InvalidArgument, NotFound

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class KeyType(StrEnum):
    """Key algorithms an authority (or a workload) may use."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_4096 = "rsa-4096"


def generate_key(key_type: KeyType) -> PrivateKey:
    """Return a fresh private key of ``key_type``."""
    match key_type:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case KeyType.RSA_4096:
            return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    raise InvalidArgument("key_type", f"must be one of {[k.value for k in KeyType]}", key_type)


@functools.cache
def _is_ec(cls: type) -> bool:
    # Asked once per concrete key class: the ABC ``isinstance`` costs a microsecond per call,
    # and the CA asks about every key it signs for.
    return issubclass(cls, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey)


_SUPPORTED_PUBLIC: dict[type, bool] = {}


def is_supported_public_key(key: object) -> bool:
    """Whether ``key`` is an ECDSA or RSA public key (decided once per concrete class)."""
    cls = type(key)
    known = _SUPPORTED_PUBLIC.get(cls)
    if known is None:
        known = isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        _SUPPORTED_PUBLIC[cls] = known
    return known


def key_type_of(key: PrivateKey | PublicKey) -> KeyType:
    """Name the algorithm of ``key``; unsupported keys raise ``InvalidArgument``."""
    if _is_ec(type(key)):
        key = cast("ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey", key)
        if isinstance(key.curve, ec.SECP256R1):
            return KeyType.EC_P256
        if isinstance(key.curve, ec.SECP384R1):
            return KeyType.EC_P384
    elif key.key_size in (2048, 4096):
        return KeyType.RSA_2048 if key.key_size == 2048 else KeyType.RSA_4096
    raise InvalidArgument("key", "must be ECDSA P-256/P-384 or RSA 2048/4096")


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of ``key`` (for files of mode 0600 only)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes, *, field: str = "key") -> PrivateKey:
    """Parse a PEM private key of a supported type."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise InvalidArgument(field, "must be an unencrypted PEM private key") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidArgument(field, "must be an ECDSA or RSA private key")
    key_type_of(key)
    return key


class KeyManager(Protocol):
    """Where authority private keys live. Implementations: disk, memory."""

    def generate(self, key_id: str, key_type: KeyType) -> PrivateKey: ...

    def load(self, key_id: str) -> PrivateKey: ...

    def delete(self, key_id: str) -> None: ...


def _check_key_id(key_id: str) -> None:
    if not _KEY_ID.fullmatch(key_id):
        raise InvalidArgument("key_id", "must match [A-Za-z0-9_.-]{1,128}", key_id)


class MemoryKeyManager:
    """Keys that live only as long as the process (tests, throwaway servers)."""

    def __init__(self) -> None:
        self._keys: dict[str, PrivateKey] = {}

    def generate(self, key_id: str, key_type: KeyType) -> PrivateKey:
        _check_key_id(key_id)
        key = generate_key(key_type)
        self._keys[key_id] = key
        return key

    def load(self, key_id: str) -> PrivateKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise NotFound(f"key {key_id!r} is not in the memory key manager") from None

    def delete(self, key_id: str) -> None:
        self._keys.pop(key_id, None)


class DiskKeyManager:
    """Keys as PKCS#8 PEM files of mode 0600 in a folder of mode 0700."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._dir, 0o700)

    def _path(self, key_id: str) -> Path:
        _check_key_id(key_id)
        return self._dir / f"{key_id}.pem"

    def generate(self, key_id: str, key_type: KeyType) -> PrivateKey:
        path = self._path(key_id)
        key = generate_key(key_type)
        write_private_file(path, private_key_pem(key))
        return key

    def load(self, key_id: str) -> PrivateKey:
        path = self._path(key_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"key {key_id!r} not found in {self._dir}") from None
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise CaError(f"key file {path} has mode {mode:o}; refusing a key readable by others")
        return load_private_key_pem(data, field=str(path))

    def delete(self, key_id: str) -> None:
        self._path(key_id).unlink(missing_ok=True)


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 from the first byte."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
