"""Workload attestors against fake /proc trees (cgroup shapes) and the real /proc (this process).

The fake trees are plain folders in tmp_path holding the files the kernel would show; the
attestors read them through the same code as the real /proc.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import os
import pwd
from pathlib import Path

import pytest

from workload_api.attestors import (
    AttestorsConfig,
    CompositeAttestor,
    DockerAttestor,
    K8sConfig,
    PidReused,
    SystemdAttestor,
    UnixAttestor,
    UnixConfig,
    build_attestor,
    container_id,
    parse_cgroup_file,
    pod_container,
    systemd_unit,
)
from workload_api.errors import AttestationFailed

PID = 4242
ELF = b"\x7fELF pretend"
CID = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
KIND_NODE = "93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26"
POD = "2c48913c-b29f-11e7-9350-020968147796"
POD_ = POD.replace("-", "_")
STATUS = """Name:\tapp
Umask:\t0022
State:\tS (sleeping)
Pid:\t4242
Uid:\t1000\t0\t1000\t0
Gid:\t100\t0\t100\t0
Groups:\t0 65534\t
"""  # real, effective, saved, fs: the effective ids (0) are the ones that count


def fake_process(
    root: Path,
    pid: int = PID,
    *,
    status: str = STATUS,
    cgroup: str = "0::/\n",
    start_time: int = 123456,
    exe: Path | None = None,
) -> Path:
    folder = root / str(pid)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "status").write_text(status)
    (folder / "cgroup").write_text(cgroup)
    # comm with a space and a parenthesis: field counting must start after the last ')'
    fields = ["S"] + ["0"] * 18 + [str(start_time)] + ["0"] * 10
    (folder / "stat").write_text(f"{pid} (we) ird) " + " ".join(fields) + "\n")
    if exe is not None:
        (folder / "exe").unlink(missing_ok=True)
        (folder / "exe").symlink_to(exe)
    return folder


def attest(attestor: object, pid: int = PID) -> frozenset[str]:
    return asyncio.run(attestor.attest(pid))  # type: ignore[attr-defined]


# --- unix --------------------------------------------------------------------------------------


def test_unix_selectors_from_status(tmp_path: Path) -> None:
    fake_process(tmp_path)
    selectors = attest(UnixAttestor(proc_root=tmp_path))
    root_user, root_group = pwd.getpwuid(0).pw_name, grp.getgrgid(0).gr_name
    nogroup = grp.getgrgid(65534).gr_name
    assert selectors == {
        "unix:uid:0",
        f"unix:user:{root_user}",
        "unix:gid:0",
        f"unix:group:{root_group}",
        "unix:supplementary_gid:0",
        f"unix:supplementary_group:{root_group}",
        "unix:supplementary_gid:65534",
        f"unix:supplementary_group:{nogroup}",
    }


def test_unix_ids_without_names_still_count(tmp_path: Path) -> None:
    fake_process(tmp_path, status="Uid:\t1\t54321\t1\t1\nGid:\t1\t54321\t1\t1\nGroups:\t\n")
    assert attest(UnixAttestor(proc_root=tmp_path)) == {"unix:uid:54321", "unix:gid:54321"}


def test_unix_path_and_sha256_are_optional(tmp_path: Path) -> None:
    binary = tmp_path / "bin" / "app"
    binary.parent.mkdir()
    binary.write_bytes(ELF)
    fake_process(tmp_path / "proc", exe=binary)
    plain = attest(UnixAttestor(proc_root=tmp_path / "proc"))
    assert not any(s.startswith(("unix:path:", "unix:sha256:")) for s in plain)
    full = attest(
        UnixAttestor(UnixConfig(discover_path=True, hash_binary=True), proc_root=tmp_path / "proc")
    )
    assert f"unix:path:{binary}" in full
    assert f"unix:sha256:{hashlib.sha256(ELF).hexdigest()}" in full


def test_unix_hash_is_cached_by_device_inode_size_and_mtime(tmp_path: Path) -> None:
    binary = tmp_path / "app"
    binary.write_bytes(b"version-1")
    fake_process(tmp_path / "proc", exe=binary)
    attestor = UnixAttestor(UnixConfig(hash_binary=True), proc_root=tmp_path / "proc")
    first = attest(attestor)
    before = binary.stat()
    binary.write_bytes(b"version-2")  # same size, same inode ...
    os.utime(binary, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the old mtime
    assert attest(attestor) == first, "an unchanged key is served from the cache"
    os.utime(binary, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    changed = attest(attestor)
    assert f"unix:sha256:{hashlib.sha256(b'version-2').hexdigest()}" in changed


def test_unix_binaries_above_the_limit_get_no_sha256(tmp_path: Path) -> None:
    binary = tmp_path / "app"
    binary.write_bytes(b"x" * 100)
    fake_process(tmp_path / "proc", exe=binary)
    config = UnixConfig(hash_binary=True, max_hash_bytes=99)
    selectors = attest(UnixAttestor(config, proc_root=tmp_path / "proc"))
    assert "unix:uid:0" in selectors
    assert not any(s.startswith("unix:sha256:") for s in selectors)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("Gid:\t0\t0\t0\t0\n", "no effective Uid"),
        ("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\tx\n", "Groups holds 'x'"),
    ],
    ids=["no Uid line", "garbage group"],
)
def test_unix_malformed_status_is_refused(tmp_path: Path, status: str, reason: str) -> None:
    fake_process(tmp_path, status=status)
    with pytest.raises(AttestationFailed, match=reason):
        attest(UnixAttestor(proc_root=tmp_path))


def test_unix_on_the_real_proc_sees_this_process() -> None:
    selectors = attest(UnixAttestor(UnixConfig(discover_path=True)), os.getpid())
    assert f"unix:uid:{os.geteuid()}" in selectors
    assert f"unix:gid:{os.getegid()}" in selectors
    assert f"unix:path:{os.path.realpath(f'/proc/{os.getpid()}/exe')}" in selectors


# --- cgroup shapes -----------------------------------------------------------------------------

CGROUP_CASES = [
    # id, /proc/PID/cgroup, systemd unit, container id, (pod uid, container id)
    ("host service, v2", "0::/system.slice/nginx.service\n", "nginx.service", None, None),
    (
        "host service, v1 name=systemd",
        "12:memory:/system.slice/nginx.service\n1:name=systemd:/system.slice/nginx.service\n",
        "nginx.service",
        None,
        None,
    ),
    (
        "user session: the system manager's unit, not the delegated name",
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/fake-nginx.service\n",
        "user@1000.service",
        None,
        None,
    ),
    (
        "Delegate=yes sub-cgroup",
        "0::/system.slice/build.service/payload/inner.scope\n",
        "build.service",
        None,
        None,
    ),
    ("no unit", "0::/\n", None, None, None),
    (
        "docker, cgroup v1",
        f"5:memory:/docker/{CID}\n4:cpu:/docker/{CID}\n1:name=systemd:/docker/{CID}\n",
        None,
        CID,
        None,
    ),
    (
        "docker, cgroup v2 systemd driver",
        f"0::/system.slice/docker-{CID}.scope\n",
        f"docker-{CID}.scope",
        CID,
        None,
    ),
    (
        "kubelet cgroupfs driver",
        f"3:cpu:/kubepods/burstable/pod{POD}/{CID}\n",
        None,
        CID,
        (POD, CID),
    ),
    (
        "kubelet systemd driver, containerd, v2",
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{POD_}.slice/cri-containerd-{CID}.scope\n",
        f"cri-containerd-{CID}.scope",
        CID,
        (POD, CID),
    ),
    (
        "containerd's slice:runtime:id naming",
        f"0::/kubepods-burstable-pod{POD_}.slice:cri-containerd:{CID}\n",
        None,
        CID,
        (POD, CID),
    ),
    (
        "CRI-O",
        f"0::/kubepods.slice/kubepods-pod{POD_}.slice/crio-{CID}.scope\n",
        f"crio-{CID}.scope",
        CID,
        (POD, CID),
    ),
    ("containerd namespace", f"0::/k8s.io/{CID}\n", None, CID, None),
    (
        "a bare 64-hex folder elsewhere is not a container",
        f"0::/system.slice/backup.service/{CID}\n",
        "backup.service",
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("text", "unit", "container", "pod"),
    [case[1:] for case in CGROUP_CASES],
    ids=[case[0] for case in CGROUP_CASES],
)
def test_cgroup_shapes(
    tmp_path: Path,
    text: str,
    unit: str | None,
    container: str | None,
    pod: tuple[str, str] | None,
) -> None:
    groups = parse_cgroup_file(text)
    assert systemd_unit(groups) == unit
    assert container_id(groups) == container
    assert pod_container(groups) == pod
    fake_process(tmp_path, cgroup=text)
    assert attest(SystemdAttestor(proc_root=tmp_path)) == (
        {f"systemd:id:{unit}"} if unit else set()
    )
    assert attest(DockerAttestor(proc_root=tmp_path)) == (
        {f"docker:container_id:{container}"} if container else set()
    )


def test_kind_pod_uses_the_pod_lines_only() -> None:
    # Kubernetes in docker: the unified line names the kind node's container, v1 lines the pod's.
    text = (
        f"13:name=systemd:/docker/{KIND_NODE}/kubepods/besteffort/pod{POD}/{CID}\n"
        f"12:pids:/docker/{KIND_NODE}/kubepods/besteffort/pod{POD}/{CID}\n"
        f"0::/docker/{KIND_NODE}/system.slice/containerd.service\n"
    )
    groups = parse_cgroup_file(text)
    assert pod_container(groups) == (POD, CID)
    with pytest.raises(AttestationFailed, match="more than one container id"):
        container_id(groups)  # the docker attestor cannot tell which one: it refuses


@pytest.mark.parametrize(
    "text",
    ["garbage\n", "1:cpu:relative/path\n"],
    ids=["no fields", "relative path"],
)
def test_malformed_cgroup_files_are_refused(text: str) -> None:
    with pytest.raises(AttestationFailed, match="malformed"):
        parse_cgroup_file(text)


# --- the composite and pid reuse ---------------------------------------------------------------


class _Reuses:
    """Stands in for the kernel handing the pid to a new process mid-attestation."""

    name = "reuse"

    def __init__(self, root: Path) -> None:
        self._root = root

    async def attest(self, pid: int) -> frozenset[str]:
        fake_process(self._root, pid, start_time=999999)
        return frozenset({"reuse:x"})


def test_composite_unions_the_attestors(tmp_path: Path) -> None:
    fake_process(tmp_path, cgroup=f"0::/system.slice/docker-{CID}.scope\n")
    composite = CompositeAttestor(
        [
            UnixAttestor(proc_root=tmp_path),
            SystemdAttestor(proc_root=tmp_path),
            DockerAttestor(proc_root=tmp_path),
        ],
        proc_root=tmp_path,
    )
    selectors = attest(composite)
    assert {"unix:uid:0", f"systemd:id:docker-{CID}.scope", f"docker:container_id:{CID}"} <= (
        selectors
    )


def test_composite_refuses_a_reused_pid(tmp_path: Path) -> None:
    fake_process(tmp_path)
    composite = CompositeAttestor(
        [UnixAttestor(proc_root=tmp_path), _Reuses(tmp_path)], proc_root=tmp_path
    )
    with pytest.raises(PidReused, match=r"pid 4242 was reused.*123456 -> 999999"):
        attest(composite)


def test_composite_refuses_a_process_that_is_gone(tmp_path: Path) -> None:
    composite = CompositeAttestor([UnixAttestor(proc_root=tmp_path)], proc_root=tmp_path)
    with pytest.raises(AttestationFailed, match="process 4242 is gone"):
        attest(composite)


def test_composite_on_the_real_proc() -> None:
    composite = build_attestor(AttestorsConfig(systemd=True, docker=True))
    assert f"unix:uid:{os.geteuid()}" in attest(composite, os.getpid())
    asyncio.run(composite.aclose())


def test_configuration_without_attestors_is_refused() -> None:
    with pytest.raises(ValueError, match="no workload attestor configured"):
        build_attestor(AttestorsConfig(unix=None))


def test_k8s_configuration_needs_a_way_to_trust_the_kubelet(tmp_path: Path) -> None:
    from workload_api.attestors import KubeletConfig

    with pytest.raises(ValueError, match="set ca_file, or skip_verify"):
        build_attestor(AttestorsConfig(k8s=K8sConfig(KubeletConfig(ca_file=None))))
    with pytest.raises(ValueError, match="must be https"):
        build_attestor(AttestorsConfig(k8s=K8sConfig(KubeletConfig(url="http://127.0.0.1:10255"))))
