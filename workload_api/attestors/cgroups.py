"""Reading identities out of a process's cgroup paths (/proc/PID/cgroup); pure parsing.

Owns three questions, each answered from the path text alone:

- ``systemd_unit``: the system manager's unit (``nginx.service``, ``docker-<id>.scope``);
- ``container_id``: the container runtime's 64-hex id (docker, containerd/CRI, CRI-O);
- ``pod_uid``: the Kubernetes pod UID.

Shapes recognised (cgroup v1 lines ``N:controllers:/path``, v2 line ``0::/path``)::

    /docker/<id>                                           docker, cgroupfs driver (v1)
    /system.slice/docker-<id>.scope                        docker, systemd driver (v1 and v2)
    /kubepods/burstable/pod<uid>/<id>                      kubelet, cgroupfs driver
    /kubepods.slice/kubepods-besteffort.slice/
        kubepods-besteffort-pod<u_i_d>.slice/cri-containerd-<id>.scope   systemd driver
    .../kubepods-pod<u_i_d>.slice:cri-containerd:<id>      containerd's v1 systemd naming
    .../crio-<id>.scope                                    CRI-O
    /k8s.io/<id>                                           containerd namespace, cgroupfs

Fail closed: two different container ids or pod UIDs across a process's lines raise
``AttestationFailed`` rather than picking one. It must not read files (``_proc`` does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import AttestationFailed

_ID = r"[0-9a-f]{64}"  # docker, containerd and CRI-O container ids
_CONTAINER_SEGMENT = re.compile(
    rf"^(?:(?:docker|cri-containerd|crio|containerd)-({_ID})\.scope"  # systemd driver
    rf"|.*:(?:cri-containerd|docker|crio):({_ID})"  # containerd's "slice:runtime:id" naming
    rf"|({_ID}))$"  # cgroupfs driver: the bare id, vetted by _BARE_ID_PARENTS
)
# A bare 64-hex segment is a container id only below a runtime's or the kubelet's folder.
_BARE_ID_PARENTS = re.compile(r"^(?:docker|k8s\.io|containerd|kubepods.*|pod[0-9a-f_-]{36}.*)$")
_POD_SEGMENT = re.compile(
    r"^(?:kubepods(?:-[a-z]+)?-)?pod"
    r"([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
    r"(?:\.slice)?$"
)
_UNIT_SUFFIXES = (".service", ".scope")  # the unit kinds a process can sit in directly


@dataclass(frozen=True)
class Cgroup:
    """One line of /proc/PID/cgroup."""

    hierarchy: str  # "0" for the v2 unified hierarchy
    controllers: str  # "" for v2; "memory", "name=systemd", ... for v1
    path: str


def parse_cgroup_file(text: str) -> tuple[Cgroup, ...]:
    """The lines of /proc/PID/cgroup; malformed lines raise ``AttestationFailed``."""
    groups: list[Cgroup] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            raise AttestationFailed(
                f"cgroup line {number} is malformed: {line!r} (expected id:controllers:/path)"
            )
        groups.append(Cgroup(parts[0], parts[1], parts[2]))
    return tuple(groups)


def _segments(path: str) -> list[str]:
    return [segment for segment in path.split("/") if segment]


def container_id_of_path(path: str) -> str | None:
    """The innermost container id named by one cgroup path, if any."""
    segments = _segments(path)
    for index in range(len(segments) - 1, -1, -1):
        match = _CONTAINER_SEGMENT.match(segments[index])
        if match is None:
            continue
        systemd_id, colon_id, bare_id = match.groups()
        if bare_id is not None:
            if index == 0 or not _BARE_ID_PARENTS.match(segments[index - 1]):
                continue
            return bare_id
        return systemd_id or colon_id
    return None


def pod_uid_of_path(path: str) -> str | None:
    """The pod UID named by one cgroup path (dashes restored), if any."""
    for segment in reversed(_segments(path)):
        head = segment.split(":", 1)[0]  # "kubepods-pod<uid>.slice:cri-containerd:<id>"
        match = _POD_SEGMENT.match(head)
        if match:
            return match.group(1).replace("_", "-")
    return None


def _single(values: Iterable[str | None], what: str) -> str | None:
    found = {value for value in values if value is not None}
    if len(found) > 1:
        raise AttestationFailed(f"the process's cgroups name more than one {what}: {sorted(found)}")
    return found.pop() if found else None


def container_id(groups: Iterable[Cgroup]) -> str | None:
    """The process's container id, or None when it is not in a container."""
    return _single((container_id_of_path(group.path) for group in groups), "container id")


def pod_uid(groups: Iterable[Cgroup]) -> str | None:
    """The process's pod UID, or None when it is not in a Kubernetes pod."""
    return _single((pod_uid_of_path(group.path) for group in groups), "pod UID")


def pod_container(groups: Iterable[Cgroup]) -> tuple[str, str] | None:
    """(pod UID, container id) from the lines that name a pod, or None outside a pod.

    Only lines naming a pod count, so a kind node's own container (``/docker/<node id>/...`` on
    the unified line) is not mistaken for the workload's container.
    """
    pairs = [
        (uid, container_id_of_path(group.path))
        for group in groups
        if (uid := pod_uid_of_path(group.path)) is not None
    ]
    uid = _single((pair[0] for pair in pairs), "pod UID")
    cid = _single((pair[1] for pair in pairs), "container id")
    if uid is None or cid is None:
        return None
    return uid, cid


def systemd_unit(groups: Iterable[Cgroup]) -> str | None:
    """The system manager's unit of the process, from the systemd hierarchy.

    The *outermost* ``.service``/``.scope`` segment: it is what PID 1 assigned, and only root can
    move a process out of it. Below it a unit may be delegated (``user@1000.service``,
    ``Delegate=yes``) and its owner can create any sub-cgroup name it likes, so deeper names are
    not evidence. This matches systemd's own ``GetUnitByPID`` on the system bus.
    """
    chosen: Cgroup | None = None
    for group in groups:
        if group.controllers == "name=systemd":
            chosen = group  # cgroup v1 (or hybrid): systemd's own named hierarchy
            break
        if group.hierarchy == "0" and group.controllers == "":
            chosen = group  # cgroup v2 unified hierarchy
    if chosen is None:
        return None
    for segment in _segments(chosen.path):
        if segment.endswith(_UNIT_SUFFIXES):
            return segment
    return None
