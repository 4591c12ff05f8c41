"""What a watched file looks like now, for the polls that reload a file when it changes.

Owns ``file_stamp``: a file's (mtime in ns, size, inode), or None when it cannot be stat'ed. An
atomic replace (new inode), a rewrite in place (mtime, size) and a deletion all change it. The
identity files, the JWT bundle files, the policy file and the proxy's configuration file are
watched this way. It must not read the files nor decide what a change means.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

FileStamp = tuple[int, int, int]


def file_stamp(path: Path | str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def files_stamp(paths: Iterable[Path | str]) -> tuple[FileStamp | None, ...]:
    return tuple(file_stamp(path) for path in paths)
