"""The ``unix`` workload attestor: who runs the process, and (optionally) which binary.

Selectors (SPIRE's ``unix`` plugin names)::

    unix:uid:1000               effective uid (/proc/PID/status Uid, second field)
    unix:user:alice             its name, when the user database has one
    unix:gid:1000               effective gid
    unix:group:staff            its name, when known
    unix:supplementary_gid:27   one per supplementary group (/proc/PID/status Groups)
    unix:supplementary_group:sudo
    unix:path:/usr/bin/app      the executable (readlink /proc/PID/exe), when discover_path
    unix:sha256:<hex>           its SHA-256, when hash_binary

The binary is hashed through /proc/PID/exe, so the bytes are those the process runs even if the
file was replaced since, and each hash is cached by (device, inode, size, mtime): a node's
processes mostly share a few binaries. Binaries above ``max_hash_bytes`` get no sha256 selector
(fewer selectors can only match fewer entries). It must not decide which entries match.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import logging
import os
import pwd
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import AttestationFailed
from ._proc import DEFAULT_PROC_ROOT, process_file, status_fields

log = logging.getLogger(__name__)

SELECTOR_TYPE = "unix"
DEFAULT_MAX_HASH_BYTES = 1 << 30  # 1 GiB: larger "binaries" are images or data, not programs
HASH_CACHE_ENTRIES = 1024  # distinct binaries remembered; a node runs far fewer
HASH_CHUNK_BYTES = 1 << 20  # read 1 MiB at a time: bounded memory for large binaries
_EFFECTIVE = 1  # /proc/PID/status Uid/Gid: real, effective, saved, filesystem


@dataclass(frozen=True)
class UnixConfig:
    discover_path: bool = False  # add unix:path (needs the agent to read /proc/PID/exe)
    hash_binary: bool = False  # add unix:sha256 of the binary
    max_hash_bytes: int = DEFAULT_MAX_HASH_BYTES


class UnixAttestor:
    """``attest(pid)`` -> ``unix:*`` selectors."""

    name = SELECTOR_TYPE

    def __init__(
        self, config: UnixConfig | None = None, *, proc_root: Path = DEFAULT_PROC_ROOT
    ) -> None:
        self._config = config or UnixConfig()
        self._proc_root = proc_root
        self._hashes: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self._lock = threading.Lock()

    async def attest(self, pid: int) -> frozenset[str]:
        status = status_fields(self._proc_root, pid)
        uid = _effective(status, "Uid", pid)
        gid = _effective(status, "Gid", pid)
        selectors = {f"unix:uid:{uid}", f"unix:gid:{gid}"}
        if (user := _user_name(uid)) is not None:
            selectors.add(f"unix:user:{user}")
        if (group := _group_name(gid)) is not None:
            selectors.add(f"unix:group:{group}")
        for value in status.get("Groups", "").split():
            if not value.isdigit():
                raise AttestationFailed(f"/proc/{pid}/status Groups holds {value!r}, not a gid")
            selectors.add(f"unix:supplementary_gid:{value}")
            if (name := _group_name(int(value))) is not None:
                selectors.add(f"unix:supplementary_group:{name}")
        exe = process_file(self._proc_root, pid, "exe")
        if self._config.discover_path:
            try:
                selectors.add(f"unix:path:{os.readlink(exe)}")
            except OSError as err:
                raise AttestationFailed(f"cannot read {exe}: {err}") from err
        if self._config.hash_binary:
            digest = await asyncio.to_thread(self._sha256, exe)
            if digest is not None:
                selectors.add(f"unix:sha256:{digest}")
        return frozenset(selectors)

    def _sha256(self, exe: Path) -> str | None:
        try:
            fd = os.open(exe, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise AttestationFailed(f"cannot open {exe}: {err}") from err
        with os.fdopen(fd, "rb") as binary:
            info = os.fstat(binary.fileno())
            key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            with self._lock:
                if (cached := self._hashes.get(key)) is not None:
                    self._hashes.move_to_end(key)
                    return cached
            if info.st_size > self._config.max_hash_bytes:
                log.info(
                    "binary too large to hash; no sha256 selector",
                    extra={"exe": str(exe), "size": info.st_size},
                )
                return None
            digest = hashlib.sha256()
            while chunk := binary.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        value = digest.hexdigest()
        with self._lock:
            self._hashes[key] = value
            while len(self._hashes) > HASH_CACHE_ENTRIES:
                self._hashes.popitem(last=False)
        return value


def _effective(status: dict[str, str], field: str, pid: int) -> int:
    values = status.get(field, "").split()
    if len(values) <= _EFFECTIVE or not values[_EFFECTIVE].isdigit():
        raise AttestationFailed(f"/proc/{pid}/status has no effective {field}")
    return int(values[_EFFECTIVE])


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None
