"""Transparent mode: the nat-table rules that steer a workload's TCP through its sidecar, and
the original destination of a connection those rules redirected.

Pure core, no I/O:

- ``options_from_flags`` checks the flags of ``meshid proxy iptables`` into
  ``TransparentOptions`` (errors name the flag and the rule broken); ``ruleset`` turns them into
  our chains and rules for one address ``Family`` (``IPV4``: iptables, ``IPV6``: ip6tables; the
  same chains in both, each with its own loopback network and its own excluded CIDRs), laid out
  as Istio's istio-iptables and Linkerd's proxy-init do::

      PREROUTING -p tcp → MESHID_INBOUND: excluded ports RETURN; every other port (or only the
          included ones) → MESHID_INBOUND_REDIRECT: REDIRECT --to-ports <inbound port>
      OUTPUT -p tcp → MESHID_OUTPUT: the proxy's own uid (and gid) RETURN, so that its upstream
          connections are not caught again; traffic leaving by lo or to 127.0.0.0/8 (::1) RETURN;
          excluded ports and CIDRs RETURN; the rest → MESHID_OUTBOUND_REDIRECT: REDIRECT
          --to-ports <outbound port>

- ``restore_script`` and ``clean_script`` write ``iptables-restore --noflush`` (or
  ``ip6tables-restore``) input that also removes what an earlier run left (``NatState``, read
  from ``iptables-save -t nat``), so applying twice leaves one copy and cleaning leaves nothing.
  One restore is one transaction: a family's table never holds half a rule set.
- ``transparent_target`` says where a redirected connection goes (outbound: its original
  destination; inbound: the same port on loopback, the app's real port), or raises
  ``NoOriginalDestination`` when it was not redirected or would loop back into the proxy.

Thin shell: ``original_dst`` (``getsockopt(SOL_IP, SO_ORIGINAL_DST)``) and ``destination``
(which also refuses the proxy's own connections coming back, known by ``OwnConnections``, the
source ports of the upstream connections it is opening), ``apply`` and ``clean`` (run
iptables-save and iptables-restore, then the ip6 ones). It must not open listeners nor decide
policy.

Both families by default: IPv6 TCP that no ip6tables rule redirects would bypass the sidecar,
so ``apply`` reads both tables before it changes either and fails, naming ``--ipv4-only``, when
ip6tables cannot be used. ``original_dst`` reads IPv6 destinations with
``IP6T_SO_ORIGINAL_DST``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import streams
from .errors import ConfigError, NoOriginalDestination, ProxyError

CHAIN_PREFIX = "MESHID_"  # every nat chain named so is meshid's: apply and clean remove them
INBOUND = "MESHID_INBOUND"
INBOUND_REDIRECT = "MESHID_INBOUND_REDIRECT"
OUTPUT = "MESHID_OUTPUT"
OUTBOUND_REDIRECT = "MESHID_OUTBOUND_REDIRECT"
CHAINS = (INBOUND, INBOUND_REDIRECT, OUTPUT, OUTBOUND_REDIRECT)
# The rules in built-in chains that send TCP into ours (iptables-save form, so that a saved
# copy is recognized and deleted verbatim).
JUMPS = (f"-A PREROUTING -p tcp -j {INBOUND}", f"-A OUTPUT -p tcp -j {OUTPUT}")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to the kernel; it names nobody
MAX_PORT = 65535

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h (at level SOL_IPV6)
SOCKADDR_IN_SIZE = 16  # struct sockaddr_in
SOCKADDR_IN6_SIZE = 28  # struct sockaddr_in6
RUN_TIMEOUT = 30.0  # seconds; iptables-save/-restore take milliseconds, longer is a stuck host


@dataclass(frozen=True)
class Family:
    """An address family's nat table: the tools that read and load it and its loopback."""

    name: str  # "IPv4", for messages
    version: int  # ipaddress's version: which --exclude-outbound-cidrs belong here
    save: str
    restore: str
    loopback: str


