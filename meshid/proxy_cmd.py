"""``meshid proxy run``, ``meshid proxy wait`` and ``meshid proxy iptables``: run the mTLS
sidecar, hold an app until its sidecar is ready, and steer the app's TCP through it."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, NoReturn

import typer

proxy_app = typer.Typer(help="Run the mTLS sidecar proxy.", no_args_is_help=True)

WAIT_POLL = 0.2  # seconds between /ready probes: fast enough not to delay an app's start


def _fail(message: str) -> NoReturn:
    typer.echo(f"meshid: {message}", err=True)
    raise typer.Exit(1)


@proxy_app.command("run")
def proxy_run(
    config: Annotated[Path, typer.Option("--config", help="The proxy's YAML configuration.")],
) -> None:
    """Run the proxy in the foreground; SIGTERM drains; SIGHUP (or a change of the file) reloads
    the configuration, identity files and policy."""
    # `meshid proxy run --config FILE` seldom gets here: meshid.cli.main runs it without typer.
    from ._sidecar import run

    status = run(config)
    if status:
        raise typer.Exit(status)


@proxy_app.command("wait")
def proxy_wait(
    admin: Annotated[str, typer.Option("--admin", help="HOST:PORT of the proxy's admin server.")],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 60.0,
) -> None:
    """Block until the proxy's /ready answers 200 (exit 1 after --timeout)."""
    url = f"http://{admin}/ready"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    typer.echo(f"Proxy at {admin} is ready.")
                    return
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        time.sleep(WAIT_POLL)
    _fail(f"proxy at {admin} not ready after {timeout:g}s ({last})")


@proxy_app.command("iptables")
def proxy_iptables(
    uid: Annotated[
        int | None, typer.Option("--uid", help="The uid the proxy runs as: never redirected.")
    ] = None,
    inbound_port: Annotated[
        int | None, typer.Option("--inbound-port", help="The transparent inbound listener.")
    ] = None,
    outbound_port: Annotated[
        int | None, typer.Option("--outbound-port", help="The transparent outbound listener.")
    ] = None,
    gid: Annotated[
        int | None, typer.Option("--gid", help="Also never redirect this gid's traffic.")
    ] = None,
    include_inbound_ports: Annotated[
        list[str] | None,
        typer.Option(
            "--include-inbound-ports",
            metavar="PORTS",
            help="Redirect only these inbound ports (* all).",
        ),
    ] = None,
    exclude_inbound_ports: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude-inbound-ports",
            metavar="PORTS",
            help="Inbound ports not redirected (e.g. 22).",
        ),
    ] = None,
    exclude_outbound_ports: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude-outbound-ports", metavar="PORTS", help="Destination ports not redirected."
        ),
    ] = None,
    exclude_outbound_cidrs: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude-outbound-cidrs",
            metavar="CIDRS",
            help="Destination networks not redirected (IPv4 or IPv6, each to its own table).",
        ),
    ] = None,
    ipv4_only: Annotated[
        bool,
        typer.Option(
            "--ipv4-only",
            help="No ip6tables rules (only where the namespace has no IPv6: its TCP would "
            "bypass the sidecar).",
        ),
    ] = False,
    apply: Annotated[
        bool, typer.Option("--apply", help="Apply with iptables-restore instead of printing.")
    ] = False,
    clean: Annotated[
        bool, typer.Option("--clean", help="Remove meshid's chains (other options are ignored).")
    ] = False,
) -> None:
    """Print (or --apply) the nat-table REDIRECT rules of transparent mode, IPv4 and IPv6;
    --clean removes them.

    Printed rules are iptables-restore input, then ip6tables-restore input (each block says
    which loads it: iptables-restore --noflush < FILE).
    """
    from tls_proxy import ProxyError, transparent

    families = (transparent.IPV4,) if ipv4_only else transparent.FAMILIES
    try:
        if clean:
            if not apply:
                for family in families:
                    script = transparent.clean_script(transparent.NatState.installed(), family)
                    assert script is not None
                    typer.echo(script, nl=False)
            elif cleaned := transparent.clean(families):
                names = " and ".join(f.name for f in cleaned)
                typer.echo(f"Removed meshid's transparent-mode chains from the {names} nat table.")
            else:
                typer.echo("No meshid chains in the nat tables; nothing to remove.")
            return
        options = transparent.options_from_flags(
            uid=uid,
            gid=gid,
            inbound_port=inbound_port,
            outbound_port=outbound_port,
            include_inbound_ports=include_inbound_ports or (),
            exclude_inbound_ports=exclude_inbound_ports or (),
            exclude_outbound_ports=exclude_outbound_ports or (),
            exclude_outbound_cidrs=exclude_outbound_cidrs or (),
            ipv4_only=ipv4_only,
        )
        if not apply:
            for family in options.families:
                typer.echo(transparent.restore_script(options, family=family), nl=False)
            return
        applied = transparent.apply(options)
    except ProxyError as err:
        _fail(str(err))
    names = " and ".join(f.name for f in options.families)
    typer.echo(
        f"Applied transparent mode to the {names} nat tables: inbound TCP -> port "
        f"{options.inbound_port}, outbound TCP -> port {options.outbound_port}, uid "
        f"{options.uid} not redirected."
    )
    for family in applied.removed:
        typer.echo(f"Removed the {family.name} rules an earlier run left (--ipv4-only).")
