"""The pure parts of shared upstream HTTP/2 connections (``h2pool.pick``, ``after_goaway``) and
the h2 behaviour ``h2conn.GracefulH2Connection`` restores (pinned: it overrides h2 internals)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tls_proxy.h2conn import CONNECTION_WINDOW, client_connection, server_connection
from tls_proxy.h2pool import after_goaway, pick

PICKS = [
    # (load, opening, max_connections, expected)
    ([], False, 4, ("open", -1)),
    ([], True, 4, ("wait", -1)),
    ([(0, 100)], False, 4, ("use", 0)),
    ([(100, 100), (3, 100)], False, 4, ("use", 1)),
    ([(5, 100), (3, 100)], False, 4, ("use", 0)),  # the oldest with room, not the emptiest
    ([(2, 2)], False, 4, ("open", -1)),
    ([(2, 2)], True, 4, ("wait", -1)),
    ([(2, 2), (2, 2)], False, 2, ("full", -1)),
    ([(0, 0)], False, 1, ("full", -1)),  # a peer allowing no streams at all
]


@pytest.mark.parametrize(
    ("load", "opening", "limit", "expected"),
    PICKS,
    ids=["none", "none-opening", "room", "second-has-room", "oldest-first", "full-open",
         "full-wait", "all-full", "zero-limit"],
)  # fmt: skip
def test_pick(
    load: list[tuple[int, int]], opening: bool, limit: int, expected: tuple[str, int]
) -> None:
    assert pick(load, opening=opening, max_connections=limit) == expected


GOAWAYS = [
    # (stream_id, last_stream_id, body_sent, retried, expected)
    ("processed", 3, 3, True, False, "finish"),
    ("below", 1, 3, False, False, "finish"),
    ("unprocessed", 5, 3, False, False, "retry"),
    ("none-processed", 1, 0, False, False, "retry"),
    ("body-gone", 5, 3, True, False, "fail"),
    ("second-time", 5, 3, False, True, "fail"),
]


@pytest.mark.parametrize(
    ("sid", "last", "body_sent", "retried", "expected"),
    [g[1:] for g in GOAWAYS],
    ids=[g[0] for g in GOAWAYS],
)
def test_after_goaway(sid: int, last: int, body_sent: bool, retried: bool, expected: str) -> None:
    assert after_goaway(sid, last, body_sent=body_sent, retried=retried) == expected


def _pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = client_connection()
    server = server_connection({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10})
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the SETTINGS ack
    return client, server


REQUEST = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a")]


def test_streams_at_or_below_the_last_id_finish_after_a_goaway_both_ways() -> None:
    """RFC 9113 §6.8; plain h2 closes the whole connection instead (python-hyper/h2#1181)."""
    client, server = _pair()
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    server.close_connection(last_stream_id=1)
    events = client.receive_data(server.data_to_send())
    assert [type(e) for e in events] == [h2.events.ConnectionTerminated]
    client.send_data(1, b"body", end_stream=True)  # the request goes on
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events][:2] == [h2.events.DataReceived, h2.events.StreamEnded]
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, b"answer", end_stream=True)
    events = client.receive_data(server.data_to_send())
    kinds = [type(e) for e in events]
    assert h2.events.ResponseReceived in kinds and h2.events.StreamEnded in kinds


def test_output_queued_before_a_received_goaway_is_kept() -> None:
    """A PING (or SETTINGS) arriving with the GOAWAY still gets its acknowledgement."""
    client, server = _pair()
    server.ping(b"12345678")
    server.close_connection(last_stream_id=0)
    client.receive_data(server.data_to_send())
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.PingAckReceived) for e in events)


def test_both_ends_open_a_wide_connection_window() -> None:
    client, server = _pair()
    assert client.inbound_flow_control_window == CONNECTION_WINDOW
    assert server.inbound_flow_control_window == CONNECTION_WINDOW
    plain = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    assert plain.inbound_flow_control_window < CONNECTION_WINDOW