IPV4 = Family("IPv4", 4, "iptables-save", "iptables-restore", "127.0.0.0/8")
IPV6 = Family("IPv6", 6, "ip6tables-save", "ip6tables-restore", "::1/128")
FAMILIES = (IPV4, IPV6)
IPV4_ONLY_FLAG = "--ipv4-only"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TransparentOptions:
    """The checked flags of ``meshid proxy iptables``; build it with ``options_from_flags``."""

    uid: int
    inbound_port: int
    outbound_port: int
    gid: int | None = None
    include_inbound_ports: tuple[int, ...] | None = None  # None: every port is redirected
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()  # normalized, e.g. "169.254.169.254/32"
    ipv4_only: bool = False  # no ip6tables rules: for a namespace without IPv6

    @property
    def families(self) -> tuple[Family, ...]:
        return (IPV4,) if self.ipv4_only else FAMILIES

    def cidrs(self, family: Family) -> tuple[str, ...]:
        """The excluded networks of ``family``: each goes to its own family's table only."""
        return tuple(
            c
            for c in self.exclude_outbound_cidrs
            if ipaddress.ip_network(c).version == family.version
        )

    def __post_init__(self) -> None:
        _check_id("--uid", self.uid, "uid")
        if self.gid is not None:
            _check_id("--gid", self.gid, "gid")
        _check_port("--inbound-port", self.inbound_port)
        _check_port("--outbound-port", self.outbound_port)
        if self.inbound_port == self.outbound_port:
            raise ConfigError(
                f"--outbound-port: expected a port other than --inbound-port "
                f"(both {self.inbound_port}); the inbound and the outbound listener are two"
            )
        include = self.include_inbound_ports
        if include is not None:
            if not include:
                raise ConfigError("--include-inbound-ports: expected at least one port, or *")
            if self.exclude_inbound_ports:
                raise ConfigError(
                    "--exclude-inbound-ports: expected only when every inbound port is "
                    "redirected (--include-inbound-ports '*'): with a list of included ports, "
                    "the others are not redirected anyway"
                )
            if self.inbound_port in include:
                raise ConfigError(
                    f"--include-inbound-ports: expected ports other than --inbound-port "
                    f"{self.inbound_port}: redirecting the proxy's own port to itself is a loop"
                )
        for flag, ports in (
            ("--include-inbound-ports", include or ()),
            ("--exclude-inbound-ports", self.exclude_inbound_ports),
            ("--exclude-outbound-ports", self.exclude_outbound_ports),
        ):
            for port in ports:
                _check_port(flag, port)
        for cidr in self.exclude_outbound_cidrs:
            network = _network("--exclude-outbound-cidrs", cidr)
            if self.ipv4_only and ipaddress.ip_network(network).version == IPV6.version:
                raise ConfigError(
                    f"--exclude-outbound-cidrs: expected IPv4 networks with {IPV4_ONLY_FLAG} "
                    f"(got {network}): no IPv6 rules are installed to exclude it from"
                )


def _check_id(flag: str, value: int, kind: str) -> None:
    if value == 0:
        raise ConfigError(
            f"{flag}: expected the proxy's own {kind}, not 0: excluding root's connections from "
            "redirection would let every process running as root bypass the mesh"
        )
    if not 0 < value <= MAX_ID:
        raise ConfigError(f"{flag}: expected a {kind} in 1..{MAX_ID} (got {value})")


def _check_port(flag: str, value: int) -> None:
    if not 0 < value <= MAX_PORT:
        raise ConfigError(f"{flag}: expected a port in 1..{MAX_PORT} (got {value})")


def _network(flag: str, text: str) -> str:
    try:
        return ipaddress.ip_network(text.strip()).with_prefixlen
    except ValueError as err:
        raise ConfigError(
            f"{flag}: expected an IPv4 or IPv6 address or network such as 10.0.0.0/8 or "
            f"fd00::/8 (got {text!r}: {err})"
        ) from err


