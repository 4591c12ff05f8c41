"""One connection carries far more than h2's default 100 concurrent Workload API streams."""

from __future__ import annotations

import threading

import grpc

from tests.workload_api import _pki
from tests.workload_api._harness import raw_channel, served
from workload_api import _messages as pb
from workload_api.static import StaticIdentityProvider

STREAMS = 250  # well past h2's default SETTINGS_MAX_CONCURRENT_STREAMS of 100
HEADER = (("workload.spiffe.io", "true"),)
WEB = "spiffe://example.org/web"


def test_many_streams_on_one_connection() -> None:
    import os

    provider = StaticIdentityProvider(
        _pki.snapshot([_pki.identity(WEB, {f"unix:uid:{os.getuid()}"})])
    )
    with served(provider) as (server, _), raw_channel(server) as channel:
        fetch = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=pb.X509SVIDRequest.SerializeToString,
            response_deserializer=pb.X509SVIDResponse.FromString,
        )
        calls = [fetch(pb.X509SVIDRequest(), metadata=HEADER, timeout=30) for _ in range(STREAMS)]
        got = 0
        lock = threading.Lock()

        def first(call: grpc.Call) -> None:
            nonlocal got
            reply = next(iter(call))  # type: ignore[call-overload]
            assert reply.svids[0].spiffe_id == WEB
            with lock:
                got += 1

        threads = [threading.Thread(target=first, args=(c,)) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for call in calls:
            call.cancel()
        assert got == STREAMS
