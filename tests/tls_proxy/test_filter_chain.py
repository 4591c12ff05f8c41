"""tls_proxy.filters.base.FilterChain: request filters in order, observers skipped per request."""

from __future__ import annotations

import asyncio

import pytest

from tls_proxy.filters.base import Connection, FilterChain
from tls_proxy.l7 import Exchange, LazyHeaders, LocalResponse, RequestHead


class _Deciding:
    def __init__(self, name: str, seen: list[str], answer: LocalResponse | None = None) -> None:
        self.name = name
        self._seen = seen
        self._answer = answer

    async def on_request(
        self, conn: Connection, request: RequestHead, exchange: Exchange
    ) -> LocalResponse | None:
        self._seen.append(f"{self.name}.on_request")
        return self._answer

    def on_request_end(self, conn: Connection, exchange: Exchange) -> None:
        self._seen.append(f"{self.name}.on_request_end")


class _Observer:
    passes_requests = True

    def __init__(self, seen: list[str], *, fail_at_end: bool = False) -> None:
        self.name = "observer"
        self._seen = seen
        self._fail = fail_at_end

    async def on_request(self, conn: Connection, request: object, exchange: Exchange) -> None:
        raise AssertionError("the chain called an observer's on_request")

    def on_request_end(self, conn: Connection, exchange: Exchange) -> None:
        self._seen.append("observer.on_request_end")
        if self._fail:
            raise RuntimeError("observer bug")


def _run(chain: FilterChain) -> LocalResponse | None:
    conn = Connection("web", "inbound", "127.0.0.1", 1, 2, protocol="http")
    head = RequestHead("GET", "/", "/", "web", LazyHeaders([]))
    return asyncio.run(chain.on_request(conn, head, Exchange()))


def test_observers_are_not_asked_and_the_first_answer_wins() -> None:
    seen: list[str] = []
    deny = LocalResponse(403, b"no")
    chain = FilterChain(
        [],
        [_Deciding("first", seen), _Observer(seen), _Deciding("second", seen, deny),
         _Deciding("third", seen)],
    )  # fmt: skip
    assert _run(chain) is deny
    assert seen == ["first.on_request", "second.on_request"]


def test_every_filter_sees_the_end_even_after_one_fails(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    chain = FilterChain([], [_Observer(seen, fail_at_end=True), _Deciding("last", seen)])
    assert _run(chain) is None
    conn = Connection("web", "inbound", "127.0.0.1", 1, 2, protocol="http")
    chain.on_request_end(conn, Exchange())
    assert seen == ["last.on_request", "observer.on_request_end", "last.on_request_end"]
    assert "filter on_request_end failed" in caplog.text
