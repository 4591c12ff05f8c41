"""Workload attestors: from a caller's pid to its selectors.

Each attestor reads the kernel's records under a /proc root (tests point it at a fake tree) and
returns ``type:value`` selectors; ``CompositeAttestor`` runs the configured ones and guards
against pid reuse. They must not decide which identities match (``compose`` does).
"""

from .base import WorkloadAttestor
from .cgroups import Cgroup, container_id, parse_cgroup_file, pod_container, pod_uid, systemd_unit
from .composite import AttestorsConfig, CompositeAttestor, K8sConfig, PidReused, build_attestor
from .docker import DockerAttestor
from .k8s import K8sAttestor, KubeletClient, selectors_from_pod_list
from .kubelet import HttpsKubeletClient, KubeletConfig
from .systemd import SystemdAttestor
from .unix import UnixAttestor, UnixConfig

__all__ = [
    "AttestorsConfig",
    "Cgroup",
    "CompositeAttestor",
    "DockerAttestor",
    "HttpsKubeletClient",
    "K8sAttestor",
    "K8sConfig",
    "KubeletClient",
    "KubeletConfig",
    "PidReused",
    "SystemdAttestor",
    "UnixAttestor",
    "UnixConfig",
    "WorkloadAttestor",
    "build_attestor",
    "container_id",
    "parse_cgroup_file",
    "pod_container",
    "pod_uid",
    "selectors_from_pod_list",
    "systemd_unit",
]
