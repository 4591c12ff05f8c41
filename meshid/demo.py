"""``meshid demo``: a local mesh in a temporary folder, driven through the real CLI.

It shows what an operator does on day one: start the server and two node agents, register
workloads, fetch an X.509-SVID and a JWT-SVID with the real py-spiffe client, then run the mesh:
a backend app behind its sidecar ("web"), this process as the client app behind its own sidecar
("frontend"), both sidecars taking their identity from the Workload API. Requests cross with mTLS
(the backend prints the verified caller from ``x-forwarded-client-cert``), a DENY policy applied
on the server reaches the web sidecar and refuses one request, both sidecars rotate their SVIDs
under traffic, and the demo ends with where to look: admin endpoints, access log, audit trail.

The two sidecars run as the same user, so they live on two "nodes" (two agents) whose entries
select ``unix:uid``; on one node they would need distinct uids or gids, which takes root.
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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

READY_TIMEOUT = 60.0  # seconds for a component to print its ready line
ROTATION_TIMEOUT = 30.0  # the demo's SVIDs live 8 s, so a rotation comes within ~4 s
POLICY_TIMEOUT = 15.0  # seconds for a policy applied on the server to reach the sidecar
TRUST_DOMAIN = "example.org"
DEMO_SVID_TTL = "8"  # seconds: short, so the demo shows a live rotation
WEB = f"spiffe://{TRUST_DOMAIN}/web"
FRONTEND = f"spiffe://{TRUST_DOMAIN}/frontend"
DENY_ADMIN = f"""\
apiVersion: meshid/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin-from-frontend}}
spec:
  selector: {{spiffe_ids: ["{WEB}"]}}
  action: DENY
  rules:
    - from: [{{source: {{principals: ["{FRONTEND}"]}}}}]
      to: [{{operation: {{paths: ["/admin", "/admin/*"]}}}}]
