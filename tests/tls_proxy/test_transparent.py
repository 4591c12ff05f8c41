"""Transparent mode: the iptables rule builder, the original destination, the config keys,
transparent listeners refusing what was not redirected (or their own connections coming back),
the CLI, and (slow, root) two sidecars in network namespaces steered by the real rules:

    client ns 10.77.0.1, fd77::1                            server ns 10.77.0.2, fd77::2
    client app --OUTPUT REDIRECT--> outbound :15001 ==mTLS==> --PREROUTING REDIRECT-->
        inbound :15006 --> 127.0.0.1:8080 app (answers with its request headers)

and the same over IPv6 (ip6tables; the listeners on [::1]:15001 and [::]:15006, the app
reached on [::1]:8080).

The end-to-end test runs the proxies under their own uid (``--uid``, setpriv) or, as root, under
their own gid (``--gid``); either way their own connections must not be redirected again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.support.processes import meshid
from tls_proxy import READY_LINE, ConfigError, NoOriginalDestination, parse_config
from tls_proxy.transparent import (
    CHAINS,
    IPV4,
    IPV6,
    JUMPS,
    Address,
    NatState,
    TransparentOptions,
    clean_script,
    ipv6_unusable,
    options_from_flags,
    parse_sockaddr,
    restore_script,
    ruleset,
    transparent_target,
)

from ._harness import echo_app, proxy_config, running
from ._pki import CLIENT, WEB, mint, new_authority, write_identity

REPO = Path(__file__).resolve().parents[2]


def _options(**flags: Any) -> TransparentOptions:
    base: dict[str, Any] = {"uid": 1337, "inbound_port": 15006, "outbound_port": 15001}
    return options_from_flags(**{**base, **flags})


# --- the rule builder -------------------------------------------------------------------------


def test_the_full_rule_set_in_order() -> None:
    options = _options(
        gid=1337,
        exclude_inbound_ports=["22"],
        exclude_outbound_ports=["53,8125"],
        exclude_outbound_cidrs=["169.254.169.254"],
    )
    assert ruleset(options).chains == CHAINS
    assert ruleset(options).rules == (
        "-A PREROUTING -p tcp -j MESHID_INBOUND",
        "-A OUTPUT -p tcp -j MESHID_OUTPUT",
        "-A MESHID_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A MESHID_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A MESHID_INBOUND -p tcp -j MESHID_INBOUND_REDIRECT",
        "-A MESHID_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A MESHID_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MESHID_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A MESHID_OUTPUT -o lo -j RETURN",
        "-A MESHID_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "-A MESHID_OUTPUT -p tcp -m tcp --dport 53 -j RETURN",
        "-A MESHID_OUTPUT -p tcp -m tcp --dport 8125 -j RETURN",
        "-A MESHID_OUTPUT -d 169.254.169.254/32 -j RETURN",
        "-A MESHID_OUTPUT -j MESHID_OUTBOUND_REDIRECT",
    )


def test_ipv6_rules_are_the_same_chains_with_their_own_loopback_and_cidrs() -> None:
    options = _options(
        gid=1337,
        exclude_inbound_ports=["22"],
        exclude_outbound_ports=["53"],
        exclude_outbound_cidrs=["169.254.169.254", "fd00:ec2::254", "10.0.0.0/8", "FD00::/8"],
    )
    assert options.exclude_outbound_cidrs == (
        "169.254.169.254/32",
        "fd00:ec2::254/128",
        "10.0.0.0/8",
        "fd00::/8",
    )
    v4, v6 = ruleset(options, IPV4), ruleset(options, IPV6)
    assert v6.chains == v4.chains == CHAINS
    assert [r for r in v4.rules if " -d " in r] == [
        "-A MESHID_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "-A MESHID_OUTPUT -d 169.254.169.254/32 -j RETURN",
        "-A MESHID_OUTPUT -d 10.0.0.0/8 -j RETURN",
    ]
    assert [r for r in v6.rules if " -d " in r] == [
        "-A MESHID_OUTPUT -d ::1/128 -j RETURN",
        "-A MESHID_OUTPUT -d fd00:ec2::254/128 -j RETURN",
        "-A MESHID_OUTPUT -d fd00::/8 -j RETURN",
    ]
    # Everything else is the same rule for rule, in the same order.
    assert [r for r in v6.rules if " -d " not in r] == [r for r in v4.rules if " -d " not in r]
    assert ruleset(options) == v4


def test_both_families_by_default_or_ipv4_only() -> None:
    assert _options().families == (IPV4, IPV6)
    assert _options(ipv4_only=True).families == (IPV4,)
    v6 = restore_script(_options(), family=IPV6)
    assert v6.splitlines()[1] == "# Load with: ip6tables-restore --noflush < FILE"
    assert restore_script(_options()).splitlines()[1] == (
        "# Load with: iptables-restore --noflush < FILE"
    )
    cleaning = clean_script(NatState.installed(), IPV6)
    assert cleaning is not None and "ip6tables-restore --noflush" in cleaning


def test_unusable_ip6tables_fails_closed_naming_the_way_out() -> None:
    from tls_proxy import ProxyError

    cause = ProxyError("ip6tables-save -t nat failed (exit 3): table nat does not exist")
    with_ipv6 = str(ipv6_unusable(cause, kernel_has_ipv6=True))
    assert with_ipv6.startswith(str(cause) + "; IPv6 TCP would bypass the sidecar")
    assert with_ipv6.endswith("or pass --ipv4-only if the namespace has no IPv6")
    without = str(ipv6_unusable(cause, kernel_has_ipv6=False))
    assert without.endswith(
        "this kernel has IPv6 turned off (no /proc/net/if_inet6): pass --ipv4-only"
    )


def test_included_inbound_ports_are_the_only_ones_redirected() -> None:
    rules = ruleset(_options(include_inbound_ports=["8080", "9090"])).rules
    inbound = [r for r in rules if r.startswith("-A MESHID_INBOUND ")]
    assert inbound == [
        "-A MESHID_INBOUND -p tcp -m tcp --dport 8080 -j MESHID_INBOUND_REDIRECT",
        "-A MESHID_INBOUND -p tcp -m tcp --dport 9090 -j MESHID_INBOUND_REDIRECT",
    ]
    assert ruleset(_options(include_inbound_ports=["*"])) == ruleset(_options())


def test_port_lists_accept_commas_and_repeats_and_drop_duplicates() -> None:
    repeated = _options(exclude_inbound_ports=["22", "2222", "22"])
    commas = _options(exclude_inbound_ports=["22, 2222,"])
    assert repeated == commas
    assert repeated.exclude_inbound_ports == (22, 2222)


FLAG_ERRORS = [
    ("no-uid", {"uid": None}, "--uid: required"),
    ("no-inbound", {"inbound_port": None}, "--inbound-port: required"),
    ("no-outbound", {"outbound_port": None}, "--outbound-port: required"),
    ("root-uid", {"uid": 0}, "--uid: expected the proxy's own uid, not 0"),
    ("root-gid", {"gid": 0}, "--gid: expected the proxy's own gid, not 0"),
    ("uid-range", {"uid": 2**32 - 1}, "--uid: expected a uid in 1..4294967294"),
    ("port-range", {"inbound_port": 70000}, "--inbound-port: expected a port in 1..65535"),
    ("same-ports", {"outbound_port": 15006}, "--outbound-port: expected a port other than"),
    ("not-a-port", {"exclude_inbound_ports": ["ssh"]}, "--exclude-inbound-ports: expected port"),
    ("port-zero", {"exclude_outbound_ports": ["0"]}, "--exclude-outbound-ports: expected a port"),
    (
        "include-and-exclude",
        {"include_inbound_ports": ["80"], "exclude_inbound_ports": ["22"]},
        "--exclude-inbound-ports: expected only when every inbound port is redirected",
    ),
    ("include-own-port", {"include_inbound_ports": ["15006"]}, "is a loop"),
    ("star-and-ports", {"include_inbound_ports": ["*,80"]}, "expected * (every port) or a list"),
    ("bad-cidr", {"exclude_outbound_cidrs": ["10.0.0.1/8"]}, "has host bits set"),
    ("bad-v6-cidr", {"exclude_outbound_cidrs": ["fd00::1/8"]}, "has host bits set"),
    (
        "not-a-cidr",
        {"exclude_outbound_cidrs": ["metadata"]},
        "--exclude-outbound-cidrs: expected an IPv4 or IPv6 address or network",
    ),
    (
        "v6-cidr-ipv4-only",
        {"exclude_outbound_cidrs": ["10.0.0.0/8,fd00::/8"], "ipv4_only": True},
        "--exclude-outbound-cidrs: expected IPv4 networks with --ipv4-only (got fd00::/8)",
    ),
]


@pytest.mark.parametrize(
    ("flags", "message"), [e[1:] for e in FLAG_ERRORS], ids=[e[0] for e in FLAG_ERRORS]
)
def test_bad_flags_are_refused_naming_the_flag_and_the_rule(
    flags: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        _options(**flags)
    assert str(caught.value).startswith("--")
    assert "\n" not in str(caught.value)


SAVED = """# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 05:36:03 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j MESHID_NOT_NAT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:MESHID_INBOUND - [0:0]
:MESHID_OLD - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -p tcp -j MESHID_INBOUND
-A OUTPUT -p tcp -g MESHID_OLD
-A MESHID_INBOUND -p tcp -j MESHID_OLD
-A DOCKER -i docker0 -j RETURN
COMMIT
"""


def test_the_saved_table_shows_our_chains_and_the_jumps_into_them() -> None:
    state = NatState.parse(SAVED)
    assert state.chains == ("MESHID_INBOUND", "MESHID_OLD")
    assert state.jumps == (
        "-A PREROUTING -p tcp -j MESHID_INBOUND",
        "-A OUTPUT -p tcp -g MESHID_OLD",
    )
    assert NatState.parse("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").empty


def test_reapplying_replaces_what_an_earlier_run_left() -> None:
    script = restore_script(_options(), NatState.parse(SAVED))
    lines = [line for line in script.splitlines() if not line.startswith("#")]
    assert lines[:5] == ["*nat", *(f":{c} - [0:0]" for c in CHAINS)]  # declaring flushes
    assert lines[5:9] == [
        "-D PREROUTING -p tcp -j MESHID_INBOUND",
        "-D OUTPUT -p tcp -g MESHID_OLD",
        "-F MESHID_OLD",  # a chain of ours this version no longer uses
        "-X MESHID_OLD",
    ]
    assert lines[9:] == [*ruleset(_options()).rules, "COMMIT"]
    fresh = restore_script(_options())
    assert "-D " not in fresh and "-X " not in fresh


def test_clean_removes_jumps_then_chains_or_says_there_is_nothing() -> None:
    assert clean_script(NatState()) is None
    script = clean_script(NatState.installed())
    assert script is not None
    assert script.splitlines()[2:] == [
        "*nat",
        *(j.replace("-A", "-D", 1) for j in JUMPS),
        *(f"-F {c}" for c in CHAINS),
        *(f"-X {c}" for c in CHAINS),
        "COMMIT",
    ]


ports = st.lists(st.integers(1, 65535), max_size=4).map(lambda xs: [",".join(map(str, xs))])


@given(
    uid=st.integers(1, 2**32 - 2),
    inbound=st.integers(1, 65535),
    exclude_in=ports,
    exclude_out=ports,
    family=st.sampled_from([IPV4, IPV6]),
)
def test_what_we_install_is_found_again_to_be_removed(
    uid: int, inbound: int, exclude_in: list[str], exclude_out: list[str], family: Any
) -> None:
    outbound = 1 if inbound != 1 else 2
    options = _options(
        uid=uid,
        inbound_port=inbound,
        outbound_port=outbound,
        exclude_inbound_ports=exclude_in,
        exclude_outbound_ports=exclude_out,
    )
    assert NatState.parse(restore_script(options, family=family)) == NatState.installed()


# --- where a redirected connection goes -------------------------------------------------------

TARGETS = [
    ("outbound", "10.0.0.2", 8080, "127.0.0.1", 15001, False, "10.0.0.2:8080"),
    ("inbound-app-port", "10.0.0.2", 8080, "10.0.0.2", 15006, True, "127.0.0.1:8080"),
    ("inbound-v6", "fd00::2", 8080, "fd00::2", 15006, True, "[::1]:8080"),
    ("not-redirected", "127.0.0.1", 15001, "127.0.0.1", 15001, False, "refused: not redirected"),
    ("inbound-own-port", "10.0.0.9", 15006, "10.0.0.2", 15006, True, "refused: loop"),
    ("outbound-loopback", "127.0.0.1", 15006, "127.0.0.1", 15001, False, "refused: loop"),
]


@pytest.mark.parametrize(
    ("orig_host", "orig_port", "local_host", "local_port", "inbound", "expected"),
    [t[1:] for t in TARGETS],
    ids=[t[0] for t in TARGETS],
)
def test_the_target_of_a_redirected_connection(
    orig_host: str, orig_port: int, local_host: str, local_port: int, inbound: bool, expected: str
) -> None:
    original, local = Address(orig_host, orig_port), Address(local_host, local_port)
    if expected.startswith("refused: "):
        with pytest.raises(NoOriginalDestination, match=expected.removeprefix("refused: ")):
            transparent_target(original, local, inbound=inbound)
    else:
        assert str(transparent_target(original, local, inbound=inbound)) == expected


def test_sockaddr_in_and_in6_as_the_kernel_writes_them() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080)
    v4 += socket.inet_aton("10.0.0.2") + bytes(8)
    assert parse_sockaddr(v4) == Address("10.0.0.2", 8080)
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 443, 0)
    v6 += socket.inet_pton(socket.AF_INET6, "fd00::2") + bytes(4)
    assert parse_sockaddr(v6) == Address("fd00::2", 443)
    with pytest.raises(NoOriginalDestination, match="unknown address"):
        parse_sockaddr(struct.pack("=H", socket.AF_UNIX) + bytes(14))


# --- configuration ----------------------------------------------------------------------------

TRANSPARENT_CONFIG: dict[str, Any] = {
    "inbound": [{"name": "in", "listen": "0.0.0.0:15006", "forward": "original_dst"}],
    "outbound": [
        {
            "name": "out",
            "listen": "127.0.0.1:15001",
            "upstream": "original_dst",
            "expect_ids": [WEB],
        }
    ],
}


def test_original_dst_config_parses() -> None:
    config = parse_config(TRANSPARENT_CONFIG, "proxy.yaml")
    assert config.inbound[0].transparent and config.outbound[0].transparent
    assert config.outbound[0].upstream == ("original_dst",)
    plain = parse_config(
        {"outbound": [{**TRANSPARENT_CONFIG["outbound"][0], "upstream": ["10.0.0.2:15006"]}]},
        "proxy.yaml",
    )
    assert not plain.outbound[0].transparent


CONFIG_ERRORS = [
    ("bad-forward", "inbound", {"forward": "app"}, "inbound[0].forward: expected HOST:PORT"),
    ("mixed", "outbound", {"upstream": ["original_dst", "10.0.0.2:1"]}, "original_dst alone"),
    ("listen", "outbound", {"listen": "10.0.0.1:15001"}, "outbound[0]: expected listen on"),
    ("no-ids", "outbound", {"expect_ids": None}, "outbound[0].expect_ids: required key"),
    ("empty-ids", "outbound", {"expect_ids": []}, "outbound[0].expect_ids: expected"),
]


@pytest.mark.parametrize(
    ("section", "change", "message"),
    [e[1:] for e in CONFIG_ERRORS],
    ids=[e[0] for e in CONFIG_ERRORS],
)
def test_transparent_config_errors(section: str, change: dict[str, Any], message: str) -> None:
    listener = {**TRANSPARENT_CONFIG[section][0], **change}
    listener = {k: v for k, v in listener.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parse_config({section: [listener]}, "proxy.yaml")
    assert message in str(caught.value)
    if section == "inbound":
        assert "or original_dst" in str(caught.value)


# --- a connection that was not redirected -----------------------------------------------------


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_connection_that_was_not_redirected_is_refused_and_logged(
    direction: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No REDIRECT rule here: the kernel has no NAT entry (or one saying the connection came
    straight to the listener). The proxy closes it before reading a byte; nothing is relayed."""
    import asyncio

    ca = new_authority()
    listener: dict[str, Any] = {"name": "t", "listen": "127.0.0.1:0", "protocol": "auto"}
    if direction == "inbound":
        listener["forward"] = "original_dst"
    else:
        listener |= {"upstream": "original_dst", "expect_ids": [WEB]}

    async def main() -> None:
        async with echo_app() as echo:
            config = proxy_config(tmp_path, mint(ca, CLIENT), [ca], **{direction: [listener]})
            async with running(config, tmp_path) as proxy:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port("t"))
                writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
                for _ in range(100):  # the access-log line is written as the proxy closes
                    if proxy.records():
                        break
                    await asyncio.sleep(0.05)
                (record,) = proxy.records()
                assert record["error"] == "no_original_dst"
                assert record["result"] == "error"
                assert record["upstream"] is None
                assert not echo.open_writers

    with caplog.at_level(logging.INFO, logger="tls_proxy.listeners"):
        asyncio.run(main())
    refused = [r for r in caplog.records if r.getMessage() == "transparent connection refused"]
    assert len(refused) == 1
    assert "not redirected" in refused[0].__dict__["reason"]


