"""``meshid demo``: a local mesh in a temporary folder, driven through the real CLI.

It shows what an operator does on day one: start the server and a node agent, register
workloads, watch a workload (this process, through the real py-spiffe client) receive its
X.509-SVID and a rotation, fetch a JWT-SVID, then read and verify the audit trail. Later issues
add the sidecars and traffic.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket as socketlib
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

READY_TIMEOUT = 60.0  # seconds for a component to print its ready line
ROTATION_TIMEOUT = 30.0  # the demo's SVIDs live 12 s, so a rotation comes within ~6 s
TRUST_DOMAIN = "example.org"
DEMO_SVID_TTL = "12"  # seconds: short, so the demo shows a live rotation


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _meshid(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"$ meshid {shlex.join(args)}", flush=True)
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "meshid", *args], capture_output=True, text=True, check=False
    )
    out = (done.stdout + done.stderr).rstrip()
    if out:
        print(out, flush=True)
    if check and done.returncode != 0:
        raise SystemExit(f"demo step failed: meshid {shlex.join(args)}")
    return done


@contextlib.contextmanager
def _component(name: str, args: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``meshid ARGS`` until the block ends; its output is shown prefixed with ``name``."""
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "meshid", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"  [{name}] {line.rstrip()}", flush=True)
            if ready in line:
                seen.set()
        seen.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not seen.wait(READY_TIMEOUT) or proc.poll() is not None:
            raise SystemExit(f"the {name} did not come up")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def _free_port() -> int:
    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _watch_rotation(endpoint: str) -> None:
    """This process is a workload: py-spiffe's X509Source gets its SVID and then a new one."""
    from spiffe import WorkloadApiClient, X509Source

    source = X509Source(workload_api_client=WorkloadApiClient(endpoint), timeout_in_seconds=30)
    try:
        first = source.get_x509_context().default_svid
        print(
            f"  X509Source: {first.spiffe_id} serial {first.leaf.serial_number:#x} "
            f"expires {first.leaf.not_valid_after_utc:%H:%M:%S}",
            flush=True,
        )
        rotated = threading.Event()

        def on_update() -> None:
            if (
                source.get_x509_context().default_svid.leaf.serial_number
                != first.leaf.serial_number
            ):
                rotated.set()

        source.subscribe_for_updates(on_update)
        if rotated.wait(ROTATION_TIMEOUT):
            svid = source.get_x509_context().default_svid
            print(
                f"  rotated:    {svid.spiffe_id} serial {svid.leaf.serial_number:#x} "
                f"expires {svid.leaf.not_valid_after_utc:%H:%M:%S} (pushed, no reconnect)",
                flush=True,
            )
        else:
            print("  (no rotation seen in time)", flush=True)
    finally:
        source.close()


def run_demo(*, keep: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="meshid-demo-", dir="/tmp") as tmp:
        root = Path(tmp)
        admin = root / "admin" / "admin.sock"
        workload_socket = root / "agent-public" / "api.sock"
        endpoint = f"unix://{workload_socket}"
        port = _free_port()
        sock = ["--socket", str(admin)]
        _step(f"Starting the meshid server for trust domain {TRUST_DOMAIN}")
        server_args = [
            "server", "run", "--data-dir", str(root / "server"), "--trust-domain", TRUST_DOMAIN,
            "--admin-socket", str(admin), "--bind", f"127.0.0.1:{port}",
        ]  # fmt: skip
        with _component("server", server_args, "meshid server ready"):
            _meshid("server", "healthcheck", "--verbose", *sock)

            _step("A join token for the node agent (single use, stored hashed)")
            token = json.loads(_meshid("token", "generate", "-o", "json", *sock).stdout)
            bundle = root / "bundle.pem"
            bundle.write_text(_meshid("bundle", "show", *sock).stdout)

            _step("Starting the node agent: it attests with the token and serves the Workload API")
            agent_args = [
                "agent", "run", "--trust-domain", TRUST_DOMAIN, "--server", f"127.0.0.1:{port}",
                "--trust-bundle", str(bundle), "--data-dir", str(root / "agent"),
                "--socket", str(workload_socket), "--join-token", token["token"],
            ]  # fmt: skip
            with _component("agent", agent_args, "meshid agent ready"):
                _step(
                    f"Registering workloads under the agent (this demo runs as uid {os.getuid()})"
                )
                for name, uid in (("web", os.getuid()), ("billing", 1001)):
                    _meshid(
                        "entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/{name}",
                        "--parent-id", token["agent_id"], "--selector", f"unix:uid:{uid}",
                        "--x509-ttl", DEMO_SVID_TTL, *sock,
                    )  # fmt: skip

                _step("A bad request is refused, naming the field and the rule; nothing is written")
                _meshid(
                    "entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/web/",
                    "--parent-id", token["agent_id"], "--selector", "unix:uid:0", *sock,
                    check=False,
                )  # fmt: skip

                _step("The workload fetches its X.509-SVID with py-spiffe (meshid svid fetch)")
                _meshid("svid", "fetch", "x509", "--socket", str(workload_socket))

                _step("A live rotation: the agent renews at half-life and pushes the new SVID")
                _watch_rotation(endpoint)

                _step("A JWT-SVID for audience 'billing'")
                jwt = _meshid(
                    "svid",
                    "fetch",
                    "jwt",
                    "--audience",
                    "billing",
                    "--socket",
                    str(workload_socket),
                )
                print(f"  (a compact JWS of {len(jwt.stdout.strip())} characters)")

                _step("Agents, authorities and the bundle")
                _meshid("agent", "list", *sock)
                _meshid("authority", "x509", "show", *sock)
                _meshid("bundle", "show", "--format", "spiffe", *sock)

                _step("The audit trail, hash-chained (issuances name the agent as actor)")
                _meshid("audit", "list", "--kind", "x509_svid.issued", "--limit", "5", *sock)
                _meshid("audit", "verify", *sock)

                _step("Where to look")
                print(f"  admin socket     : export MESHID_SERVER_SOCKET={admin}")
                print(f"  Workload API     : export SPIFFE_ENDPOINT_SOCKET={endpoint}")
                print(
                    "  OpenAPI          : curl --unix-socket $MESHID_SERVER_SOCKET http://x/openapi.json"
                )
                print("  docs             : docs/server.md, docs/agent.md, docs/cli.md")
                if keep:
                    print("\nServer and agent left running; press Ctrl-C to stop.", flush=True)
                    with contextlib.suppress(KeyboardInterrupt):
                        threading.Event().wait()
        print("\nDemo finished; server and agent stopped, temporary folder removed.")
    return 0