def _items(values: Iterable[str]) -> list[str]:
    """Repeated flags and comma-separated lists alike: ``["22,80", "443"]`` → three items."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _ports(flag: str, values: Iterable[str]) -> tuple[int, ...]:
    out: list[int] = []
    for item in _items(values):
        if not (item.isascii() and item.isdigit()):
            raise ConfigError(
                f"{flag}: expected port numbers in 1..{MAX_PORT}, comma-separated (got {item!r})"
            )
        port = int(item)
        _check_port(flag, port)
        if port not in out:
            out.append(port)
    return tuple(out)


def options_from_flags(
    *,
    uid: int | None,
    inbound_port: int | None,
    outbound_port: int | None,
    gid: int | None = None,
    include_inbound_ports: Sequence[str] = (),
    exclude_inbound_ports: Sequence[str] = (),
    exclude_outbound_ports: Sequence[str] = (),
    exclude_outbound_cidrs: Sequence[str] = (),
    ipv4_only: bool = False,
) -> TransparentOptions:
    """Check the command line's values; ``ConfigError`` names the flag and the rule broken."""
    for flag, value, what in (
        ("--uid", uid, "the uid the proxy runs as; its own connections are not redirected"),
        ("--inbound-port", inbound_port, "the port of the proxy's transparent inbound listener"),
        ("--outbound-port", outbound_port, "the port of its transparent outbound listener"),
    ):
        if value is None:
            raise ConfigError(f"{flag}: required ({what})")
    assert uid is not None and inbound_port is not None and outbound_port is not None
    included = _items(include_inbound_ports)
    if "*" in included and len(included) > 1:
        raise ConfigError(
            f"--include-inbound-ports: expected * (every port) or a list of ports, not both "
            f"(got {','.join(included)})"
        )
    cidrs: list[str] = []
    for item in _items(exclude_outbound_cidrs):
        cidr = _network("--exclude-outbound-cidrs", item)
        if cidr not in cidrs:
            cidrs.append(cidr)
    return TransparentOptions(
        uid=uid,
        gid=gid,
        inbound_port=inbound_port,
        outbound_port=outbound_port,
        include_inbound_ports=None
        if not included or included == ["*"]
        else _ports("--include-inbound-ports", included),
        exclude_inbound_ports=_ports("--exclude-inbound-ports", exclude_inbound_ports),
        exclude_outbound_ports=_ports("--exclude-outbound-ports", exclude_outbound_ports),
        exclude_outbound_cidrs=tuple(cidrs),
        ipv4_only=ipv4_only,
    )


@dataclass(frozen=True)
class Ruleset:
    """Our chains and the ``-A CHAIN ...`` rules to append, in iptables-save form and order."""

    chains: tuple[str, ...]
    rules: tuple[str, ...]


def ruleset(options: TransparentOptions, family: Family = IPV4) -> Ruleset:
    """The nat-table rules of transparent mode for ``options`` in ``family``'s table (see the
    module docstring); the same in both families but for loopback and the excluded CIDRs."""
    tcp_port = "-p tcp -m tcp --dport"
    rules = [*JUMPS, f"-A {INBOUND_REDIRECT} -p tcp -j REDIRECT --to-ports {options.inbound_port}"]
    rules += [f"-A {INBOUND} {tcp_port} {p} -j RETURN" for p in options.exclude_inbound_ports]
    if options.include_inbound_ports is None:
        rules.append(f"-A {INBOUND} -p tcp -j {INBOUND_REDIRECT}")
    else:
        rules += [
            f"-A {INBOUND} {tcp_port} {p} -j {INBOUND_REDIRECT}"
            for p in options.include_inbound_ports
        ]
    rules.append(f"-A {OUTBOUND_REDIRECT} -p tcp -j REDIRECT --to-ports {options.outbound_port}")
    # The proxy's own connections first: they must never be redirected back to it.
    rules.append(f"-A {OUTPUT} -m owner --uid-owner {options.uid} -j RETURN")
    if options.gid is not None:
        rules.append(f"-A {OUTPUT} -m owner --gid-owner {options.gid} -j RETURN")
    # Loopback is the app talking to its own sidecar or to itself (lo also carries traffic to
    # this host's own addresses): never a mesh hop.
    rules.append(f"-A {OUTPUT} -o lo -j RETURN")
    rules.append(f"-A {OUTPUT} -d {family.loopback} -j RETURN")
    rules += [f"-A {OUTPUT} {tcp_port} {p} -j RETURN" for p in options.exclude_outbound_ports]
    rules += [f"-A {OUTPUT} -d {cidr} -j RETURN" for cidr in options.cidrs(family)]
    rules.append(f"-A {OUTPUT} -j {OUTBOUND_REDIRECT}")
    return Ruleset(CHAINS, tuple(rules))


