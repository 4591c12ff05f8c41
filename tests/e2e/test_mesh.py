"""End to end, the whole mesh: a real server, a real agent, two real sidecars and two apps.

    this test (client app) -> client sidecar (outbound, http) == mTLS ==> web sidecar
                                                 (inbound, http) -> backend (echoes headers)

Both sidecars take their identity from the agent's Workload API through py-spiffe. They run as
uid 0 (so they can exec the venv's interpreter under /root) with two distinct gids, and the agent's
unix attestor tells them apart by ``unix:gid`` (docs/workload-api.md). SVIDs live a few seconds,
so every test here also runs across rotations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import ssl
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.processes import AgentProcess, ProxyProcess, ServerProcess, free_port
from tests.tls_proxy._pki import mint, new_authority

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the sidecars under two gids"),
]

TD = "example.org"
WEB = f"spiffe://{TD}/web"
CLIENT = f"spiffe://{TD}/client"
CLIENT_GID = 4101  # the client sidecar's gid: its entry selects unix:gid:4101
WEB_GID = 4102  # the web sidecar's gid
SVID_TTL = 6  # seconds: the agent renews at half-life, so a rotation comes every ~3 s
STEADY_SVID_TTL = 3600
IO_TIMEOUT = 30.0  # seconds for one request in the tests below; a loaded 2-core box is slow
CONCURRENT = 1_000  # connections held open at once through one proxy pair
FDS_NEEDED = 8 * CONCURRENT  # each side of each hop holds a descriptor; headroom on top
LOAD_REQUESTS = 2_000
LOAD_ROTATIONS = 2
LOAD_DEADLINE = 60.0  # seconds; two rotations of a 6 s SVID come within ~8 s


@dataclass
class Backend:
    """The app behind the web sidecar: answers every request with its target and headers as
    JSON. It runs its own event loop in a thread so that the test's client loop can block."""

    port: int = 0
    requests: list[dict[str, object]] = field(default_factory=list)
    open_connections: int = 0
    peak_connections: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Backend:
        started = threading.Event()

        async def serve() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=4096)
            self.port = server.sockets[0].getsockname()[1]
            self._loop = asyncio.get_running_loop()
            started.set()
            async with server:
                await server.serve_forever()

        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):  # stop() cancels serve()
                asyncio.run(serve())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(10), "the backend did not start"
        return self

    def stop(self) -> None:
        assert self._loop is not None and self._thread is not None

        def cancel_all() -> None:
            for task in asyncio.all_tasks():
                task.cancel()

        self._loop.call_soon_threadsafe(cancel_all)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the backend did not stop"

    def reset_peak(self) -> None:
        self.peak_connections = self.open_connections

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.split("\r\n")
                headers = [
                    [name.strip().lower(), value.strip()]
                    for name, _, value in (line.partition(":") for line in lines if line)
                ]
                length = sum(int(v) for n, v in headers if n == "content-length")
                if length:
                    await reader.readexactly(length)
                seen: dict[str, object] = {"target": request_line.split(" ")[1], "headers": headers}
                self.requests.append(seen)
                body = json.dumps(seen).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sidecar closed the connection
        finally:
            self.open_connections -= 1
            writer.close()


@dataclass
class Mesh:
    root: Path
    server: ServerProcess
    agent: AgentProcess
    backend: Backend
    client: ProxyProcess  # outbound sidecar of the client app
    web: ProxyProcess  # inbound sidecar of the backend
    to_web: int  # outbound listener: expects the web sidecar's ID
    to_web_wrong_id: int  # outbound listener to the same sidecar, expecting another ID
    web_inbound: int  # the web sidecar's mTLS listener


def _entry(server: ServerProcess, agent_id: str, spiffe_id: str, gid: int, ttl: int) -> None:
    created = server.cli(
        "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", agent_id,
        "--selector", f"unix:gid:{gid}", "--x509-ttl", str(ttl),
    )  # fmt: skip
    assert created.returncode == 0, created.stderr


def _write_config(path: Path, config: dict[str, object]) -> Path:
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """SVIDs of SVID_TTL seconds: rotations every few seconds, for the rotation tests."""
    with _running_mesh(SVID_TTL) as running:
        yield running


@pytest.fixture
def steady_mesh() -> Iterator[Mesh]:
    """SVIDs of STEADY_SVID_TTL: for load whose TLS handshakes queue for seconds on a slow
    machine, which must not outlast the few seconds an SVID of ``mesh`` has left after its
    rotation (a load test, not a rotation test)."""
    with _running_mesh(STEADY_SVID_TTL) as running:
        yield running


