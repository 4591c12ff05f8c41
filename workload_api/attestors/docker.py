"""The ``docker`` workload attestor: the container the process runs in, from its cgroup.

Selector: ``docker:container_id:<64 hex>``. Recognises docker's cgroup v1 ``/docker/<id>``, the
systemd driver's ``docker-<id>.scope`` (v1 and v2) and the containerd/CRI shapes listed in
``cgroups``. A process outside a container gets no selector; one whose cgroups name two different
containers is refused. It queries no container daemon (no labels or image selectors).
"""

from __future__ import annotations

from pathlib import Path

from ._proc import DEFAULT_PROC_ROOT, read_text
from .cgroups import container_id, parse_cgroup_file

SELECTOR_TYPE = "docker"


class DockerAttestor:
    name = SELECTOR_TYPE

    def __init__(self, *, proc_root: Path = DEFAULT_PROC_ROOT) -> None:
        self._proc_root = proc_root

    async def attest(self, pid: int) -> frozenset[str]:
        found = container_id(parse_cgroup_file(read_text(self._proc_root, pid, "cgroup")))
        return frozenset() if found is None else frozenset({f"docker:container_id:{found}"})
