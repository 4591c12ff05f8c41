"""SPIFFE_ENDPOINT_SOCKET values and the socket on disk (folder, mode, stale and live sockets)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workload_api.endpoint import (
    DEFAULT_SOCKET_MODE,
    MAX_SOCKET_PATH_BYTES,
    SOCKET_DIR_MODE,
    bind_socket,
    parse_endpoint_socket,
    remove_socket,
)
from workload_api.errors import InvalidEndpoint

from ._harness import socket_folder


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("unix:///run/meshid/api.sock", "/run/meshid/api.sock"),
        ("unix:/run/meshid/api.sock", "/run/meshid/api.sock"),
        ("UNIX:///tmp/a%20b.sock", "/tmp/a b.sock"),
    ],
    ids=["canonical", "no empty authority", "scheme case and percent-encoding"],
)
def test_accepted_values(value: str, path: str) -> None:
    assert parse_endpoint_socket(value) == Path(path)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "is empty"),
        ("/run/api.sock", "no scheme.*unix:///absolute/path"),
        ("unix:relative/api.sock", "relative or empty path"),
        ("unix://", "relative or empty path"),
        ("unix://host/run/api.sock", "has an authority"),
        ("unix:///run/api.sock?x=1", "query or fragment"),
        ("unix:///run/api.sock#frag", "query or fragment"),
        ("tcp://127.0.0.1:8081", "tcp is not supported by this server.*peer credentials"),
        ("http://localhost/api", "scheme 'http'"),
        ("unix://" + "/x" * 60, "at most 107"),
    ],
    ids=[
        "empty",
        "bare path",
        "relative",
        "no path",
        "authority",
        "query",
        "fragment",
        "tcp",
        "other scheme",
        "longer than sun_path",
    ],
)
def test_refused_values_name_the_rule(value: str, reason: str) -> None:
    with pytest.raises(InvalidEndpoint, match=reason):
        parse_endpoint_socket(value)


_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12)


@given(st.lists(_SEGMENT, min_size=1, max_size=6))
def test_any_absolute_path_round_trips(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    assert parse_endpoint_socket(f"unix://{path}") == Path(path)
    assert parse_endpoint_socket(f"unix:{path}") == Path(path)


@pytest.fixture
def folder() -> Iterator[Path]:
    path = socket_folder()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_bind_creates_the_folder_and_sets_the_modes(folder: Path) -> None:
    path = folder / "a" / "b" / "api.sock"
    old = os.umask(0o077)  # a tight umask must not leak into the socket's or folders' modes
    try:
        sock = bind_socket(path)
    finally:
        os.umask(old)
    with sock:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == DEFAULT_SOCKET_MODE == 0o777
        for made in (folder / "a", folder / "a" / "b"):
            assert stat.S_IMODE(made.stat().st_mode) == SOCKET_DIR_MODE == 0o755
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(os.fspath(path))
    remove_socket(path)
    assert not path.exists()


def test_the_mode_is_configurable(folder: Path) -> None:
    path = folder / "api.sock"
    with bind_socket(path, mode=0o770):
        assert stat.S_IMODE(path.lstat().st_mode) == 0o770
    remove_socket(path)


def test_a_stale_socket_is_replaced_and_a_live_one_refused(folder: Path) -> None:
    path = folder / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(path))
    stale.close()  # the file stays, nobody listens: a server that died
    with bind_socket(path) as live:
        with pytest.raises(InvalidEndpoint, match="in use by a live server"):
            bind_socket(path)
        assert live.fileno() >= 0
    remove_socket(path)


def test_a_regular_file_is_never_replaced(folder: Path) -> None:
    path = folder / "api.sock"
    path.write_text("precious")
    with pytest.raises(InvalidEndpoint, match="not a socket"):
        bind_socket(path)
    assert path.read_text() == "precious"


def test_a_path_longer_than_sun_path_is_refused(folder: Path) -> None:
    path = folder / ("x" * MAX_SOCKET_PATH_BYTES)
    with pytest.raises(InvalidEndpoint, match="at most 107"):
        bind_socket(path)