@contextmanager
def _running_mesh(svid_ttl: int) -> Iterator[Mesh]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FDS_NEEDED:  # children inherit it: the sidecars hold 2 fds per connection
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FDS_NEEDED), hard))
    root = Path(tempfile.mkdtemp(prefix="mid-mesh-", dir="/tmp"))  # short: socket paths
    started: list[ServerProcess | AgentProcess | ProxyProcess] = []
    backend = Backend()
    try:
        port = free_port()
        server = ServerProcess(
            root / "srv", root / "adm" / "s.sock", extra_args=["--bind", f"127.0.0.1:{port}"]
        ).start()
        started.append(server)
        bundle = root / "bundle.pem"
        bundle.write_text(server.cli("bundle", "show").stdout)
        token = json.loads(server.cli("token", "generate", "-o", "json").stdout)
        agent = AgentProcess(
            root / "agent", root / "wl" / "api.sock", [f"127.0.0.1:{port}"], bundle,
            join_token=token["token"],
        ).start()  # fmt: skip
        started.append(agent)
        _entry(server, token["agent_id"], CLIENT, CLIENT_GID, svid_ttl)
        _entry(server, token["agent_id"], WEB, WEB_GID, svid_ttl)
        backend.start()

        workload_api = f"unix://{agent.socket}"
        web_inbound, to_web, to_web_wrong_id = free_port(), free_port(), free_port()
        web_admin, client_admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        common: dict[str, object] = {
            "identity": {"workload_api": workload_api},
            "timeouts": {"drain": 2},
            "log_level": "info",
        }
        web_config = _write_config(
            root / "web.yaml",
            {
                **common,
                "admin": {"listen": web_admin},
                "access_log": {"path": str(root / "web-access.log")},
                "inbound": [
                    {
                        "name": "web",
                        "listen": f"127.0.0.1:{web_inbound}",
                        "forward": f"127.0.0.1:{backend.port}",
                        "protocol": "http",
                    }
                ],
            },
        )
        upstream = {"upstream": [f"127.0.0.1:{web_inbound}"], "protocol": "http"}
        client_config = _write_config(
            root / "client.yaml",
            {
                **common,
                "admin": {"listen": client_admin},
                "access_log": {"path": str(root / "client-access.log")},
                "outbound": [
                    {"name": "to-web", "listen": f"127.0.0.1:{to_web}", "expect_ids": [WEB]}
                    | upstream,
                    {
                        "name": "to-web-wrong-id",
                        "listen": f"127.0.0.1:{to_web_wrong_id}",
                        "expect_ids": [f"spiffe://{TD}/billing"],
                    }
                    | upstream,
                ],
            },
        )
        web = ProxyProcess(web_config, web_admin, group=WEB_GID).start()
        started.append(web)
        client = ProxyProcess(client_config, client_admin, group=CLIENT_GID).start()
        started.append(client)
        yield Mesh(root, server, agent, backend, client, web, to_web, to_web_wrong_id, web_inbound)
    finally:
        for component in reversed(started):
            component.stop()
        if backend._thread is not None:
            backend.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Talking to the sidecars


class Refused(Exception):
    """The far side closed or reset the connection instead of answering."""


async def _request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on an open connection (kept alive); the status and the body."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: web\r\n{extra}\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as err:
        raise Refused(repr(err)) from err
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines if x)}
    assert "content-length" in fields, f"expected a Content-Length answer: {head!r}"
    body = await reader.readexactly(int(fields["content-length"]))
    return int(status_line.split(" ")[1]), body


async def _get(
    port: int, path: str, headers: Sequence[tuple[str, str]] = (), *, tls: ssl.SSLContext | None
) -> tuple[int, bytes]:
    """A GET on a new connection to 127.0.0.1:port (plain, or TLS with ``tls``)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls), IO_TIMEOUT
        )
    except (ConnectionError, ssl.SSLError) as err:
        raise Refused(repr(err)) from err
    try:
        return await asyncio.wait_for(_request(reader, writer, path, headers), IO_TIMEOUT)
    finally:
        writer.close()


def _xfcc(body: bytes) -> list[str]:
    seen = json.loads(body)
    return [v for n, v in seen["headers"] if n == "x-forwarded-client-cert"]


def _metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    with urllib.request.urlopen(f"http://{proxy.admin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        is_sample = line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
        if is_sample and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _probe_context() -> ssl.SSLContext:
    """A TLS client without a certificate that accepts any server: it reads which SVID the web
    sidecar presents. TLS 1.3 finishes the client's handshake before the server checks for a
    client certificate, so the server's certificate is seen before the refusal."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


async def _served_serial(port: int) -> int:
    from cryptography import x509

    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=_probe_context()), IO_TIMEOUT
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# 1. A request crosses


