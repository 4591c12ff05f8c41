"""``meshid demo``: a server in a temporary folder, driven through the real CLI and admin API.

It shows what an operator does on day one: start the server, register two workloads, mint an
X.509-SVID and a JWT-SVID, look at the bundle, and read and verify the audit trail. Later issues
extend it into the full local mesh (agent, Workload API, sidecars).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .client import AdminClient, AdminError

READY_TIMEOUT = 30.0  # seconds for the server to migrate, create its authorities and listen
TRUST_DOMAIN = "example.org"


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _meshid(*args: str, socket: Path) -> str:
    cmd = [sys.executable, "-m", "meshid", *args, "--socket", str(socket)]
    print(f"$ meshid {shlex.join(args)}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    out = (done.stdout + done.stderr).rstrip()
    if out:
        print(out, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"demo step failed: meshid {shlex.join(args)}")
    return done.stdout


def _wait_ready(proc: subprocess.Popen[str], socket: Path) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    for line in proc.stdout:
        print(f"  [server] {line.rstrip()}", flush=True)
        if "meshid server ready" in line:
            break
        if time.monotonic() > deadline:
            break
    with AdminClient(socket) as client:
        try:
            client.json("GET", "/v1/health")
        except AdminError as err:
            raise SystemExit(f"the server did not come up: {err}") from err


def run_demo(*, keep: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="meshid-demo-") as tmp:
        root = Path(tmp)
        data_dir = root / "server"
        socket = root / "admin" / "admin.sock"
        _step(f"Starting meshid server for trust domain {TRUST_DOMAIN} in {data_dir}")
        proc = subprocess.Popen(  # noqa: S603
            [
                sys.executable,
                "-m",
                "meshid",
                "server",
                "run",
                "--data-dir",
                str(data_dir),
                "--trust-domain",
                TRUST_DOMAIN,
                "--admin-socket",
                str(socket),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            _wait_ready(proc, socket)
            _meshid("server", "healthcheck", "--verbose", socket=socket)

            _step("Registering two workloads under a node")
            for name, uid in (("web", "1000"), ("billing", "1001")):
                _meshid(
                    "entry",
                    "create",
                    "--spiffe-id",
                    f"spiffe://{TRUST_DOMAIN}/{name}",
                    "--parent-id",
                    f"spiffe://{TRUST_DOMAIN}/node/demo",
                    "--selector",
                    f"unix:uid:{uid}",
                    "--x509-ttl",
                    "600",
                    socket=socket,
                )

            _step("A bad request is refused with the field and the rule, and nothing is written")
            bad = subprocess.run(  # noqa: S603
                [
                    sys.executable,
                    "-m",
                    "meshid",
                    "entry",
                    "create",
                    "--socket",
                    str(socket),
                    "--spiffe-id",
                    f"spiffe://{TRUST_DOMAIN}/web/",
                    "--parent-id",
                    f"spiffe://{TRUST_DOMAIN}/node/demo",
                    "--selector",
                    "unix:uid:1000",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            print(f"$ meshid entry create --spiffe-id spiffe://{TRUST_DOMAIN}/web/ ...")
            print(f"{bad.stderr.rstrip()}  (exit {bad.returncode})")

            _step("Minting an X.509-SVID (the key is generated locally)")
            svid_dir = root / "svid"
            _meshid(
                "x509",
                "mint",
                "--spiffe-id",
                f"spiffe://{TRUST_DOMAIN}/web",
                "--ttl",
                "300",
                "--write",
                str(svid_dir),
                socket=socket,
            )
            print(f"  svid.key mode: {oct((svid_dir / 'svid.key').stat().st_mode & 0o777)}")

            _step("Minting a JWT-SVID")
            token = _meshid(
                "jwt",
                "mint",
                "--spiffe-id",
                f"spiffe://{TRUST_DOMAIN}/web",
                "--audience",
                "billing",
                socket=socket,
            ).strip()
            print(f"  (a compact JWS of {len(token)} characters)")

            _step("The trust bundle in SPIFFE format")
            _meshid("bundle", "show", "--format", "spiffe", socket=socket)

            _step("Signing authorities")
            _meshid("authority", "x509", "show", socket=socket)
            _meshid("authority", "jwt", "show", socket=socket)

            _step("The audit trail, hash-chained")
            _meshid("audit", "list", socket=socket)
            _meshid("audit", "verify", socket=socket)

            _step("Where to look next")
            print(f"  admin socket : {socket}   (export MESHID_SERVER_SOCKET={socket})")
            print("  OpenAPI      : curl --unix-socket $MESHID_SERVER_SOCKET http://x/openapi.json")
            print("  docs         : docs/server.md, docs/cli.md")
            if keep:
                print("\nServer left running; press Ctrl-C to stop.", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    proc.wait()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        print("\nDemo finished; the server stopped and its temporary folder was removed.")
    return 0
