"""The pure parts of HTTP/2 support: protocol sniffing and our gRPC answers."""

from __future__ import annotations

import pytest

from tls_proxy.detect import H2_PREFACE, SNIFF_LIMIT, sniff
from tls_proxy.http2 import grpc_message, grpc_status, local_headers
from tls_proxy.l7 import DENIED_BODY, LocalResponse

SNIFF_CASES = [
    # (data, final, http_only, expected)
    (H2_PREFACE, False, False, "h2"),
    (H2_PREFACE + b"\x00\x00", False, True, "h2"),
    (H2_PREFACE[:10], False, False, None),
    (H2_PREFACE[:10], True, False, "tcp"),
    (H2_PREFACE[:10], True, True, "http1"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n", False, False, "http1"),
    (b"POST /x?y=1 HTTP/1.0\n", False, False, "http1"),
    (b"GET /long", False, False, None),
    (b"GET /long", True, False, "tcp"),
    (b"GET / HTTP/2.0\r\n", False, False, "tcp"),
    (b"\x16\x03\x01\x02\x00", False, False, "tcp"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", False, False, "tcp"),
    (b"", False, False, None),
    (b"", True, False, "tcp"),
    (b"G" * SNIFF_LIMIT, False, False, "tcp"),
    (b"\x16\x03\x01", False, True, "http1"),
    (b"GE", False, True, "http1"),
]


@pytest.mark.parametrize(
    ("data", "final", "http_only", "expected"),
    SNIFF_CASES,
    ids=[f"{d[:12]!r}-final={f}-http={h}" for d, f, h, _ in SNIFF_CASES],
)
def test_sniff(data: bytes, final: bool, http_only: bool, expected: str | None) -> None:
    assert sniff(data, final=final, http_only=http_only) == expected


@pytest.mark.parametrize(
    ("status", "code"),
    [(403, 7), (400, 13), (502, 14), (503, 14), (431, 2)],
    ids=["denied", "bad-request", "bad-gateway", "unavailable", "other"],
)
def test_grpc_status_mapping(status: int, code: int) -> None:
    assert grpc_status(status) == code


def test_grpc_answer_is_trailers_only_and_http_answer_has_the_body() -> None:
    answer = LocalResponse(403, DENIED_BODY)
    headers, body = local_headers(answer, grpc=True)
    assert body == b""
    assert dict(headers)[b":status"] == b"200"
    assert dict(headers)[b"grpc-status"] == b"7"
    assert dict(headers)[b"grpc-message"] == b"RBAC: access denied"
    headers, body = local_headers(answer, grpc=False)
    assert dict(headers)[b":status"] == b"403"
    assert body == DENIED_BODY


def test_grpc_message_is_percent_encoded() -> None:
    assert grpc_message("50% \u00e9\n") == b"50%25 %C3%A9%0A"