@dataclass(frozen=True)
class NatState:
    """What meshid has in the nat table, read from ``iptables-save -t nat``: its chains and the
    rules elsewhere (built-in chains) that jump into them."""

    chains: tuple[str, ...] = ()
    jumps: tuple[str, ...] = ()

    @classmethod
    def parse(cls, saved: str) -> NatState:
        chains: list[str] = []
        jumps: list[str] = []
        table: str | None = None
        for raw in saved.splitlines():
            line = raw.strip()
            if line.startswith("*"):
                table = line[1:]
            elif table != "nat":
                continue
            elif line.startswith(":"):
                name = line[1:].split()[0]
                if name.startswith(CHAIN_PREFIX):
                    chains.append(name)
            elif line.startswith("-A "):
                words = line.split()
                targets = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "-g")]
                if not words[1].startswith(CHAIN_PREFIX) and any(
                    t.startswith(CHAIN_PREFIX) for t in targets
                ):
                    jumps.append(line)
        return cls(tuple(chains), tuple(jumps))

    @classmethod
    def installed(cls) -> NatState:
        """What ``apply`` leaves: for writing a clean script without reading the table."""
        return cls(CHAINS, JUMPS)

    @property
    def empty(self) -> bool:
        return not self.chains and not self.jumps


def _header(family: Family) -> str:
    return (
        f"# meshid transparent mode: {family.name} nat-table REDIRECT rules "
        "(docs/proxy.md, Transparent mode).\n"
        f"# Load with: {family.restore} --noflush < FILE\n"
    )


def _removal(state: NatState, keep: Sequence[str] = ()) -> list[str]:
    """Delete the jumps into our chains, then flush and delete the chains not in ``keep``."""
    stale = [c for c in state.chains if c not in keep]
    return [
        *("-D" + jump.removeprefix("-A") for jump in state.jumps),
        *(f"-F {chain}" for chain in stale),
        *(f"-X {chain}" for chain in stale),
    ]


def restore_script(
    options: TransparentOptions, state: NatState | None = None, family: Family = IPV4
) -> str:
    """``iptables-restore --noflush`` (``family.restore``) input installing ``ruleset(options,
    family)``, replacing what ``state`` shows is there. Declaring a chain flushes it, so
    re-applying leaves one copy."""
    rules = ruleset(options, family)
    lines = [
        "*nat",
        *(f":{chain} - [0:0]" for chain in rules.chains),
        *_removal(state or NatState(), keep=rules.chains),
        *rules.rules,
        "COMMIT",
    ]
    return _header(family) + "\n".join(lines) + "\n"


def clean_script(state: NatState, family: Family = IPV4) -> str | None:
    """``family.restore --noflush`` input removing everything of ours ``state`` shows, or None
    when there is nothing to remove."""
    if state.empty:
        return None
    lines = ["*nat", *_removal(state), "COMMIT"]
    head = f"# meshid transparent mode: remove its {family.name} nat-table rules.\n"
    return head + f"# Load with: {family.restore} --noflush < FILE\n" + "\n".join(lines) + "\n"


def transparent_target(original: Address, local: Address, *, inbound: bool) -> Address:
    """Where a connection accepted on ``local`` and first sent to ``original`` is relayed.

    Outbound: ``original`` itself (the peer's sidecar takes it there). Inbound: the same port on
    loopback, where the app listens. Refused (``NoOriginalDestination``) when the connection was
    not redirected (``original`` is the listener itself) or relaying it would reach this proxy
    again: inbound to its own port, outbound to a loopback address (the rules never redirect
    loopback, so such a connection came past them and may be the proxy's own).
    """
    if original == local:
        raise NoOriginalDestination(
            f"not redirected: the original destination {original} is this listener itself"
        )
    loopback = ipaddress.ip_address(original.host).is_loopback
    if inbound:
        if original.port == local.port:
            raise NoOriginalDestination(
                f"loop: the original destination {original} is this listener's port"
            )
        host = "::1" if ":" in original.host else "127.0.0.1"
        return Address(host, original.port)
    if loopback:
        raise NoOriginalDestination(
            f"loop: the original destination {original} is a loopback address, which the "
            "transparent-mode rules never redirect"
        )
    return original


