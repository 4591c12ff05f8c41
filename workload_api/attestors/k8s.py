"""The ``k8s`` workload attestor: the pod and container of the process, described by the kubelet.

The process's cgroup names its pod UID and container id (``cgroups.pod_container``); the
kubelet's ``/pods`` answer (a ``PodList``) describes that pod. Selectors (SPIRE's names)::

    k8s:ns:payments                 k8s:sa:billing            k8s:pod-name:billing-7d9f-x2k
    k8s:pod-uid:<uid>               k8s:node-name:node-a      k8s:container-name:app
    k8s:container-image:<image>     (the spec image and the resolved imageID, both)
    k8s:pod-label:app:billing       (one per label, KEY:VALUE)

A just-started container may be missing from the kubelet's list for a moment: the attestor asks
again, ``poll_attempts`` times ``poll_interval`` apart, then refuses. A process outside a pod
gets no selector. The HTTP part is behind ``KubeletClient`` (``kubelet.HttpsKubeletClient`` is
the real one); turning its answer into selectors is ``selectors_from_pod_list``, pure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from ..errors import AttestationFailed
from ._proc import DEFAULT_PROC_ROOT, read_text
from .cgroups import parse_cgroup_file, pod_container

SELECTOR_TYPE = "k8s"
DEFAULT_POLL_ATTEMPTS = 60  # SPIRE's default: a container may take a while to be listed
DEFAULT_POLL_INTERVAL = timedelta(milliseconds=500)  # SPIRE's default retry interval
_STATUS_LISTS = ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")


class KubeletClient(Protocol):
    """What the attestor needs from the kubelet."""

    async def get_pods(self) -> bytes:
        """The body of the kubelet's ``GET /pods`` (a v1 ``PodList`` as JSON)."""
        ...


class K8sAttestor:
    name = SELECTOR_TYPE

    def __init__(
        self,
        kubelet: KubeletClient,
        *,
        proc_root: Path = DEFAULT_PROC_ROOT,
        poll_attempts: int = DEFAULT_POLL_ATTEMPTS,
        poll_interval: timedelta = DEFAULT_POLL_INTERVAL,
    ) -> None:
        if poll_attempts < 1:
            raise ValueError(f"poll_attempts must be at least 1 (got {poll_attempts})")
        self._kubelet = kubelet
        self._proc_root = proc_root
        self._poll_attempts = poll_attempts
        self._poll_interval = poll_interval

    async def attest(self, pid: int) -> frozenset[str]:
        found = pod_container(parse_cgroup_file(read_text(self._proc_root, pid, "cgroup")))
        if found is None:
            return frozenset()
        pod_uid, container_id = found
        for attempt in range(1, self._poll_attempts + 1):
            selectors = selectors_from_pod_list(
                await self._kubelet.get_pods(), pod_uid, container_id
            )
            if selectors is not None:
                return selectors
            if attempt < self._poll_attempts:
                await asyncio.sleep(self._poll_interval.total_seconds())
        raise AttestationFailed(
            f"container {container_id} of pod {pod_uid} is not in the kubelet's pod list after "
            f"{self._poll_attempts} attempts"
        )


def selectors_from_pod_list(body: bytes, pod_uid: str, container_id: str) -> frozenset[str] | None:
    """The ``k8s:*`` selectors of the container, or None when the list does not hold it yet."""
    try:
        document = json.loads(body)
    except ValueError as err:
        raise AttestationFailed(f"the kubelet's /pods answer is not JSON: {err}") from err
    items = document.get("items") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise AttestationFailed("the kubelet's /pods answer is not a PodList (no items list)")
    for pod in items:
        metadata = _mapping(pod, "metadata")
        if metadata.get("uid") != pod_uid:
            continue
        status = _mapping(pod, "status")
        for container in _statuses(status):
            if _runtime_id(container.get("containerID")) == container_id:
                return _selectors(metadata, _mapping(pod, "spec"), container)
    return None


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    inner = value.get(key) if isinstance(value, dict) else None
    return inner if isinstance(inner, dict) else {}


def _statuses(status: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    for key in _STATUS_LISTS:
        entries = status.get(key)
        if isinstance(entries, list):
            yield from (entry for entry in entries if isinstance(entry, dict))


def _runtime_id(value: object) -> str | None:
    # "containerd://<id>", "docker://<id>", "cri-o://<id>"; empty while the container starts.
    if not isinstance(value, str) or "://" not in value:
        return None
    return value.split("://", 1)[1] or None


def _selectors(
    metadata: Mapping[str, Any], spec: Mapping[str, Any], container: Mapping[str, Any]
) -> frozenset[str]:
    values = {
        "ns": metadata.get("namespace"),
        "sa": spec.get("serviceAccountName"),
        "pod-name": metadata.get("name"),
        "pod-uid": metadata.get("uid"),
        "node-name": spec.get("nodeName"),
        "container-name": container.get("name"),
    }
    selectors = {f"k8s:{kind}:{value}" for kind, value in values.items() if value}
    for image in (container.get("image"), container.get("imageID")):
        if isinstance(image, str) and image:
            selectors.add(f"k8s:container-image:{image}")
    labels = metadata.get("labels")
    if isinstance(labels, dict):
        selectors.update(f"k8s:pod-label:{key}:{value}" for key, value in labels.items())
    return frozenset(selectors)
