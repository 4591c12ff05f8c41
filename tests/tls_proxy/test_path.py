"""Request-path normalization: the spelling policy sees and the application receives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tls_proxy.path import EncodedSlashes, PathError, normalize_path

# Cheap pure function: many examples cost little.
PROPERTY = settings(max_examples=300, deadline=None)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        pytest.param("/", "/", id="root"),
        pytest.param("/a/b", "/a/b", id="already-normal"),
        pytest.param("/a//b///c", "/a/b/c", id="merge-slashes"),
        pytest.param("//", "/", id="only-slashes"),
        pytest.param("/a/./b", "/a/b", id="dot"),
        pytest.param("/a/b/../c", "/a/c", id="dot-dot"),
        pytest.param("/..", "/", id="dot-dot-at-root"),
        pytest.param("/../../a", "/a", id="never-above-root"),
        pytest.param("/a/..", "/", id="dot-dot-last"),
        pytest.param("/a/b/..", "/a/", id="dot-dot-last-keeps-directory-slash"),
        pytest.param("/a/.", "/a/", id="dot-last"),
        pytest.param("/a/", "/a/", id="trailing-slash-kept"),
        pytest.param("/%2e%2e/a", "/a", id="encoded-dot-dot"),
        pytest.param("/a/%2E/b", "/a/b", id="encoded-dot"),
        pytest.param("/%7Euser/%41%2d%5F", "/~user/A-_", id="decode-unreserved"),
        pytest.param("/a%3ab%3F", "/a%3Ab%3F", id="keep-reserved-upper-case-hex"),
        pytest.param("/a%20b", "/a%20b", id="keep-escaped-space"),
        pytest.param("/caf%c3%a9", "/caf%C3%A9", id="keep-utf8-bytes"),
        pytest.param("/a%23b", "/a%23b", id="keep-escaped-hash"),
        pytest.param("/a%252e%252e", "/a%252e%252e", id="decode-once-only"),
        pytest.param("/a/...", "/a/...", id="three-dots-is-a-name"),
        pytest.param("/.well-known/x", "/.well-known/x", id="dot-prefixed-name"),
        pytest.param("/ADMIN", "/ADMIN", id="case-preserved"),
        pytest.param("/a;b=c", "/a;b=c", id="path-parameters-kept"),
        pytest.param("/a/../b?x=/../y&z=%2F", "/b?x=/../y&z=%2F", id="query-unchanged"),
        pytest.param("/a?", "/a?", id="empty-query-kept"),
        pytest.param("/a/b/..?q", "/a/?q", id="query-after-dot-dot"),
    ],
)
def test_normalizes(raw: str, normalized: str) -> None:
    assert normalize_path(raw) == normalized


@pytest.mark.parametrize(
    ("raw", "mode", "normalized"),
    [
        pytest.param("/a%2Fb", "decode", "/a/b", id="decode-slash"),
        pytest.param("/a%2fb", "decode", "/a/b", id="decode-slash-lower-case"),
        pytest.param("/a%5Cb", "decode", "/a/b", id="decode-backslash-to-slash"),
        pytest.param("/a\\b", "decode", "/a/b", id="raw-backslash-to-slash"),
        pytest.param("/a%2F..%2Fb", "decode", "/b", id="decoded-slashes-are-separators"),
        pytest.param("/a%2fb", "keep", "/a%2Fb", id="keep-slash-as-data"),
        pytest.param("/a%5cb", "keep", "/a%5Cb", id="keep-backslash-as-data"),
        pytest.param("/a\\b", "keep", "/a%5Cb", id="raw-backslash-escaped-when-kept"),
        pytest.param("/a%2F..%2Fb", "keep", "/a%2F..%2Fb", id="kept-slashes-are-not-separators"),
    ],
)
def test_encoded_slash_modes(raw: str, mode: EncodedSlashes, normalized: str) -> None:
    assert normalize_path(raw, encoded_slashes=mode) == normalized


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param("/a%2Fb", r"%2F in the request path; encoded slashes are refused", id="slash"),
        pytest.param("/a%5cb", r"%5C in the request path", id="backslash"),
        pytest.param("/a\\b", r"'\\\\' in the request path", id="raw-backslash"),
        pytest.param("/a\x00b", r"control character U\+0000", id="nul"),
        pytest.param("/a%00b", r"control character U\+0000", id="encoded-nul"),
        pytest.param("/a\tb", r"control character U\+0009", id="tab"),
        pytest.param("/a%7Fb", r"control character U\+007F", id="encoded-del"),
        pytest.param("/a\r\n", r"control character U\+000D", id="cr"),
        pytest.param("/a b", r"character U\+0020", id="raw-space"),
        pytest.param("/café", r"character U\+00E9", id="raw-non-ascii"),
        pytest.param("/a#b", r"'#' in the request path", id="fragment"),
        pytest.param("/a%zz", r"'%' not followed by two hex digits at offset 2", id="bad-escape"),
        pytest.param("/a%2", r"'%' not followed by two hex digits", id="short-escape"),
        pytest.param("a/b", r"must start with '/'", id="relative"),
        pytest.param("", r"must start with '/'", id="empty"),
        pytest.param("*", r"must start with '/'", id="asterisk-form"),
        pytest.param("http://x/a", r"must start with '/'", id="absolute-form"),
        pytest.param("/a/..;/b", r"dot-segment with parameters '..;'", id="tomcat"),
        pytest.param("/a/%2e%2e;x/b", r"dot-segment with parameters", id="tomcat-encoded"),
        pytest.param("/a?x=\x00", r"control character U\+0000 in the query string", id="query-nul"),
    ],
)
def test_refuses(raw: str, message: str) -> None:
    with pytest.raises(PathError, match=message):
        normalize_path(raw)


def test_unknown_mode_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="encoded_slashes must be reject, decode or keep"):
        normalize_path("/", encoded_slashes="strip")  # type: ignore[arg-type]


path_text = st.lists(
    st.sampled_from(
        [
            "/",
            "//",
            ".",
            "..",
            "%2e",
            "%2E",
            "%2F",
            "%5c",
            "\\",
            "a",
            "B",
            "%41",
            "%3a",
            ";",
            "?",
            "%25",
            "~",
        ]
    ),
    max_size=12,
).map(lambda parts: "/" + "".join(parts))


@PROPERTY
@given(path_text | st.text(max_size=30), st.sampled_from(["reject", "decode", "keep"]))
def test_only_path_error_and_idempotent(raw: str, mode: EncodedSlashes) -> None:
    try:
        once = normalize_path(raw, encoded_slashes=mode)
    except PathError:
        return
    assert normalize_path(once, encoded_slashes=mode) == once
    path = once.partition("?")[0]
    assert path.startswith("/")
    assert "//" not in path
    segments = path.split("/")
    assert "." not in segments
    assert ".." not in segments


@settings(max_examples=1500, deadline=None)
@given(
    st.text(alphabet="/.a%2Ef;:@?=&~_-#\\ \x7f", max_size=24),
    st.sampled_from(["reject", "decode", "keep"]),
)
def test_the_one_pass_check_for_normal_targets_agrees_with_the_rules(
    raw: str, slashes: EncodedSlashes
) -> None:
    """Targets the fast check lets through unchanged are exactly what the full rules make of
    them; everything else takes the full rules."""
    from tls_proxy import path as module

    if module._NORMAL.fullmatch(raw) is None:
        return
    assert module._resolve(module._decode(raw.partition("?")[0], slashes)) == raw.partition("?")[0]