def test_the_proxys_own_connection_coming_back_is_refused_as_a_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What happens when the proxy runs under a uid the rules do not exclude: its upstream
    connection is redirected to its own outbound listener. Connecting from a source port that
    ``OwnConnections`` holds stands in for that redirect."""
    import asyncio

    ca = new_authority()
    listener = {"name": "t", "listen": "127.0.0.1:0", "upstream": "original_dst"}
    listener["expect_ids"] = [WEB]

    async def main() -> None:
        config = proxy_config(tmp_path, mint(ca, CLIENT), [ca], outbound=[listener])
        async with running(config, tmp_path) as proxy:
            (outbound,) = proxy.proxy.listeners
            own = outbound._own  # the registry the listener's own upstream connections use
            assert own is not None
            reader, writer = await own.open_connection("127.0.0.1", proxy.port("t"))
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            assert writer.get_extra_info("sockname")[1] not in own  # only while connecting
            writer.close()

    with caplog.at_level(logging.INFO, logger="tls_proxy.listeners"):
        asyncio.run(main())
    (refused,) = [r for r in caplog.records if r.getMessage() == "transparent connection refused"]
    assert "comes from the proxy's own upstream connection" in refused.__dict__["reason"]


# --- the command line -------------------------------------------------------------------------


def test_cli_prints_restore_input_and_refuses_bad_flags_in_one_line() -> None:
    args = ["--uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001"]
    printed = meshid("proxy", "iptables", *args, "--exclude-inbound-ports", "22")
    assert printed.returncode == 0, printed.stderr
    options = _options(exclude_inbound_ports=["22"])
    assert printed.stdout == (
        restore_script(options, family=IPV4) + restore_script(options, family=IPV6)
    )
    only = meshid("proxy", "iptables", *args, "--exclude-inbound-ports", "22", "--ipv4-only")
    assert only.stdout == restore_script(options)
    bad = meshid("proxy", "iptables", *args, "--exclude-outbound-cidrs", "10.0.0.1/8")
    assert bad.returncode == 1
    assert bad.stderr.startswith("meshid: --exclude-outbound-cidrs: expected an IPv4 or IPv6")
    assert bad.stderr.count("\n") == 1
    cleaned = meshid("proxy", "iptables", "--clean")
    installed = NatState.installed()
    assert cleaned.stdout == f"{clean_script(installed, IPV4)}{clean_script(installed, IPV6)}"


def test_cli_apply_without_iptables_fails_in_one_line() -> None:
    args = ["--uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001", "--apply"]
    result = meshid("proxy", "iptables", *args, env={"PATH": "/nonexistent"})
    assert result.returncode == 1
    assert result.stderr == (
        "meshid: iptables-save not found on PATH; install Debian's iptables package "
        "(apt-get install iptables) and run as root\n"
    )


# --- end to end: two network namespaces, the real rules, two proxy processes -------------------

PROXY_ID = 1337  # the uid (or gid) the proxies run as; it need not exist in /etc/passwd
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
APP_PORT = 8080
CLIENT_IP, SERVER_IP = "10.77.0.1", "10.77.0.2"
CLIENT_IP6, SERVER_IP6 = "fd77::1", "fd77::2"
READY_TIMEOUT = 60.0  # seconds; a loaded 2-core machine starts Python slowly
TOOLS = (
    "ip",
    "iptables-save",
    "iptables-restore",
    "ip6tables-save",
    "ip6tables-restore",
    "setpriv",
)

APP = r"""
import json, socket, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class DualStack(HTTPServer):  # one socket for both families: the sidecar reaches it on ::1 too
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

