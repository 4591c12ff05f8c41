"""The pure L7 core (``tls_proxy.l7``): hardening checks and header rewriting, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz import Verdict
from tls_proxy.l7 import (
    HttpRejected,
    check_fields,
    check_raw_head,
    denied_response,
    forward_headers,
    xfcc_value,
)

GOOD = b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\nnot-a-head\r\n"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare_lf"),
        (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", "bare_cr"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n\tc\r\n\r\n", "obs_fold"),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length : 1\r\n\r\n",
            "duplicate_content_length",
        ),
        (b"GET / HTTP/1.1\r\nContent-Length: 1,1\r\n\r\n", "invalid_content_length"),
    ],
    ids=["bare-lf", "bare-cr", "obs-fold", "duplicate-cl", "cl-list"],
)
def test_raw_head_shapes_h11_accepts_are_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(HttpRejected, match=reason) as caught:
        check_raw_head(raw)
    assert caught.value.status == 400


def test_only_the_head_is_checked_not_the_body_after_it() -> None:
    check_raw_head(GOOD)
    check_raw_head(b"\r\n" + GOOD)  # leading empty lines (RFC 9112 §2.2) do not hide the head


def test_fields_limits_and_content_length_with_transfer_encoding() -> None:
    with pytest.raises(HttpRejected, match="too_many_headers") as caught:
        check_fields([(b"x", b"1")] * 3, 2)
    assert caught.value.status == 431
    with pytest.raises(HttpRejected, match="content_length_and_transfer_encoding"):
        check_fields([(b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")], 100)


def test_forward_headers_drops_hop_by_hop_and_identity_and_adds_xfcc() -> None:
    headers = [
        (b"Host", b"a"),
        (b"Connection", b"keep-alive, X-Secret, Content-Length"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Content-Length", b"3"),
        (b"X-Forwarded-Client-Cert", b"forged"),
    ]
    xfcc = xfcc_value("spiffe://example.org/web", "spiffe://example.org/client")
    out = forward_headers(
        headers, strip=[b"x-forwarded-client-cert"], add=[(b"x-forwarded-client-cert", xfcc)]
    )
    assert out == [
        (b"Host", b"a"),
        (b"Content-Length", b"3"),  # a Connection token never removes framing
        (
            b"x-forwarded-client-cert",
            b"By=spiffe://example.org/web;URI=spiffe://example.org/client",
        ),
    ]


def test_upgrade_keeps_upgrade_and_connection_upgrade() -> None:
    out = forward_headers([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], upgrade=True)
    assert out == [(b"Upgrade", b"websocket"), (b"connection", b"upgrade")]


def test_denied_by_header_only_in_debug() -> None:
    verdict = Verdict(False, "no-admin", 2, "denied by DENY policy")
    assert denied_response(verdict, debug=False).headers == ()
    assert denied_response(verdict, debug=True).headers == ((b"x-meshid-denied-by", b"no-admin/2"),)
    default = Verdict(False, None, None, "no ALLOW policy matched: 1 considered")
    (header,) = denied_response(default, debug=True).headers
    assert header[1] == b"default: no ALLOW policy matched: 1 considered"


@given(st.binary(max_size=300))
def test_raw_head_check_never_fails_otherwise(raw: bytes) -> None:
    try:
        check_raw_head(raw)
    except HttpRejected as err:
        assert err.status == 400
