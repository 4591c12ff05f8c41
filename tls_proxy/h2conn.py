"""h2 connection objects as the proxy drives them: open after a GOAWAY, with a wide window.

Owns ``GracefulH2Connection`` and the two factories the HTTP/2 codec (``http2``, the side
toward whoever connected to us) and the shared upstream connections (``h2pool``) build their
state machines with. It must not do I/O nor know about streams beyond what h2 tracks.

RFC 9113 §6.8: after a GOAWAY, sent or received, streams at or below its last stream ID may
still complete; only new streams are refused. h2 4.x instead moves its connection state
machine to CLOSED on either GOAWAY and drops the output queued before a received one
(python-hyper/h2#1181), so not one more frame of those streams could be sent or received.
``GracefulH2Connection`` puts the state machine back where it was and keeps that output;
refusing new streams after a GOAWAY is the caller's rule (``http2`` resets them
``REFUSED_STREAM``, ``h2pool`` opens none on a connection that received one).
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.settings

# Connection-level receive window (RFC 9113 §6.9.2). The default 65,535 bytes is one stream
# window: on a connection shared by many clients' streams, one slow reader would stall all the
# others. 16 MiB holds the full 64 KiB stream windows of 256 stalled streams at once.
CONNECTION_WINDOW = 16 * 1024 * 1024


class GracefulH2Connection(h2.connection.H2Connection):
    """An ``H2Connection`` whose streams live on after a GOAWAY (see the module docstring)."""

    _keep_output = False

    def close_connection(self, *args: Any, **kwargs: Any) -> None:
        state = self.state_machine.state
        super().close_connection(*args, **kwargs)
        self.state_machine.state = state

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        self._keep_output = True
        try:
            result = super()._receive_goaway_frame(frame)
        finally:
            self._keep_output = False
        self.state_machine.state = state
        return result

    def clear_outbound_data_buffer(self) -> None:
        if not self._keep_output:  # a SETTINGS or PING ack queued before the GOAWAY stays
            super().clear_outbound_data_buffer()


def _widen(conn: h2.connection.H2Connection) -> None:
    conn.increment_flow_control_window(CONNECTION_WINDOW - conn.inbound_flow_control_window)


def server_connection(settings: dict[h2.settings.SettingCodes, int]) -> GracefulH2Connection:
    """The server side toward whoever connected to us, preface queued, advertising ``settings``."""
    conn = GracefulH2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.local_settings = h2.settings.Settings(client=False, initial_values=settings)
    conn.initiate_connection()
    _widen(conn)
    return conn


def client_connection() -> GracefulH2Connection:
    """The client side toward an upstream, preface queued; server push refused (not relayed)."""
    conn = GracefulH2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.ENABLE_PUSH: 0}
    )
    conn.initiate_connection()
    _widen(conn)
    return conn