class _Socket(Protocol):
    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...

    def getsockname(self) -> Any: ...

    def getpeername(self) -> Any: ...


def parse_sockaddr(raw: bytes) -> Address:
    """A ``struct sockaddr_in`` or ``sockaddr_in6`` from the kernel (family in host byte order,
    port in network byte order)."""
    if len(raw) < 2:
        raise NoOriginalDestination(f"SO_ORIGINAL_DST returned {len(raw)} bytes")
    (family,) = struct.unpack("=H", raw[:2])
    if family == socket.AF_INET and len(raw) >= 8:
        (port,) = struct.unpack("!H", raw[2:4])
        return Address(socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    if family == socket.AF_INET6 and len(raw) >= 24:
        (port,) = struct.unpack("!H", raw[2:4])
        return Address(socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    raise NoOriginalDestination(
        f"SO_ORIGINAL_DST returned an unknown address (family {family}, {len(raw)} bytes)"
    )


def original_dst(sock: _Socket) -> Address:
    """The destination a redirected TCP connection was first sent to, from the NAT entry."""
    if sock.family == socket.AF_INET:
        level, option, size = socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE
    elif sock.family == socket.AF_INET6:
        level, option, size = socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE
    else:
        raise NoOriginalDestination(f"address family {sock.family} has no original destination")
    try:
        raw = sock.getsockopt(level, option, size)
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise NoOriginalDestination(
                "not redirected: the kernel holds no NAT entry for this connection "
                "(SO_ORIGINAL_DST: ENOENT); see meshid proxy iptables"
            ) from err
        raise NoOriginalDestination(f"SO_ORIGINAL_DST failed: {err}") from err
    return parse_sockaddr(raw)


class OwnConnections:
    """The source ports of the upstream connections a transparent outbound listener is opening.

    If the proxy does not run as the uid (or gid) the rules exclude, its own connection to an
    original destination is redirected straight back to it, and each accepted copy would open
    another. ``open_connection`` binds the source port before connecting, so the listener can
    recognize such a connection when it is accepted (``destination(..., own=...)``) and refuse
    it. Ports bound with ``bind`` are exclusive, so no other socket of the host shares them.
    """

    def __init__(self) -> None:
        self._ports: set[int] = set()

    def __contains__(self, port: object) -> bool:
        return port in self._ports

    async def open_connection(
        self, host: str, port: int, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """``asyncio.open_connection(host, port, **kwargs)`` from a source port known here."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # noqa: S104
            own = int(sock.getsockname()[1])
            self._ports.add(own)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
                hostname = host if kwargs.get("ssl") else None
                return await streams.open_connection(sock=sock, server_hostname=hostname, **kwargs)
            finally:
                self._ports.discard(own)
        except BaseException:
            sock.close()
            raise


def destination(
    sock: _Socket, *, inbound: bool, own: OwnConnections | None = None
) -> tuple[Address, Address]:
    """The original destination of the accepted ``sock`` and where to relay it; refused when
    ``sock`` comes from one of ``own``'s connections (the proxy talking to itself)."""
    if own is not None:
        peer_port = int(sock.getpeername()[1])
        if peer_port in own:
            raise NoOriginalDestination(
                f"loop: this connection comes from the proxy's own upstream connection (port "
                f"{peer_port}); run the proxy as the uid or gid meshid proxy iptables excludes"
            )
    original = original_dst(sock)
    host, port = sock.getsockname()[:2]
    return original, transparent_target(original, Address(str(host), int(port)), inbound=inbound)


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise ProxyError(
            f"{argv[0]} not found on PATH; install Debian's iptables package "
            "(apt-get install iptables) and run as root"
        )
    try:
        done = subprocess.run(  # noqa: S603  fixed argv, no shell
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ProxyError(f"{' '.join(argv)} failed: {err}") from err
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[0].strip() if lines else "no message"
        raise ProxyError(f"{' '.join(argv)} failed (exit {done.returncode}): {why}")
    return done.stdout


IPV6_KERNEL_MARKER = "/proc/net/if_inet6"  # present when the kernel runs IPv6 at all


def ipv6_unusable(err: ProxyError, kernel_has_ipv6: bool) -> ProxyError:
    """``err`` from ip6tables, with what it means and the way out."""
    way_out = (
        "make ip6tables work, or pass --ipv4-only if the namespace has no IPv6"
        if kernel_has_ipv6
        else f"this kernel has IPv6 turned off (no {IPV6_KERNEL_MARKER}): pass --ipv4-only"
    )
    return ProxyError(
        f"{err}; IPv6 TCP would bypass the sidecar without ip6tables rules: {way_out}"
    )


def read_nat_state(family: Family = IPV4) -> NatState:
    try:
        return NatState.parse(_run([family.save, "-t", "nat"]))
    except ProxyError as err:
        if family is IPV6:
            raise ipv6_unusable(err, os.path.exists(IPV6_KERNEL_MARKER)) from err
        raise


@dataclass(frozen=True)
class Applied:
    """What ``apply`` did: the restore input it loaded per family, and the families whose
    rules from an earlier run it removed because ``options`` no longer covers them."""

    scripts: list[str]
    removed: list[Family]


def apply(options: TransparentOptions) -> Applied:
    """Install the rules of ``options`` in one ``iptables-restore --noflush`` transaction per
    family, replacing what an earlier run installed.

    Every family's table is read before any is written, so a host without usable ip6tables
    fails with nothing changed. A family whose restore fails after an earlier one succeeded
    leaves that one in place; the error says so (re-running is idempotent). With
    ``--ipv4-only``, IPv6 rules an earlier run installed are removed too, where ip6tables can
    be used: left behind, they would keep redirecting IPv6 to ports this configuration may no
    longer serve.
    """
    plan = [
        (family, restore_script(options, read_nat_state(family), family))
        for family in options.families
    ]
    stale = [
        (family, script)
        for family in FAMILIES
        if family not in options.families and (script := _leftovers(family)) is not None
    ]
    done: list[Family] = []
    for family, script in plan:
        try:
            _run([family.restore, "--noflush"], script)
        except ProxyError as err:
            if not done:
                raise
            names = " and ".join(f.name for f in done)
            raise ProxyError(
                f"{err}; the {names} rules are in place but {family.name} TCP is not "
                "redirected: fix it and apply again, or remove them with --clean --apply"
            ) from err
        done.append(family)
    for family, script in stale:
        try:
            _run([family.restore, "--noflush"], script)
        except ProxyError as err:
            raise ProxyError(
                f"{err}; the new rules are in place, but {family.name} rules of an earlier run "
                f"are left: remove them with {family.restore} or --clean --apply"
            ) from err
    return Applied([script for _, script in plan + stale], [family for family, _ in stale])


def _leftovers(family: Family) -> str | None:
    """``clean_script`` for what an earlier run left in ``family``'s table; None when there is
    nothing, or the table cannot be read (no ip6tables: nothing of ours can be there)."""
    try:
        state = NatState.parse(_run([family.save, "-t", "nat"]))
    except ProxyError:
        return None
    return clean_script(state, family)


def clean(families: Sequence[Family] = FAMILIES) -> list[Family]:
    """Remove every meshid chain and the jumps into them from each of ``families``' nat tables;
    the families that had some (every table is read before any is written)."""
    plan = [(family, clean_script(read_nat_state(family), family)) for family in families]
    cleaned: list[Family] = []
    for family, script in plan:
        if script is not None:
            _run([family.restore, "--noflush"], script)
            cleaned.append(family)
    return cleaned