def test_request_crosses_with_mtls_and_the_app_sees_the_verified_peer(mesh: Mesh) -> None:
    forged = ("x-forwarded-client-cert", f"By={WEB};URI=spiffe://{TD}/admin")
    status, body = asyncio.run(_get(mesh.to_web, "/hello?x=1", [forged], tls=None))

    assert status == 200
    assert json.loads(body)["target"] == "/hello?x=1"
    # Set by the web sidecar from the certificate it verified; the client's own copy is gone.
    assert _xfcc(body) == [f"By={WEB};URI={CLIENT}"]


# ---------------------------------------------------------------------------------------------
# 2. Refusals at the inbound sidecar


def test_a_client_without_a_certificate_is_refused(mesh: Mesh) -> None:
    before = _metric(mesh.web, "meshid_proxy_tls_failures_total", reason="no_client_certificate")
    seen = len(mesh.backend.requests)

    with pytest.raises(Refused):
        asyncio.run(_get(mesh.web_inbound, "/no-cert", tls=_probe_context()))

    after = _metric(mesh.web, "meshid_proxy_tls_failures_total", reason="no_client_certificate")
    assert after == before + 1
    assert len(mesh.backend.requests) == seen, "no byte reached the app"


def test_a_client_from_another_ca_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    foreign = new_authority(TD)  # same trust domain name, another root: an impostor
    svid = mint(foreign, CLIENT)
    (tmp_path / "c.pem").write_bytes(svid.chain_pem())
    (tmp_path / "c.key").write_bytes(svid.key_pem())
    context = _probe_context()
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "c.key")
    before = _metric(mesh.web, "meshid_proxy_tls_failures_total", reason="unknown_ca")
    seen = len(mesh.backend.requests)

    with pytest.raises(Refused):
        asyncio.run(_get(mesh.web_inbound, "/foreign", tls=context))

    assert _metric(mesh.web, "meshid_proxy_tls_failures_total", reason="unknown_ca") == before + 1
    assert len(mesh.backend.requests) == seen, "no byte reached the app"


def test_an_upstream_with_an_unexpected_id_is_refused_with_502(mesh: Mesh) -> None:
    labels = {"reason": "unexpected_id", "direction": "outbound"}
    before = _metric(mesh.client, "meshid_proxy_tls_failures_total", **labels)
    seen = len(mesh.backend.requests)

    status, _ = asyncio.run(_get(mesh.to_web_wrong_id, "/wrong-id", tls=None))

    assert status == 502  # docs/proxy.md, HTTP: "a refused upstream is answered 502"
    assert _metric(mesh.client, "meshid_proxy_tls_failures_total", **labels) == before + 1
    assert len(mesh.backend.requests) == seen, "no byte reached the app"


# ---------------------------------------------------------------------------------------------
# 3. Rotation under continuous load


@dataclass
class Load:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    web_serials: set[int] = field(default_factory=set)  # served by the web sidecar, in order seen
    client_rotations: float = 0.0
    done: bool = False


