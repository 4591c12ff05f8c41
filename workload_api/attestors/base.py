"""The seam between the server and the workload attestors: a pid in, selectors out."""

from __future__ import annotations

from typing import Protocol


class WorkloadAttestor(Protocol):
    """One kind of evidence about a process (``unix``, ``systemd``, ``docker``, ``k8s``)."""

    @property
    def name(self) -> str:
        """The selector type it produces, for logs."""
        ...

    async def attest(self, pid: int) -> frozenset[str]:
        """Selectors (``type:value``) of the process; raise ``AttestationFailed`` to refuse."""
        ...
