"""The k8s attestor against a local HTTPS kubelet stand-in serving a recorded-shape /pods answer.

The stand-in is a real HTTPS server on 127.0.0.1:0 with a trustme certificate; it checks the
bearer token as the kubelet would and answers from ``data/kubelet_pods.json`` (the kubelet's
``PodList`` shape: metadata, spec, init and app container statuses with ``containerd://`` ids).
The process side is a fake /proc tree whose cgroup names the pod and container.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from workload_api.attestors import (
    HttpsKubeletClient,
    K8sAttestor,
    KubeletConfig,
    selectors_from_pod_list,
)
from workload_api.errors import AttestationFailed

from .test_attestors import CID, POD, POD_, fake_process

PODS = json.loads((Path(__file__).parent / "data" / "kubelet_pods.json").read_text())
TOKEN = "eyJhbGciOiJSUzI1NiJ9.kubelet-reader.sig"  # opaque to us; the stand-in compares it
CGROUP = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD_}.slice/cri-containerd-{CID}.scope\n"
)
EXPECTED = {
    "k8s:ns:payments",
    "k8s:sa:billing",
    "k8s:pod-name:billing-7d9f8b6c5-x2k4q",
    f"k8s:pod-uid:{POD}",
    "k8s:node-name:node-a",
    "k8s:container-name:app",
    "k8s:container-image:registry.example/billing:1.4.2",
    "k8s:container-image:registry.example/billing@sha256:" + "a" * 64,
    "k8s:pod-label:app:billing",
    "k8s:pod-label:pod-template-hash:7d9f8b6c5",
    "k8s:pod-label:tier:backend",
}
FAST_POLL = timedelta(milliseconds=10)
SHUTDOWN_POLL = 0.02  # seconds; how often the stand-in notices shutdown (its default is 0.5)


def _starting(pods: dict[str, Any]) -> dict[str, Any]:
    """The same list a moment earlier: the app container is created but has no id yet."""
    early = copy.deepcopy(pods)
    for pod in early["items"]:
        for status in pod["status"].get("containerStatuses", []):
            if status["name"] == "app":
                status["containerID"] = ""
                status["state"] = {"waiting": {"reason": "ContainerCreating"}}
    return early


class Kubelet:
    """The stand-in: answers GET /pods with the queued bodies (the last one repeats)."""

    def __init__(self, cert: trustme.LeafCert) -> None:
        self.answers: list[bytes] = [json.dumps(PODS).encode()]
        self.requests = 0
        kubelet = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                kubelet.requests += 1
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(401, b'{"kind":"Status","message":"Unauthorized"}')
                elif self.path != "/pods":
                    self._send(404, b"404 page not found")
                else:
                    body = (
                        kubelet.answers.pop(0) if len(kubelet.answers) > 1 else kubelet.answers[0]
                    )
                    self._send(200, body)

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(SHUTDOWN_POLL,), daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@pytest.fixture(scope="module")
def kubelet_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def kubelet(kubelet_ca: trustme.CA) -> Iterator[Kubelet]:
    # Kubelet serving certificates name the node, not 127.0.0.1 (checked against the CA only).
    server = Kubelet(kubelet_ca.issue_cert("node-a", "127.0.0.1"))
    yield server
    server.close()


@pytest.fixture
def files(tmp_path: Path, kubelet_ca: trustme.CA) -> dict[str, Path]:
    ca_file = tmp_path / "ca.crt"
    kubelet_ca.cert_pem.write_to_path(str(ca_file))
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    proc = tmp_path / "proc"
    fake_process(proc, cgroup=CGROUP)
    return {"ca": ca_file, "token": token, "proc": proc}


def _attest(config: KubeletConfig, proc: Path, *, attempts: int = 3) -> frozenset[str]:
    async def scenario() -> frozenset[str]:
        client = HttpsKubeletClient(config)
        try:
            attestor = K8sAttestor(
                client, proc_root=proc, poll_attempts=attempts, poll_interval=FAST_POLL
            )
            return await attestor.attest(4242)
        finally:
            await client.aclose()

    return asyncio.run(scenario())


def test_selectors_from_the_kubelet(kubelet: Kubelet, files: dict[str, Path]) -> None:
    config = KubeletConfig(url=kubelet.url, ca_file=files["ca"], token_file=files["token"])
    assert _attest(config, files["proc"]) == EXPECTED


def test_a_starting_container_is_found_on_a_later_poll(
    kubelet: Kubelet, files: dict[str, Path]
) -> None:
    kubelet.answers = [json.dumps(_starting(PODS)).encode(), json.dumps(PODS).encode()]
    config = KubeletConfig(url=kubelet.url, ca_file=files["ca"], token_file=files["token"])
    assert _attest(config, files["proc"]) == EXPECTED
    assert kubelet.requests == 2


def test_a_container_never_listed_is_refused(kubelet: Kubelet, files: dict[str, Path]) -> None:
    kubelet.answers = [json.dumps(_starting(PODS)).encode()]
    config = KubeletConfig(url=kubelet.url, ca_file=files["ca"], token_file=files["token"])
    with pytest.raises(AttestationFailed, match="not in the kubelet's pod list after 3 attempts"):
        _attest(config, files["proc"])
    assert kubelet.requests == 3


def test_a_wrong_token_is_refused(kubelet: Kubelet, files: dict[str, Path], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    config = KubeletConfig(url=kubelet.url, ca_file=files["ca"], token_file=wrong)
    with pytest.raises(AttestationFailed, match="answered 401"):
        _attest(config, files["proc"])


def test_a_kubelet_signed_by_another_ca_is_refused(
    kubelet: Kubelet, files: dict[str, Path], tmp_path: Path
) -> None:
    stranger = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    config = KubeletConfig(url=kubelet.url, ca_file=stranger, token_file=files["token"])
    with pytest.raises(AttestationFailed, match="CERTIFICATE_VERIFY_FAILED"):
        _attest(config, files["proc"])
    skipping = KubeletConfig(
        url=kubelet.url, ca_file=None, skip_verify=True, token_file=files["token"]
    )
    assert _attest(skipping, files["proc"]) == EXPECTED


def test_a_process_outside_any_pod_gets_no_selector(files: dict[str, Path]) -> None:
    fake_process(files["proc"], cgroup="0::/system.slice/sshd.service\n")
    config = KubeletConfig(url="https://127.0.0.1:1", ca_file=files["ca"])  # never asked
    assert _attest(config, files["proc"]) == frozenset()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>", "not JSON"),
        (b'{"kind":"Status"}', "not a PodList"),
        (b"[]", "not a PodList"),
    ],
    ids=["html", "a Status", "a list"],
)
def test_answers_that_are_not_pod_lists_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(AttestationFailed, match=reason):
        selectors_from_pod_list(body, POD, CID)


@pytest.mark.parametrize(
    ("pod_uid", "container", "expected"),
    [
        (POD, CID, "app"),
        (POD, "5e1b7a0e2c1d4f3a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a", "proxy"),
        (POD, "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0", "config-init"),
        (POD, "aa11bb22cc33dd44ee55ff6600771188229933aa44bb55cc66dd77ee88ff9900", None),
        ("00000000-0000-0000-0000-000000000000", CID, None),
    ],
    ids=["app container", "sidecar", "init container", "container of another pod", "no such pod"],
)
def test_the_container_is_looked_up_in_its_own_pod(
    pod_uid: str, container: str, expected: str | None
) -> None:
    selectors = selectors_from_pod_list(json.dumps(PODS).encode(), pod_uid, container)
    if expected is None:
        assert selectors is None
    else:
        assert selectors is not None and f"k8s:container-name:{expected}" in selectors
