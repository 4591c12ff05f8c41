"""Real meshid processes for end-to-end tests: started, awaited on their ready line, stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT = 60.0  # seconds; generous for a loaded 2-core CI machine
SERVER_READY = "meshid server ready"


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def meshid(
    *args: str, env: dict[str, str] | None = None, check: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "meshid", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class _Component:
    """A ``meshid`` subprocess whose output is collected and whose ready line is awaited."""

    ready_line = ""
    proc: subprocess.Popen[str] | None
    output: list[str]
    _pump: threading.Thread

    def _args(self) -> list[str]:
        raise NotImplementedError

    def _group(self) -> int | None:
        """The gid to run as (None: ours); workload attestation reports it as ``unix:gid``."""
        return None

    def _launch(self, *, wait_ready: bool = True) -> None:
        gid = self._group()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshid", *self._args()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            group=gid,
            extra_groups=None if gid is None else [],
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                if self.ready_line in line:
                    ready.set()
            ready.set()  # process ended: wake the waiter

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if wait_ready and (not ready.wait(READY_TIMEOUT) or self.proc.poll() is not None):
            self.stop()
            raise RuntimeError(f"{self._args()[:2]} did not become ready:\n" + "".join(self.output))

    def kill(self) -> None:
        """SIGKILL: no cleanup, as in a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._close()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        assert self.proc is not None
        self._pump.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class ServerProcess(_Component):
    """``meshid server run`` in a subprocess with its output collected."""

    data_dir: Path
    socket: Path
    trust_domain: str = "example.org"
    extra_args: Sequence[str] = ()
    database: str | None = None
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    _pump: threading.Thread = field(init=False, repr=False)
    ready_line = SERVER_READY

    def _args(self) -> list[str]:
        return [
            "server", "run",
            "--data-dir", str(self.data_dir),
            "--trust-domain", self.trust_domain,
            "--admin-socket", str(self.socket),
            *(["--database", self.database] if self.database else []),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> ServerProcess:
        self._launch()
        return self

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return meshid(*args, "--socket", str(self.socket))


AGENT_READY = "meshid agent ready"


@dataclass
class AgentProcess(_Component):
    """``meshid agent run`` in a subprocess with its output collected."""

    data_dir: Path
    socket: Path
    servers: Sequence[str]
    trust_bundle: Path
    trust_domain: str = "example.org"
    join_token: str | None = None
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    _pump: threading.Thread = field(init=False, repr=False)
    ready_line = AGENT_READY

    def _args(self) -> list[str]:
        return [
            "agent", "run",
            *(["--trust-domain", self.trust_domain] if self.trust_domain else []),
            "--trust-bundle", str(self.trust_bundle),
            "--data-dir", str(self.data_dir),
            "--socket", str(self.socket),
            *[a for s in self.servers for a in ("--server", s)],
            *(["--join-token", self.join_token] if self.join_token else []),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, *, wait_ready: bool = True) -> AgentProcess:
        self._launch(wait_ready=wait_ready)
        return self


@dataclass
class ProxyProcess(_Component):
    """``meshid proxy run`` in a subprocess, awaited with ``meshid proxy wait`` on /ready.

    ``group`` runs it under another gid (the caller must be root), so that the agent's unix
    workload attestor tells two sidecars of one uid apart (entries on ``unix:gid:N``).
    """

    config: Path
    admin: str
    group: int | None = None
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    _pump: threading.Thread = field(init=False, repr=False)
    ready_line = "\0never printed\0"  # readiness is /ready, not a line

    def _args(self) -> list[str]:
        return ["proxy", "run", "--config", str(self.config)]

    def _group(self) -> int | None:
        return self.group

    def start(self) -> ProxyProcess:
        self._launch(wait_ready=False)
        waited = meshid("proxy", "wait", "--admin", self.admin, "--timeout", str(READY_TIMEOUT))
        if waited.returncode != 0 or self.proc is None or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(
                f"proxy {self.config} did not become ready: {waited.stderr}" + "".join(self.output)
            )
        return self
