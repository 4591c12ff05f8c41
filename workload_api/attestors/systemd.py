"""The ``systemd`` workload attestor: the unit the process runs in, from its cgroup.

Selector: ``systemd:id:nginx.service`` (``systemd:id:UNIT``). The unit is the outermost
``.service``/``.scope`` in the systemd hierarchy's path, the one PID 1 assigned (see
``cgroups.systemd_unit`` for why deeper, delegated names are not trusted). A process outside any
unit gets no selector. It asks no D-Bus: the cgroup path is the kernel's record.
"""

from __future__ import annotations

from pathlib import Path

from ._proc import DEFAULT_PROC_ROOT, read_text
from .cgroups import parse_cgroup_file, systemd_unit

SELECTOR_TYPE = "systemd"


class SystemdAttestor:
    name = SELECTOR_TYPE

    def __init__(self, *, proc_root: Path = DEFAULT_PROC_ROOT) -> None:
        self._proc_root = proc_root

    async def attest(self, pid: int) -> frozenset[str]:
        unit = systemd_unit(parse_cgroup_file(read_text(self._proc_root, pid, "cgroup")))
        return frozenset() if unit is None else frozenset({f"systemd:id:{unit}"})
