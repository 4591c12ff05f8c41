"""Reading a process's files under a /proc root (the real one, or a fake tree in tests).

Every reader turns "the process is gone" into ``AttestationFailed``: a caller that exits while
being attested gets nothing. Nothing here decides anything.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AttestationFailed

DEFAULT_PROC_ROOT = Path("/proc")
STAT_START_TIME_FIELD = 22  # proc(5): field 22 of /proc/PID/stat is the start time in clock ticks
_FIRST_FIELD_AFTER_COMM = 3  # fields 1 and 2 are pid and (comm); comm may hold spaces and ')'


def process_file(proc_root: Path, pid: int, name: str) -> Path:
    if pid <= 0:
        raise AttestationFailed(f"pid {pid} is not a process id")
    return proc_root / str(pid) / name


def read_text(proc_root: Path, pid: int, name: str) -> str:
    path = process_file(proc_root, pid, name)
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except (FileNotFoundError, ProcessLookupError) as err:
        raise AttestationFailed(f"process {pid} is gone ({path} is missing)") from err
    except OSError as err:
        raise AttestationFailed(f"cannot read {path}: {err}") from err


def start_time(proc_root: Path, pid: int) -> int:
    """Field 22 of /proc/PID/stat: with the pid, it names one process for the boot's lifetime."""
    text = read_text(proc_root, pid, "stat")
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    index = STAT_START_TIME_FIELD - _FIRST_FIELD_AFTER_COMM
    if not sep or len(fields) <= index or not fields[index].isdigit():
        raise AttestationFailed(f"/proc/{pid}/stat is malformed: no start time in field 22")
    return int(fields[index])


def status_fields(proc_root: Path, pid: int) -> dict[str, str]:
    """/proc/PID/status as ``{"Uid": "0\\t0\\t0\\t0", ...}``."""
    fields: dict[str, str] = {}
    for line in read_text(proc_root, pid, "status").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields
