"""The HTTP/1.1 fast path's parser (``tls_proxy.h1fast``): the shapes it serves, the shapes it
declines to h11, and, on generated heads, that whatever it accepts h11 and the hardening checks
accept too and read the same way."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tls_proxy import h1fast
from tls_proxy.h1fast import DECLINED
from tls_proxy.l7 import check_fields, check_raw_head, forward_headers, wants_close

LIMITS = {"max_bytes": 8192, "max_headers": 20, "max_body": 1000}


STRIP = frozenset({b"x-forwarded-client-cert", b"x-a"})


def _pairs(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    return [(line.partition(b":")[0], line.partition(b":")[2].strip(b" \t")) for line in lines]


def parse(raw: bytes, **limits: int) -> h1fast.Request | h1fast.Declined | None:
    return h1fast.parse_request(raw, **{**LIMITS, **limits}, drop=h1fast.dropped(STRIP))


def test_a_plain_get_is_served_with_its_fields_as_they_came() -> None:
    raw = b"GET /a/b?c=d HTTP/1.1\r\nHost: web\r\nX-Trace:  t1 \r\nAccept: */*\r\n\r\nGET /next"
    request = parse(raw)
    assert isinstance(request, h1fast.Request)
    assert (request.method, request.target) == (b"GET", b"/a/b?c=d")
    assert request.headers == [(b"Host", b"web"), (b"X-Trace", b"t1"), (b"Accept", b"*/*")]
    assert (request.length, request.close) == (0, False)
    assert raw[request.size :] == b"GET /next"


def test_field_lines_seen_before_read_the_same_and_the_memory_is_bounded() -> None:
    """``_SEEN`` remembers parsed field lines: a head parsed again reads exactly the same,
    a line that is not a field is never remembered, and the memory never passes its bound."""
    h1fast._SEEN.clear()
    raw = b"GET / HTTP/1.1\r\nHost: web\r\nX-Trace:  t1 \r\nConnection: keep-alive\r\n\r\n"
    first = parse(raw)
    assert b"X-Trace:  t1 " in h1fast._SEEN
    again = parse(raw)
    assert isinstance(first, h1fast.Request) and isinstance(again, h1fast.Request)
    assert (again.forward, again.host, again.headers) == (first.forward, first.host, first.headers)
    assert again.forward == [(b"Host", b"web"), (b"X-Trace", b"t1")]
    assert parse(b"GET / HTTP/1.1\r\nHost: web\r\nX-Bad: a\x01b\r\n\r\n") is DECLINED
    assert b"X-Bad: a\x01b" not in h1fast._SEEN
    long = b"X-Long: " + b"v" * h1fast._SEEN_LINE
    assert isinstance(
        parse(b"GET / HTTP/1.1\r\nHost: web\r\n" + long + b"\r\n\r\n"), h1fast.Request
    )
    assert long not in h1fast._SEEN  # read, not remembered: the memory stays small
    for n in range(h1fast._SEEN_MAX + 10):
        assert isinstance(
            parse(b"GET / HTTP/1.1\r\nHost: web\r\nX-N: %d\r\n\r\n" % n), h1fast.Request
        )
        assert len(h1fast._SEEN) <= h1fast._SEEN_MAX


def test_a_post_with_content_length_and_connection_close() -> None:
    request = parse(
        b"POST /f HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nConnection: Keep-Alive, Close\r\n\r\n"
    )
    assert isinstance(request, h1fast.Request)
    assert (request.length, request.close) == (5, True)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n",  # no blank line yet
        b"GET / HTTP/1.1\r\nHost: a\r\n\r",
        b"GE",
    ],
)
def test_an_incomplete_head_waits(raw: bytes) -> None:
    assert parse(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n",  # over max_body
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\nHost: a\nX-A: b\n\n",  # bare LF, no CRLF CRLF anywhere
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n",  # bare CR
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x01\r\n\r\n",  # a control character
        b"GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n",  # not a token
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # a leading empty line
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_other_shapes_are_declined_to_h11(raw: bytes) -> None:
    assert parse(raw) is DECLINED


def test_limits_decline_rather_than_refuse() -> None:
    fields = [b"X-%d: v\r\n" % i for i in range(20)]
    head = b"GET / HTTP/1.1\r\nHost: a\r\n"
    assert isinstance(parse(head + b"".join(fields[:19]) + b"\r\n"), h1fast.Request)  # 20 fields
    assert parse(head + b"".join(fields) + b"\r\n") is DECLINED  # 21
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 9000
    assert parse(big) is DECLINED  # no end in sight, already over the size limit
    assert parse(big + b"\r\n\r\n") is DECLINED


def response(raw: bytes, *, head: bool = False) -> h1fast.Response | h1fast.Declined | None:
    return h1fast.parse_response(raw, max_bytes=8192, head_request=head)


def test_responses_framed_by_length_status_or_method() -> None:
    ok = response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert isinstance(ok, h1fast.Response)
    assert (ok.status, ok.status_line, ok.length, ok.close) == (200, b"HTTP/1.1 200 OK", 2, True)
    for raw, head in (
        (b"HTTP/1.1 204 No Content\r\n\r\n", False),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", False),
        (b"HTTP/1.1 200\r\nContent-Length: 10\r\n\r\n", True),
    ):
        parsed = response(raw, head=head)
        assert isinstance(parsed, h1fast.Response) and parsed.length == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",  # until close
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 600 Nope\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    ],
)
def test_other_responses_are_declined_to_h11(raw: bytes) -> None:
    assert response(raw) is DECLINED


# -- generated heads: what the fast path accepts, h11 and the checks accept the same way ------

METHODS = [b"GET", b"POST", b"HEAD", b"DELETE", b"CONNECT", b"G T", b"get", b""]
TARGETS = [b"/", b"/a?b=c", b"/%2e%2e/x", b"*", b"http://a/", b"/a b", b"/\x80", b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "]
NAMES = [b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade"]
NAMES += [b"Expect", b"X-A", b"x a", b"", b"X-A ", b" X-A", b"TE", b"Keep-Alive", b"Close"]
NAMES += [b"X-Forwarded-Client-Cert", b"X-B"]
VALUES = [b"a", b"5", b"05", b"5, 5", b"+5", b"", b" 5 ", b"chunked", b"close", b"keep-alive"]
VALUES += [b"Close, te", b"\x01", b"a\tb", b"\xe9", b"a\rb", b"a\nb", b"  x  ", b"100-continue"]
VALUES += [b"x-b, keep-alive", b"X-A,close", b"host"]
ENDS = [b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n"]


@st.composite
def heads(draw: st.DrawFn, *, first_lines: list[bytes], plain: list[bytes]) -> bytes:
    """A head from fragments, mostly plain (so that the fast path accepts a good share)."""

    def pick(values: list[bytes], usual: list[bytes]) -> bytes:
        return draw(st.sampled_from(values if draw(st.integers(0, 5)) == 0 else usual))

    def end() -> bytes:
        return pick(ENDS, [b"\r\n"])

    fields = [
        pick(NAMES, [b"X-A", b"Accept", b"Content-Length", b"Connection", b"X-B"])
        + pick(COLONS, [b": "])
        + pick(VALUES, [b"a", b"5", b"close", b"  x  ", b"x-b, keep-alive"])
        for _ in range(draw(st.integers(0, 5)))
    ]
    if draw(st.integers(0, 4)):
        fields.insert(draw(st.integers(0, len(fields))), b"Host: a")
    out = pick(first_lines, plain) + end()
    for field in fields:
        out += field + end()
    if draw(st.integers(0, 9)) == 0:
        out += b" folded" + end()
    return out + end() + draw(st.sampled_from([b"", b"hello", b"x" * 40]))


COLONS = [b":", b": ", b" :", b":\t", b"::"]
REQUEST_LINES = [m + b" " + t + b" " + v for m in METHODS for t in TARGETS for v in VERSIONS]
PLAIN_REQUEST_LINES = [b"GET / HTTP/1.1", b"POST /a?b=c HTTP/1.1", b"HEAD /x HTTP/1.1"]
STATUS_LINES = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.1 404 Not\tFound",
    b"HTTP/1.1 101 Switching",
    b"HTTP/1.1 199 x",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 x",
    b"HTTP/1.0 200 OK",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 200 \x01",
    b"HTTP/1.1 200 OK ",
]
PLAIN_STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 503 Busy"]


def h11_events(conn: h11.Connection, data: bytes) -> list[h11.Event]:
    conn.receive_data(data)
    events: list[h11.Event] = []
    while (event := conn.next_event()) is not h11.NEED_DATA:
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return events


@settings(max_examples=600, deadline=None)
@given(heads(first_lines=REQUEST_LINES, plain=PLAIN_REQUEST_LINES))
def test_an_accepted_request_reads_the_same_in_h11(raw: bytes) -> None:
    request = parse(raw)
    if not isinstance(request, h1fast.Request):
        return
    check_raw_head(raw[: request.size])  # the hardening checks the h11 path adds pass too
    check_fields(request.headers, LIMITS["max_headers"])
    events = h11_events(h11.Connection(h11.SERVER), raw)
    head = events[0]
    assert isinstance(head, h11.Request)
    assert (head.method, head.target) == (request.method, request.target)
    assert head.headers.raw_items() == request.headers
    assert request.close == wants_close(request.headers)
    assert request.forward == forward_headers(request.headers, strip=STRIP)
    assert _pairs(request.kept) == request.forward  # the lines rendered are those fields
    assert [request.host] == [v for n, v in request.headers if n.lower() == b"host"]
    body = raw[request.size : request.size + request.length]
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == body
    assert isinstance(events[-1], h11.EndOfMessage) == (len(body) == request.length)


@settings(max_examples=600, deadline=None)
@given(
    heads(first_lines=STATUS_LINES, plain=PLAIN_STATUS_LINES), st.sampled_from([b"GET", b"HEAD"])
)
def test_an_accepted_response_reads_the_same_in_h11(raw: bytes, method: bytes) -> None:
    parsed = response(raw, head=method == b"HEAD")
    if not isinstance(parsed, h1fast.Response):
        return
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "a")]))
    conn.send(h11.EndOfMessage())
    events = h11_events(conn, raw)
    head = events[0]
    assert isinstance(head, h11.Response)
    assert head.status_code == parsed.status
    assert head.headers.raw_items() == parsed.headers
    assert parsed.close == wants_close(parsed.headers)
    assert parsed.forward == forward_headers(parsed.headers)
    assert _pairs(parsed.kept) == parsed.forward
    body = raw[parsed.size : parsed.size + parsed.length]
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == body
    assert isinstance(events[-1], h11.EndOfMessage) == (len(body) == parsed.length)