async def _keepalive_worker(port: int, load: Load, worker: int) -> None:
    """One connection, requests one after another; a new connection only if the proxy closes
    this one between requests (an answer is still owed for every request sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not load.done:
            try:
                status, body = await asyncio.wait_for(
                    _request(reader, writer, f"/keepalive/{worker}"), IO_TIMEOUT
                )
            except (Refused, TimeoutError) as err:
                load.failures.append(f"keep-alive {worker}: {err!r}")
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if status == 200 and _xfcc(body) == [f"By={WEB};URI={CLIENT}"]:
                load.ok += 1
            else:
                load.failures.append(f"keep-alive {worker}: {status} {body[:200]!r}")
    finally:
        writer.close()


async def _new_connection_worker(port: int, load: Load, worker: int) -> None:
    """A new connection (so a new mTLS handshake upstream) for every request."""
    while not load.done:
        try:
            status, body = await _get(port, f"/new/{worker}", tls=None)
        except (Refused, TimeoutError, OSError) as err:
            load.failures.append(f"new-connection {worker}: {err!r}")
            continue
        if status == 200 and _xfcc(body) == [f"By={WEB};URI={CLIENT}"]:
            load.ok += 1
        else:
            load.failures.append(f"new-connection {worker}: {status} {body[:200]!r}")


async def _watch_rotations(mesh: Mesh, load: Load, baseline: float) -> None:
    """Sample the SVID the web sidecar serves and the client sidecar's rotation counter until
    the load has seen enough. Polling: these are states of other processes, with no event to
    await from here."""
    deadline = time.monotonic() + LOAD_DEADLINE
    while time.monotonic() < deadline:
        load.web_serials.add(await _served_serial(mesh.web_inbound))
        load.client_rotations = (
            await asyncio.to_thread(_metric, mesh.client, "meshid_proxy_identity_rotations_total")
            - baseline
        )
        if (
            load.ok + len(load.failures) >= LOAD_REQUESTS
            and len(load.web_serials) > LOAD_ROTATIONS
            and load.client_rotations >= LOAD_ROTATIONS
        ):
            break
        await asyncio.sleep(0.5)
    load.done = True


async def _run_load(mesh: Mesh, baseline: float) -> Load:
    load = Load()
    workers = [_keepalive_worker(mesh.to_web, load, n) for n in range(4)]
    workers += [_new_connection_worker(mesh.to_web, load, n) for n in range(4)]
    await asyncio.gather(_watch_rotations(mesh, load, baseline), *workers)
    return load


def _issued_serials(mesh: Mesh, spiffe_id: str, since: str) -> set[str]:
    out = mesh.server.cli(
        "audit", "list", "--kind", "x509_svid.issued", "--spiffe-id", spiffe_id,
        "--since", since, "-o", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return {event["details"]["serial"] for event in json.loads(out.stdout)}


def test_rotation_under_continuous_load_fails_no_request(mesh: Mesh) -> None:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    baseline = _metric(mesh.client, "meshid_proxy_identity_rotations_total")
    started = time.monotonic()

    load = asyncio.run(_run_load(mesh, baseline))

    elapsed = time.monotonic() - started
    print(
        f"\nrotation under load: {load.ok} ok, {len(load.failures)} failed in {elapsed:.1f} s; "
        f"web SVIDs served {len(load.web_serials)}, client rotations {load.client_rotations:g}"
    )
    assert load.failures == []
    assert load.ok >= LOAD_REQUESTS
    # Both sidecars rotated at least twice while the requests flowed.
    assert len(load.web_serials) > LOAD_ROTATIONS, "the web sidecar served one SVID throughout"
    assert load.client_rotations >= LOAD_ROTATIONS
    # The client's new SVIDs were issued (by the server, for the agent) during the load.
    assert len(_issued_serials(mesh, CLIENT, since)) >= LOAD_ROTATIONS


# ---------------------------------------------------------------------------------------------
# 4. 1,000 concurrent connections


async def _concurrent(mesh: Mesh) -> tuple[list[str], float]:
    """CONCURRENT clients each open a connection to the client sidecar and send one request, and
    every connection stays open until all answers are in: that many requests cross at once.
    Returns the problems and the client sidecar's count of open connections on ``to-web``
    while all of them were held.

    Each request goes right after its connection opens: a connection left waiting longer than
    its SVID's life hits the bug ``test_a_late_first_request_uses_a_fresh_svid`` shows."""
    barrier = asyncio.Barrier(CONCURRENT)
    held = 0.0

    async def one(n: int) -> str | None:
        nonlocal held
        problem: str | None = None
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.to_web)
            status, body = await _request(reader, writer, f"/c/{n}")
            if status != 200 or _xfcc(body) != [f"By={WEB};URI={CLIENT}"]:
                problem = f"{n}: {status} {body[:200]!r}"
        except (Refused, OSError) as err:
            problem = f"{n}: {err!r}"
        await barrier.wait()  # hold the connection until every client has its answer
        if n == 0:  # everyone holds theirs: count them at the sidecar
            held = await asyncio.to_thread(
                _metric, mesh.client, "meshid_proxy_active_connections", listener="to-web"
            )
        await barrier.wait()
        if writer is not None:
            writer.close()
        return problem

    answers = await asyncio.wait_for(
        asyncio.gather(*(one(n) for n in range(CONCURRENT))), LOAD_DEADLINE
    )
    return [a for a in answers if a is not None], held


def test_one_thousand_concurrent_connections_through_one_proxy_pair(steady_mesh: Mesh) -> None:
    started = time.monotonic()

    problems, held = asyncio.run(_concurrent(steady_mesh))

    print(f"\n{CONCURRENT} concurrent connections: {time.monotonic() - started:.1f} s")
    assert problems == []
    # The client sidecar held every one at once. Behind it, upstream connections whose exchange
    # is over go back to the keep-alive pools, so fewer may reach the app.
    assert held >= CONCURRENT
    served = [r for r in steady_mesh.backend.requests if r["target"].startswith("/c/")]
    assert len(served) == CONCURRENT


# ---------------------------------------------------------------------------------------------
# Regression: an HTTP upstream opened lazily must use the SVID of that moment


def test_a_late_first_request_uses_a_fresh_svid(mesh: Mesh) -> None:
    async def late_request() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.to_web)
        try:
            await asyncio.sleep(SVID_TTL + 1)  # the SVID in use at accept has expired since
            status, _ = await asyncio.wait_for(_request(reader, writer, "/late"), IO_TIMEOUT)
            return status
        finally:
            writer.close()

    assert asyncio.run(late_request()) == 200