server = DualStack(("::", int(sys.argv[1])), Echo)
print("app ready", flush=True)
server.serve_forever()
"""

GET = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())\n"
)
RAW_GET = r"""
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
data = b""
try:  # a refused connection may be closed before the request is even written
    sock.sendall(b"GET /raw HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    while chunk := sock.recv(65536):
        data += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
sys.stdout.write(data.decode("latin-1"))
"""


def _missing() -> str | None:
    """What this machine lacks for the namespace test, or None."""
    if not sys.platform.startswith("linux"):
        return "Linux"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not os.path.exists("/proc/net/if_inet6"):
        missing.append("IPv6 in the kernel")
    if os.geteuid() != 0:
        missing.insert(0, "root")
    return ", ".join(missing) or None


class _Process:
    """A subprocess whose merged output is collected line by line; ``wait_for`` awaits a line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], what: str) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if predicate(line)), None)

        with self._changed:
            ok = self._changed.wait_for(
                lambda: found() is not None or self.proc.poll() is not None, READY_TIMEOUT
            )
            line = found()
        if not ok or line is None:
            raise AssertionError(f"{what}: not seen from {self.argv}:\n" + "\n".join(self.lines))
        return line

    def record(self, **fields: Any) -> dict[str, Any]:
        """The first access-log record with ``fields``, waiting for it."""

        def matches(line: str) -> bool:
            if not line.startswith("{"):
                return False
            record = json.loads(line)
            return all(record.get(k) == v for k, v in fields.items())

        return dict(json.loads(self.wait_for(matches, f"access-log record {fields}")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def _namespaces() -> Iterator[tuple[str, str]]:
    """A client and a server namespace joined by a veth pair; always deleted afterwards."""
    tag = f"{os.getpid() % 100000}"
    client, server = f"meshid-c{tag}", f"meshid-s{tag}"
    created: list[str] = []
    try:
        for name in (client, server):
            done = subprocess.run(
                ["ip", "netns", "add", name], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                pytest.skip(f"needs to create network namespaces (ip netns add: {done.stderr})")
            created.append(name)
        _ip("link", "add", f"mc{tag}", "type", "veth", "peer", "name", f"ms{tag}")
        for ns, dev, address, address6 in (
            (client, f"mc{tag}", CLIENT_IP, CLIENT_IP6),
            (server, f"ms{tag}", SERVER_IP, SERVER_IP6),
        ):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            # nodad: usable at once, not after duplicate address detection's second or so
            _ip("-n", ns, "addr", "add", f"{address6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield client, server
    finally:
        for name in created:
            subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, timeout=30, check=False
            )
        # Gone with its namespace, unless setup failed before moving it there.
        subprocess.run(["ip", "link", "del", f"mc{tag}"], capture_output=True, check=False)


def _in(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _run_in(ns: str, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _in(ns, *argv), capture_output=True, text=True, timeout=60, env=env, check=False
    )


def _meshid_in(ns: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return _run_in(ns, env, sys.executable, "-m", "meshid", *args)


def _nat(ns: str, save: str = "iptables-save") -> str:
    return subprocess.run(
        _in(ns, save, "-t", "nat"), capture_output=True, text=True, check=True
    ).stdout


def _write_configs(folder: Path, owner: int) -> dict[str, Path]:
    """Identities and configs of the client sidecar (transparent outbound) and the web sidecar
    (transparent inbound), readable by ``owner`` (keys 0600) and by nobody else. Each has a
    listener per address family: REDIRECT delivers IPv6 connections to IPv6 sockets only."""
    ca = new_authority()
    outbound = {
        "name": "out",
        "listen": f"127.0.0.1:{OUTBOUND_PORT}",
        "upstream": "original_dst",
        "expect_ids": [WEB],
        "protocol": "http",
    }
    inbound = {
        "name": "in",
        "listen": f"0.0.0.0:{INBOUND_PORT}",
        "forward": "original_dst",
        "protocol": "http",
    }
    outbound6 = {**outbound, "name": "out6", "listen": f"[::1]:{OUTBOUND_PORT}"}
    inbound6 = {**inbound, "name": "in6", "listen": f"[::]:{INBOUND_PORT}"}
    configs = {}
    for name, spiffe_id, section in (
        ("client", CLIENT, {"outbound": [outbound, outbound6]}),
        ("web", WEB, {"inbound": [inbound, inbound6]}),
    ):
        files = write_identity(folder / name, mint(ca, spiffe_id), ca)
        config = {
            "identity": files,
            "admin": {"listen": "127.0.0.1:15000"},  # each namespace has its own loopback
            "timeouts": {"drain": 1},
            **section,
        }
        path = folder / name / "proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        for item in [folder / name, path, *map(Path, files.values())]:
            os.chown(item, owner, owner)
            item.chmod(0o700 if item.is_dir() else 0o600)
        configs[name] = path
    return configs


@pytest.mark.slow
@pytest.mark.parametrize("exclusion", ["uid", "gid"])
def test_two_sidecars_in_network_namespaces_carry_redirected_traffic(exclusion: str) -> None:
    """The client app dials the server's address in plain HTTP, over IPv4 and over IPv6; the
    rules take it through both sidecars, so the app behind the far one sees the verified caller
    in x-forwarded-client-cert.
    ``uid``: the proxies run under uid 1337 and the rules exclude ``--uid 1337``; ``gid``: they
    run as root with gid 1337 and the rules also exclude ``--gid 1337``."""
    missing = _missing()
    if missing:
        pytest.skip(
            "needs root, IPv6, iproute2's ip, Debian's iptables (ip[6]tables-save/-restore) "
            f"and util-linux's setpriv to build network namespaces; missing: {missing}"
        )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    }
    if exclusion == "uid":
        drop = ["setpriv", f"--reuid={PROXY_ID}", f"--regid={PROXY_ID}", "--clear-groups"]
        flags = ["--uid", str(PROXY_ID)]
        probe = subprocess.run(
            [*drop, sys.executable, "-c", "import meshid.cli, tls_proxy.proxy"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if probe.returncode != 0:
            pytest.skip(
                f"needs uid {PROXY_ID} to be able to run {sys.executable} and import meshid "
                f"(the interpreter or the code is unreadable to it): {probe.stderr.strip()}"
            )
    else:
        drop = ["setpriv", f"--regid={PROXY_ID}", "--clear-groups"]
        flags = ["--uid", str(PROXY_ID), "--gid", str(PROXY_ID)]
    ports = ["--inbound-port", str(INBOUND_PORT), "--outbound-port", str(OUTBOUND_PORT)]
    rules = [*flags, *ports]
    processes: list[_Process] = []
    folder = Path(tempfile.mkdtemp(prefix="meshid-transparent-"))
    folder.chmod(0o755)  # pytest's tmp_path is 0700 root: the proxies' uid could not enter it
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        client_ns, server_ns = stack.enter_context(_namespaces())
        stack.callback(lambda: [p.stop() for p in processes])

        def start(ns: str, argv: list[str], ready: str) -> _Process:
            process = _Process(_in(ns, *argv), env)
            processes.append(process)
            process.wait_for(lambda line: ready in line, ready)
            return process

        def sidecar(ns: str, config: Path) -> _Process:
            argv = [*drop, sys.executable, "-m", "meshid", "proxy", "run", "--config", str(config)]
            return start(ns, argv, READY_LINE)

        def raw_get(host: str, port: int) -> str:
            done = _run_in(client_ns, env, sys.executable, "-c", RAW_GET, host, str(port))
            assert done.returncode == 0, done.stderr
            return done.stdout

        configs = _write_configs(folder, PROXY_ID if exclusion == "uid" else 0)
        # The rules, in both namespaces; applying twice leaves one copy.
        for ns in (client_ns, server_ns, server_ns):
            applied = _meshid_in(ns, env, "proxy", "iptables", *rules, "--apply")
            assert applied.returncode == 0, applied.stderr
        for family in (IPV4, IPV6):
            saved = _nat(server_ns, family.save)
            assert saved.count("-j MESHID_INBOUND\n") == 1
            assert saved.count(f"--uid-owner {PROXY_ID} -j RETURN") == 1
            assert saved.count(f"-d {family.loopback} -j RETURN") == 1

        start(server_ns, [sys.executable, "-c", APP, str(APP_PORT)], "app ready")
        web = sidecar(server_ns, configs["web"])
        client = sidecar(client_ns, configs["client"])

        # The client app dials the server's address; it names no proxy.
        got = _run_in(
            client_ns, env, sys.executable, "-c", GET, f"http://{SERVER_IP}:{APP_PORT}/hi"
        )
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["x-forwarded-client-cert"] == f"By={WEB};URI={CLIENT}"
        out = client.record(type="request", path="/hi")
        assert (out["direction"], out["peer_id"], out["upstream"], out["status"]) == (
            "outbound",
            WEB,
            f"{SERVER_IP}:{APP_PORT}",
            200,
        )
        into = web.record(type="request", path="/hi")
        assert (into["direction"], into["peer_id"], into["upstream"], into["status"]) == (
            "inbound",
            CLIENT,
            f"127.0.0.1:{APP_PORT}",
            200,
        )
        assert into["source"].startswith(f"{CLIENT_IP}:")

        # The same over IPv6: ip6tables steers it to the IPv6 listeners.
        got = _run_in(
            client_ns, env, sys.executable, "-c", GET, f"http://[{SERVER_IP6}]:{APP_PORT}/hi6"
        )
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["x-forwarded-client-cert"] == f"By={WEB};URI={CLIENT}"
        out = client.record(type="request", path="/hi6")
        assert (out["listener"], out["peer_id"], out["upstream"], out["status"]) == (
            "out6",
            WEB,
            f"[{SERVER_IP6}]:{APP_PORT}",
            200,
        )
        into = web.record(type="request", path="/hi6")
        assert (into["listener"], into["peer_id"], into["upstream"], into["status"]) == (
            "in6",
            CLIENT,
            f"[::1]:{APP_PORT}",
            200,
        )
        assert into["source"].startswith(f"{CLIENT_IP6}:")

        # Straight to the outbound listener (loopback is never redirected): refused, unrelayed.
        assert raw_get("127.0.0.1", OUTBOUND_PORT) == ""
        assert client.record(type="connection", error="no_original_dst")["upstream"] is None
        client.wait_for(
            lambda line: "transparent connection refused" in line and "not redirected" in line,
            "the outbound refusal in the log",
        )
        # To the far sidecar's own port: redirected onto itself there, so refused there, and
        # the outbound side answers 502 instead of looping.
        assert raw_get(SERVER_IP, INBOUND_PORT).startswith("HTTP/1.1 502 ")
        web.record(type="connection", error="no_original_dst")
        # Both again over IPv6.
        assert raw_get("::1", OUTBOUND_PORT) == ""
        assert client.record(listener="out6", error="no_original_dst")["upstream"] is None
        assert raw_get(SERVER_IP6, INBOUND_PORT).startswith("HTTP/1.1 502 ")
        web.record(listener="in6", error="no_original_dst")

        if exclusion == "gid":  # rules excluding someone else: the proxy's upstream comes back
            wrong = _meshid_in(
                client_ns, env, "proxy", "iptables", "--uid", "4242", *ports, "--apply"
            )
            assert wrong.returncode == 0, wrong.stderr
            # A destination no pooled upstream connection goes to, so a new one is opened
            # (the earlier ones to APP_PORT, opened before these rules, are reused as they are).
            assert raw_get(SERVER_IP, APP_PORT + 1).startswith("HTTP/1.1 502 ")
            client.wait_for(
                lambda line: "comes from the proxy's own upstream connection" in line,
                "the loop refused in the log",
            )
            assert raw_get(SERVER_IP6, APP_PORT + 1).startswith("HTTP/1.1 502 ")
            client.wait_for(
                lambda line: (
                    "comes from the proxy's own upstream connection" in line
                    and "listener=out6" in line
                ),
                "the IPv6 loop refused in the log",
            )

        if exclusion == "uid":  # not root: --apply fails in one line
            denied = _run_in(
                server_ns, env, *drop, sys.executable, "-m", "meshid", "proxy", "iptables",
                *rules, "--apply",
            )  # fmt: skip
            assert denied.returncode == 1
            assert denied.stderr.startswith("meshid: iptables-save -t nat failed (exit ")
            assert denied.stderr.count("\n") == 1

        for ns in (client_ns, server_ns):
            cleaned = _meshid_in(ns, env, "proxy", "iptables", "--clean", "--apply")
            assert cleaned.returncode == 0, cleaned.stderr
            assert "MESHID" not in _nat(ns) + _nat(ns, "ip6tables-save")
        for process in processes:
            process.stop()
        assert [p.proc.returncode for p in processes[1:]] == [0, 0]  # both sidecars drained
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert client_ns not in listed.stdout and server_ns not in listed.stdout
    assert not folder.exists()


@pytest.mark.slow
def test_apply_without_ip6tables_fails_closed_unless_ipv4_only(tmp_path: Path) -> None:
    """A namespace whose PATH has iptables but no ip6tables: ``--apply`` changes nothing and
    says why (IPv6 would bypass the sidecar); ``--ipv4-only`` installs the IPv4 rules alone."""
    missing = _missing()
    if missing:
        pytest.skip(f"needs root, IPv6, ip and Debian's iptables; missing: {missing}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "iptables-save", "iptables-restore"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or tool)
    env = {
        **os.environ,
        "PATH": str(bin_dir),
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    rules = ["--uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001", "--apply"]
    with _namespaces() as (ns, _):
        refused = _meshid_in(ns, env, "proxy", "iptables", *rules)
        assert refused.returncode == 1
        assert refused.stderr.startswith("meshid: ip6tables-save not found on PATH; ")
        assert "IPv6 TCP would bypass the sidecar" in refused.stderr
        assert "--ipv4-only" in refused.stderr
        assert refused.stderr.count("\n") == 1
        assert "MESHID" not in _nat(ns)  # read both tables before writing either
        applied = _meshid_in(ns, env, "proxy", "iptables", *rules, "--ipv4-only")
        assert applied.returncode == 0, applied.stderr
        assert "IPv4 nat tables" in applied.stdout
        assert "-j MESHID_OUTPUT" in _nat(ns)
        assert "MESHID" not in _nat(ns, "ip6tables-save")
        cleaned = _meshid_in(ns, env, "proxy", "iptables", "--clean", "--apply", "--ipv4-only")
        assert cleaned.returncode == 0, cleaned.stderr
        assert "MESHID" not in _nat(ns)


@pytest.mark.slow
def test_ipv4_only_apply_removes_the_ipv6_rules_an_earlier_run_left() -> None:
    """Applied for both families, then again with ``--ipv4-only``: the IPv6 rules of the first
    run are gone (they would still redirect IPv6 to ports this configuration may not serve),
    the IPv4 ones are there once, and the command says what it removed."""
    missing = _missing()
    if missing:
        pytest.skip(f"needs root, IPv6, ip and Debian's iptables; missing: {missing}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    rules = ["--uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001", "--apply"]
    with _namespaces() as (ns, _):
        both = _meshid_in(ns, env, "proxy", "iptables", *rules)
        assert both.returncode == 0, both.stderr
        assert "-j MESHID_OUTPUT" in _nat(ns, "ip6tables-save")
        assert "Removed" not in both.stdout
        only = _meshid_in(ns, env, "proxy", "iptables", *rules, "--ipv4-only")
        assert only.returncode == 0, only.stderr
        assert "Removed the IPv6 rules an earlier run left (--ipv4-only)." in only.stdout
        assert "MESHID" not in _nat(ns, "ip6tables-save")
        assert _nat(ns).count("-A OUTPUT -p tcp -j MESHID_OUTPUT") == 1
        again = _meshid_in(ns, env, "proxy", "iptables", *rules, "--ipv4-only")
        assert again.returncode == 0, again.stderr
        assert "Removed" not in again.stdout  # nothing left to remove the second time
        cleaned = _meshid_in(ns, env, "proxy", "iptables", "--clean", "--apply")
        assert cleaned.returncode == 0, cleaned.stderr
        assert "MESHID" not in _nat(ns) + _nat(ns, "ip6tables-save")