"""


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


class _EchoHandler(BaseHTTPRequestHandler):
    """The backend app: answers with the path and the caller the web sidecar verified."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        xfcc = self.headers.get_all("x-forwarded-client-cert") or []
        body = json.dumps({"path": self.path, "x-forwarded-client-cert": xfcc}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the demo prints what matters itself


@contextlib.contextmanager
def _backend() -> Iterator[int]:
    """The backend app on a loopback port, in a thread of this process."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A GET from the client app (this process) to its sidecar's plain loopback listener."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _admin(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=10) as answer:
        return str(answer.read().decode())


def _metric(admin: str, name: str) -> float:
    samples = [
        float(line.rsplit(" ", 1)[1])
        for line in _admin(admin, "/metrics").splitlines()
        if line.startswith(name)
    ]
    return sum(samples)


def _served_serial(port: int) -> str:
    """The serial of the SVID a sidecar presents on its mTLS listener right now. TLS 1.3 shows
    the server's certificate before the server refuses us for sending none."""
    import ssl

    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with (
        socketlib.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return f"{x509.load_der_x509_certificate(der).serial_number:#x}"


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    """Poll state held by another process (a sidecar); no event crosses the boundary."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def _write_yaml(path: Path, config: dict[str, object]) -> Path:
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def _start_agent(
    stack: contextlib.ExitStack, root: Path, name: str, port: int, admin: Path
) -> tuple[str, Path]:
    """Start a node agent with a fresh join token; its SPIFFE ID and Workload API socket."""
    token = json.loads(_meshid("token", "generate", "-o", "json", "--socket", str(admin)).stdout)
    socket = root / name / "api.sock"
    args = [
        "agent", "run", "--server", f"127.0.0.1:{port}", "--trust-bundle", str(root / "bundle.pem"),
        "--data-dir", str(root / name / "data"), "--socket", str(socket),
        "--join-token", token["token"],
    ]  # fmt: skip
    stack.enter_context(_component(name, args, "meshid agent ready"))
    return str(token["agent_id"]), socket


def run_demo(*, keep: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="meshid-demo-", dir="/tmp") as tmp:
        with contextlib.ExitStack() as stack:
            _run(Path(tmp), stack, keep=keep)
        print("\nDemo finished; every process stopped, temporary folder removed.")
    return 0


def _run(root: Path, stack: contextlib.ExitStack, *, keep: bool) -> None:
    admin = root / "admin" / "admin.sock"
    port = _free_port()
    sock = ["--socket", str(admin)]
    uid = os.getuid()
    _step(f"Starting the meshid server for trust domain {TRUST_DOMAIN}")
    server_args = [
        "server", "run", "--data-dir", str(root / "server"), "--trust-domain", TRUST_DOMAIN,
        "--admin-socket", str(admin), "--bind", f"127.0.0.1:{port}",
    ]  # fmt: skip
    stack.enter_context(_component("server", server_args, "meshid server ready"))
    (root / "bundle.pem").write_text(_meshid("bundle", "show", *sock).stdout)

    _step("Two node agents attest with single-use join tokens and serve the Workload API")
    node_a, socket_a = _start_agent(stack, root, "agent-a", port, admin)
    node_b, socket_b = _start_agent(stack, root, "agent-b", port, admin)

    _step(f"Registering workloads: web on agent-a, frontend on agent-b (uid {uid})")
    for spiffe_id, parent in ((WEB, node_a), (FRONTEND, node_b)):
        _meshid(
            "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", parent,
            "--selector", f"unix:uid:{uid}", "--x509-ttl", DEMO_SVID_TTL, *sock,
        )  # fmt: skip
    _step("A bad request is refused, naming the field and the rule; nothing is written")
    _meshid(
        "entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/web/",
        "--parent-id", node_a, "--selector", "unix:uid:0", *sock, check=False,
    )  # fmt: skip

    _step("A workload fetches its SVIDs with py-spiffe: X.509, then a JWT for audience 'billing'")
    _meshid("svid", "fetch", "x509", "--socket", str(socket_a))
    jwt = _meshid("svid", "fetch", "jwt", "--audience", "billing", "--socket", str(socket_a))
    print(f"  (a compact JWS of {len(jwt.stdout.strip())} characters)")

    _step("The backend app and its sidecar (inbound mTLS, policies streamed from the server)")
    backend = stack.enter_context(_backend())
    web_listen, web_admin = _free_port(), f"127.0.0.1:{_free_port()}"
    web_yaml = _write_yaml(
        root / "web.yaml",
        {
            "identity": {"workload_api": f"unix://{socket_a}"},
            "admin": {"listen": web_admin},
            "inbound": [
                {"name": "web", "listen": f"127.0.0.1:{web_listen}",
                 "forward": f"127.0.0.1:{backend}", "protocol": "http"},
            ],
            "policy": {"server": f"127.0.0.1:{port}"},
            "access_log": {"path": str(root / "web-access.log")},
            "debug": True,
        },
    )  # fmt: skip
    stack.enter_context(
        _component("web-sidecar", ["proxy", "run", "--config", str(web_yaml)], "meshid proxy ready")
    )
    print(f"  backend app on 127.0.0.1:{backend}, its sidecar's mTLS listener on :{web_listen}")

    _step("The client app's sidecar (outbound: plain on loopback, mTLS to the web sidecar)")
    out_listen, front_admin = _free_port(), f"127.0.0.1:{_free_port()}"
    front_yaml = _write_yaml(
        root / "frontend.yaml",
        {
            "identity": {"workload_api": f"unix://{socket_b}"},
            "admin": {"listen": front_admin},
            "outbound": [
                {"name": "to-web", "listen": f"127.0.0.1:{out_listen}",
                 "upstream": [f"127.0.0.1:{web_listen}"], "expect_ids": [WEB], "protocol": "http"},
            ],
            "access_log": {"path": str(root / "frontend-access.log")},
        },
    )  # fmt: skip
    stack.enter_context(
        _component(
            "frontend-sidecar", ["proxy", "run", "--config", str(front_yaml)], "meshid proxy ready"
        )
    )
    _meshid("proxy", "wait", "--admin", front_admin)

    _step("Requests cross the mesh with mTLS; the backend sees the verified caller")
    for path in ("/", "/orders/42"):
        status, _, body = _get(out_listen, path)
        print(f"  GET {path} -> {status}  backend saw {body.decode()}", flush=True)
        if status != 200:
            raise SystemExit(f"demo step failed: GET {path} answered {status}")

    _step("A DENY policy on the server reaches the web sidecar over its policy stream")
    deny = root / "deny-admin.yaml"
    deny.write_text(DENY_ADMIN)
    print(DENY_ADMIN.rstrip())
    revision = json.loads(_admin(web_admin, "/config"))["effective"]["policy_revision"]
    _meshid("policy", "apply", "--file", str(deny), *sock)
    if not _wait_until(
        lambda: (
            json.loads(_admin(web_admin, "/config"))["effective"]["policy_revision"] != revision
        ),
        POLICY_TIMEOUT,
    ):
        raise SystemExit("demo step failed: the policy did not reach the web sidecar")
    status, headers, body = _get(out_listen, "/admin")
    denied_by = headers.get("x-meshid-denied-by", "?")
    print(f"  GET /admin -> {status} {body.decode()!r} (x-meshid-denied-by: {denied_by})")
    status, _, _ = _get(out_listen, "/orders/42")
    print(f"  GET /orders/42 -> {status} (still allowed)")

    _step("A live rotation under traffic: both sidecars take new SVIDs, no request fails")
    before = _served_serial(web_listen)
    rotations = _metric(front_admin, "meshid_proxy_identity_rotations_total")
    print(f"  web sidecar presents serial {before}")
    sent = failed = 0
    deadline = time.monotonic() + ROTATION_TIMEOUT
    while time.monotonic() < deadline:
        status, _, _ = _get(out_listen, "/orders/42")
        sent, failed = sent + 1, failed + (status != 200)
        if sent % 50 == 0 and (
            _metric(front_admin, "meshid_proxy_identity_rotations_total") > rotations
            and _served_serial(web_listen) != before
        ):
            break
    after = _served_serial(web_listen)
    print(f"  web sidecar presents serial {after} after {sent} requests, {failed} failed")
    rotated = _metric(front_admin, "meshid_proxy_identity_rotations_total") - rotations
    print(f"  frontend sidecar put {rotated:g} new SVIDs in use (audit: issued by the server)")
    _meshid(
        "audit",
        "list",
        "--kind",
        "x509_svid.issued",
        "--spiffe-id",
        FRONTEND,
        "--limit",
        "4",
        *sock,
    )

    _step("Where to look")
    _meshid("audit", "verify", *sock)
    ready = urllib.request.urlopen(f"http://{web_admin}/ready", timeout=10).status
    print(f"  GET http://{web_admin}/ready -> {ready}")
    effective = json.loads(_admin(web_admin, "/config"))["effective"]
    print(f"  GET http://{web_admin}/config -> effective: {json.dumps(effective)}")
    print(f"  GET http://{web_admin}/metrics (excerpt):")
    for line in _admin(web_admin, "/metrics").splitlines():
        if line.startswith(("meshid_proxy_http_requests_total", "meshid_proxy_http_authz")):
            print(f"    {line}")
    access_log = root / "web-access.log"
    denied = [
        line
        for line in access_log.read_text().splitlines()
        if json.loads(line).get("status") == 403  # one JSON object per request (docs/proxy.md)
    ]
    print(f"  web sidecar access log ({access_log}), the denied request:")
    for line in denied[-1:]:
        print(f"    {line}")
    print(f"  admin socket     : export MESHID_SERVER_SOCKET={admin}")
    print(f"  Workload API     : export SPIFFE_ENDPOINT_SOCKET=unix://{socket_a}")
    print(f"  client app port  : curl http://127.0.0.1:{out_listen}/orders/42")
    print("  audit trail      : meshid audit list / meshid audit verify (hash-chained)")
    print("  docs             : docs/server.md, docs/agent.md, docs/proxy.md, docs/policy.md")
    if keep:
        print("\nThe mesh is left running; press Ctrl-C to stop.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
