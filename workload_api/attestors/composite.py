"""Running the configured attestors for one caller, guarded against pid reuse.

A pid names a process only while it lives: a caller could connect, exit, and have its pid handed
to another process before attestation reads /proc. So the process's start time (field 22 of
/proc/PID/stat) is read before and after all attestors ran; if it changed, or the process is
gone, attestation is refused. The union of the attestors' selectors is the workload's.

Any attestor's failure fails the whole attestation (as in SPIRE): a partial selector set is
never handed on. ``build_attestor`` turns a configuration into the composite; it must not know
about the server or the provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from ..errors import AttestationFailed
from ._proc import DEFAULT_PROC_ROOT, start_time
from .base import WorkloadAttestor
from .docker import DockerAttestor
from .k8s import DEFAULT_POLL_ATTEMPTS, DEFAULT_POLL_INTERVAL, K8sAttestor
from .kubelet import HttpsKubeletClient, KubeletConfig
from .systemd import SystemdAttestor
from .unix import UnixAttestor, UnixConfig


class PidReused(AttestationFailed):
    """The pid named another process by the time attestation finished."""


class CompositeAttestor:
    """``attest(pid)``: the union of every configured attestor's selectors."""

    name = "composite"

    def __init__(
        self,
        attestors: Sequence[WorkloadAttestor],
        *,
        proc_root: Path = DEFAULT_PROC_ROOT,
        kubelet: HttpsKubeletClient | None = None,
    ) -> None:
        self._attestors = tuple(attestors)
        self._proc_root = proc_root
        self._kubelet = kubelet  # owned: closed by aclose()

    @property
    def attestors(self) -> tuple[WorkloadAttestor, ...]:
        return self._attestors

    async def attest(self, pid: int) -> frozenset[str]:
        before = start_time(self._proc_root, pid)
        selectors: set[str] = set()
        for attestor in self._attestors:  # in turn: a refusal leaves no sibling running
            try:
                selectors |= await attestor.attest(pid)
            except AttestationFailed as err:
                raise AttestationFailed(f"{attestor.name} attestor: {err}") from err
        after = start_time(self._proc_root, pid)
        if after != before:
            raise PidReused(
                f"pid {pid} was reused during attestation (start time {before} -> {after})"
            )
        return frozenset(selectors)

    async def aclose(self) -> None:
        if self._kubelet is not None:
            await self._kubelet.aclose()


@dataclass(frozen=True)
class K8sConfig:
    kubelet: KubeletConfig = field(default_factory=KubeletConfig)
    poll_attempts: int = DEFAULT_POLL_ATTEMPTS
    poll_interval: timedelta = DEFAULT_POLL_INTERVAL


@dataclass(frozen=True)
class AttestorsConfig:
    """Which attestors run; ``None``/``False`` leaves one out. ``unix`` runs by default."""

    unix: UnixConfig | None = field(default_factory=UnixConfig)
    systemd: bool = False
    docker: bool = False
    k8s: K8sConfig | None = None
    proc_root: Path = DEFAULT_PROC_ROOT


def build_attestor(config: AttestorsConfig) -> CompositeAttestor:
    """The composite of the configured attestors (``aclose()`` it at shutdown)."""
    attestors: list[WorkloadAttestor] = []
    if config.unix is not None:
        attestors.append(UnixAttestor(config.unix, proc_root=config.proc_root))
    if config.systemd:
        attestors.append(SystemdAttestor(proc_root=config.proc_root))
    if config.docker:
        attestors.append(DockerAttestor(proc_root=config.proc_root))
    kubelet = None
    if config.k8s is not None:
        kubelet = HttpsKubeletClient(config.k8s.kubelet)
        attestors.append(
            K8sAttestor(
                kubelet,
                proc_root=config.proc_root,
                poll_attempts=config.k8s.poll_attempts,
                poll_interval=config.k8s.poll_interval,
            )
        )
    if not attestors:
        raise ValueError("no workload attestor configured: every caller would be refused")
    return CompositeAttestor(attestors, proc_root=config.proc_root, kubelet=kubelet)
