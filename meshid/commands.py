"""The ``meshid`` command line, modelled on ``spire-server``/``spire-agent``: the typer app.

Commands parse flags, call the admin API (or start a component) and print. A failed command
exits non-zero with one clear line on stderr and changes nothing. ``meshid.cli.main`` is the
entry point: it imports this module for every command but the sidecar's ``proxy run``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca.config import DEFAULT_ADMIN_SOCKET, DEFAULT_SOCKET_ENV, load_server_config
from ca.errors import CaError
from ca.keys import KeyType, generate_key, private_key_pem, write_private_file

from .agent_cmd import agent_app, svid_app
from .logs import setup_logging
from .policy_cmd import policy_app
from .proxy_cmd import proxy_app

if TYPE_CHECKING:
    from .client import AdminClient

app = typer.Typer(
    name="meshid",
    help="meshid: an identity-first service mesh (SPIFFE CA, agents, mTLS proxy).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
server_app = typer.Typer(help="Run and check the CA server.", no_args_is_help=True)
entry_app = typer.Typer(help="Registration entries.", no_args_is_help=True)
token_app = typer.Typer(help="Join tokens for node attestation.", no_args_is_help=True)
bundle_app = typer.Typer(help="Trust bundles: ours and federated ones.", no_args_is_help=True)
authority_app = typer.Typer(help="Signing authorities and their rotation.", no_args_is_help=True)
x509_app = typer.Typer(help="Mint X.509-SVIDs.", no_args_is_help=True)
jwt_app = typer.Typer(help="Mint JWT-SVIDs.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
for sub, name in [
    (server_app, "server"),
    (entry_app, "entry"),
    (token_app, "token"),
    (bundle_app, "bundle"),
    (authority_app, "authority"),
    (x509_app, "x509"),
    (jwt_app, "jwt"),
    (audit_app, "audit"),
    (agent_app, "agent"),
    (svid_app, "svid"),
    (proxy_app, "proxy"),
]:
    app.add_typer(sub, name=name)
app.add_typer(policy_app, name="policy")


class Output(StrEnum):
    text = "text"
    json = "json"


SocketOpt = Annotated[
    Path,
    typer.Option(
        "--socket",
        envvar=DEFAULT_SOCKET_ENV,
        help="The server's admin socket.",
        show_default=True,
    ),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="text or json")]


def fail(message: str) -> NoReturn:
    typer.echo(f"meshid: {message}", err=True)
    raise typer.Exit(1)


def _client(socket: Path) -> AdminClient:
    from .client import AdminClient  # httpx: only for the commands that call the server

    return AdminClient(socket)


def _call(socket: Path, method: str, path: str, **kwargs: Any) -> Any:
    from .client import AdminError

    try:
        with _client(socket) as c:
            response = c.request(method, path, **kwargs)
    except AdminError as err:
        fail(str(err))
    if response.status_code == 204:
        return None
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.text


def _rfc3339(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{flag}: must be an RFC 3339 time such as 2026-01-01T00:00:00Z (got {value!r})")
    if parsed.tzinfo is None:
        fail(f"{flag}: must carry a time zone, e.g. 2026-01-01T00:00:00Z (got {value!r})")
    return parsed


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


# -- server ---------------------------------------------------------------------------------
@server_app.command("run")
def server_run(
    data_dir: Annotated[Path | None, typer.Option(help="Keys, database, server id.")] = None,
    trust_domain: Annotated[str | None, typer.Option(help="e.g. example.org")] = None,
    bind: Annotated[str | None, typer.Option(help="HOST:PORT of the node API.")] = None,
    admin_socket: Annotated[
        Path | None, typer.Option(envvar=DEFAULT_SOCKET_ENV, help="Admin API Unix socket.")
    ] = None,
    database: Annotated[str | None, typer.Option(help="sqlite:///... or postgresql://...")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML configuration file.")] = None,
    key_type: Annotated[KeyType | None, typer.Option(help="Authority key type.")] = None,
    ca_ttl: Annotated[int | None, typer.Option(help="Authority lifetime, seconds.")] = None,
    admin_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT for the admin API over mTLS (admin entries).")
    ] = None,
    bundle_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT of the SPIFFE bundle endpoint (https_spiffe).")
    ] = None,
    x509pop_ca_bundle: Annotated[
        Path | None,
        typer.Option(help="PEM CA certificates of node certificates (x509pop attestation)."),
    ] = None,
) -> None:
    """Run the CA server in the foreground until SIGTERM."""
    from ca.server import serve

    try:
        cfg = load_server_config(
            config,
            {
                "data_dir": data_dir,
                "trust_domain": trust_domain,
                "bind": bind,
                "admin_socket": admin_socket,
                "database": database,
                "key_type": key_type,
                "ca_ttl": ca_ttl,
                "admin_listen": admin_listen,
                "bundle_endpoint": bundle_endpoint,
                "x509pop_ca_bundle": x509pop_ca_bundle,
            },
        )
        setup_logging(cfg.log_level)
        asyncio.run(serve(cfg))
    except CaError as err:
        fail(str(err))


@server_app.command("healthcheck")
def server_healthcheck(
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Exit 0 when the server answers and has an active authority."""
    health = _call(socket, "GET", "/v1/health")
    if verbose:
        _print_json(health)
    else:
        typer.echo("Server is healthy.")


# -- entries --------------------------------------------------------------------------------
def _entry_body(
    spiffe_id: str,
    parent_id: str,
    selector: list[str],
    x509_ttl: int,
    jwt_ttl: int,
    dns: list[str],
    hint: str,
    admin: bool,
    downstream: bool,
    federates_with: list[str],
    expires_at: datetime | None,
) -> dict[str, Any]:
    return {
        "spiffe_id": spiffe_id,
        "parent_id": parent_id,
        "selectors": selector,
        "x509_svid_ttl": x509_ttl,
        "jwt_svid_ttl": jwt_ttl,
        "dns_names": dns,
        "hint": hint,
        "admin": admin,
        "downstream": downstream,
        "federates_with": federates_with,
        "expires_at": expires_at.isoformat() if expires_at else None,
    }


def _print_entry(e: dict[str, Any]) -> None:
    typer.echo(f"Entry ID         : {e['id']}")
    typer.echo(f"SPIFFE ID        : {e['spiffe_id']}")
    typer.echo(f"Parent ID        : {e['parent_id']}")
    typer.echo(f"Revision         : {e['revision']}")
    typer.echo(f"X509-SVID TTL    : {e['x509_svid_ttl'] or 'default'}")
    typer.echo(f"JWT-SVID TTL     : {e['jwt_svid_ttl'] or 'default'}")
    for s in e["selectors"]:
        typer.echo(f"Selector         : {s}")
    for d in e["dns_names"]:
        typer.echo(f"DNS name         : {d}")
    for t in e["federates_with"]:
        typer.echo(f"FederatesWith    : {t}")
    if e["hint"]:
        typer.echo(f"Hint             : {e['hint']}")
    if e["admin"]:
        typer.echo("Admin            : true")
    if e["downstream"]:
        typer.echo("Downstream       : true")
    if e["expires_at"]:
        typer.echo(f"Expires at       : {e['expires_at']}")
    typer.echo("")


SelectorOpt = Annotated[list[str], typer.Option("--selector", "-s", help="type:value, repeatable")]


@entry_app.command("create")
def entry_create(
    spiffe_id: Annotated[str, typer.Option(help="The workload's SPIFFE ID.")],
    parent_id: Annotated[str, typer.Option(help="The agent (or node alias) it runs under.")],
    selector: SelectorOpt,
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    x509_ttl: Annotated[int, typer.Option("--x509-ttl", help="Seconds; 0 = default")] = 0,
    jwt_ttl: Annotated[int, typer.Option("--jwt-ttl", help="Seconds; 0 = default")] = 0,
    dns: Annotated[list[str] | None, typer.Option("--dns", help="DNS SAN, repeatable")] = None,
    hint: Annotated[str, typer.Option()] = "",
    admin: Annotated[
        bool, typer.Option("--admin", help="May call the admin API over mTLS")
    ] = False,
    downstream: Annotated[bool, typer.Option("--downstream")] = False,
    federates_with: Annotated[list[str] | None, typer.Option("--federates-with")] = None,
    expires_at: Annotated[str | None, typer.Option(help="RFC 3339 with zone")] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Register a workload."""
    body = _entry_body(
        spiffe_id,
        parent_id,
        selector,
        x509_ttl,
        jwt_ttl,
        dns or [],
        hint,
        admin,
        downstream,
        federates_with or [],
        _rfc3339(expires_at, "--expires-at"),
    )
    entry = _call(socket, "POST", "/v1/entries", json=body)
    _print_json(entry) if output == Output.json else _print_entry(entry)


@entry_app.command("list")
def entry_list(
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    spiffe_id: Annotated[str | None, typer.Option()] = None,
    parent_id: Annotated[str | None, typer.Option()] = None,
    selector: Annotated[str | None, typer.Option()] = None,
    output: OutputOpt = Output.text,
) -> None:
    """List entries, optionally filtered."""
    params = {
        k: v
        for k, v in {"spiffe_id": spiffe_id, "parent_id": parent_id, "selector": selector}.items()
        if v
    }
    entries = _call(socket, "GET", "/v1/entries", params=params)
    if output == Output.json:
        _print_json(entries)
        return
    typer.echo(f"Found {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        _print_entry(e)


@entry_app.command("show")
def entry_show(
    entry_id: Annotated[str, typer.Option("--id", help="Entry ID.")],
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    output: OutputOpt = Output.text,
) -> None:
    """Show one entry."""
    entry = _call(socket, "GET", f"/v1/entries/{entry_id}")
    _print_json(entry) if output == Output.json else _print_entry(entry)


@entry_app.command("update")
def entry_update(
    entry_id: Annotated[str, typer.Option("--id", help="Entry ID.")],
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    spiffe_id: Annotated[str | None, typer.Option()] = None,
    parent_id: Annotated[str | None, typer.Option()] = None,
    selector: Annotated[list[str] | None, typer.Option("--selector", "-s")] = None,
    x509_ttl: Annotated[int | None, typer.Option("--x509-ttl")] = None,
    jwt_ttl: Annotated[int | None, typer.Option("--jwt-ttl")] = None,
    dns: Annotated[list[str] | None, typer.Option("--dns")] = None,
    hint: Annotated[str | None, typer.Option()] = None,
    admin: Annotated[bool | None, typer.Option("--admin/--no-admin")] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Change an entry; fields not given keep their value."""
    current = _call(socket, "GET", f"/v1/entries/{entry_id}")
    changes = {
        "spiffe_id": spiffe_id,
        "parent_id": parent_id,
        "selectors": selector,
        "x509_svid_ttl": x509_ttl,
        "jwt_svid_ttl": jwt_ttl,
        "dns_names": dns,
        "hint": hint,
        "admin": admin,
    }
    keep = (
        "spiffe_id",
        "parent_id",
        "selectors",
        "x509_svid_ttl",
        "jwt_svid_ttl",
        "dns_names",
        "hint",
        "admin",
        "downstream",
        "federates_with",
        "expires_at",
    )
    body = {k: current[k] for k in keep}
    body.update({k: v for k, v in changes.items() if v is not None})
    entry = _call(socket, "PUT", f"/v1/entries/{entry_id}", json=body)
    _print_json(entry) if output == Output.json else _print_entry(entry)


@entry_app.command("delete")
def entry_delete(
    entry_id: Annotated[str, typer.Option("--id", help="Entry ID.")],
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
) -> None:
    """Delete an entry."""
    _call(socket, "DELETE", f"/v1/entries/{entry_id}")
    typer.echo(f"Deleted entry {entry_id}")


# -- tokens ---------------------------------------------------------------------------------
@token_app.command("generate")
def token_generate(
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    spiffe_id: Annotated[
        str | None, typer.Option(help="Alias ID the agent is also known by.")
    ] = None,
    ttl: Annotated[int, typer.Option(help="Seconds.")] = 600,
    output: OutputOpt = Output.text,
) -> None:
    """Generate a single-use join token (the token is the last word printed)."""
    token = _call(socket, "POST", "/v1/tokens", json={"spiffe_id": spiffe_id, "ttl": ttl})
    if output == Output.json:
        _print_json(token)
        return
    typer.echo(f"Agent ID: {token['agent_id']}")
    if token["spiffe_id"]:
        typer.echo(f"Alias ID: {token['spiffe_id']}")
    typer.echo(f"Expires:  {token['expires_at']}")
    typer.echo(f"Token: {token['token']}")


# -- bundles --------------------------------------------------------------------------------
class BundleFormat(StrEnum):
    pem = "pem"
    spiffe = "spiffe"


@bundle_app.command("show")
def bundle_show(
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    fmt: Annotated[BundleFormat, typer.Option("--format")] = BundleFormat.pem,
) -> None:
    """Print this trust domain's bundle."""
    data = _call(socket, "GET", "/v1/bundle", params={"format": fmt.value})
    typer.echo(json.dumps(data, indent=2) if isinstance(data, dict) else data.rstrip())


@bundle_app.command("list")
def bundle_list(socket: SocketOpt = DEFAULT_ADMIN_SOCKET, output: OutputOpt = Output.text) -> None:
    """List federated bundles."""
    bundles = _call(socket, "GET", "/v1/bundles")
    if output == Output.json:
        _print_json([{**b, "bundle": json.loads(b["bundle"])} for b in bundles])
        return
    typer.echo(f"Found {len(bundles)} federated bundle{'s' if len(bundles) != 1 else ''}")
    for b in bundles:
        keys = json.loads(b["bundle"]).get("keys", [])
        typer.echo(f"{b['trust_domain']}: {len(keys)} keys")


@bundle_app.command("set")
def bundle_set(
    trust_domain: Annotated[str, typer.Option("--trust-domain", "--id")],
    file: Annotated[Path, typer.Option("--file", "--path", help="Bundle file; - for stdin")],
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    fmt: Annotated[BundleFormat, typer.Option("--format")] = BundleFormat.spiffe,
    endpoint_url: Annotated[
        str | None, typer.Option(help="https:// bundle endpoint to refresh from.")
    ] = None,
    endpoint_spiffe_id: Annotated[
        str | None,
        typer.Option(help="The endpoint's SPIFFE ID (https_spiffe); omit for https_web."),
    ] = None,
) -> None:
    """Set (create or replace) the bundle of a federated trust domain."""
    try:
        data = sys.stdin.read() if str(file) == "-" else file.read_text()
    except OSError as err:
        fail(f"cannot read {file}: {err.strerror}")
    body = {
        "format": fmt.value,
        "data": data,
        "endpoint_url": endpoint_url,
        "endpoint_spiffe_id": endpoint_spiffe_id,
    }
    _call(socket, "PUT", f"/v1/bundles/{trust_domain}", json=body)
    typer.echo(f"Bundle set for {trust_domain}")


@bundle_app.command("refresh")
def bundle_refresh(
    trust_domain: Annotated[str, typer.Option("--trust-domain", "--id")],
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
) -> None:
    """Fetch a federated bundle from its endpoint now."""
    out = _call(socket, "POST", f"/v1/bundles/{trust_domain}/refresh")
    state = "changed" if out["changed"] else "unchanged"
    typer.echo(f"Bundle for {trust_domain} refreshed: {state}, sequence {out['sequence']}")


@bundle_app.command("delete")
def bundle_delete(
    trust_domain: Annotated[str, typer.Option("--trust-domain", "--id")],
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
) -> None:
    """Delete a federated bundle."""
    _call(socket, "DELETE", f"/v1/bundles/{trust_domain}")
    typer.echo(f"Bundle deleted for {trust_domain}")


# -- authorities ----------------------------------------------------------------------------
def _authority_group(kind: str) -> typer.Typer:
    group = typer.Typer(help=f"{kind.upper()} authorities.", no_args_is_help=True)

    def _print(a: dict[str, Any]) -> None:
        tainted = " (tainted)" if a["tainted"] else ""
        typer.echo(
            f"{a['status']:<9}{a['id']}  not_after {a['not_after']}  {a['key_type']}"
            f"{'  kid ' + a['kid'] if a['kid'] else ''}{tainted}"
        )

    @group.command("show")
    def show(socket: SocketOpt = DEFAULT_ADMIN_SOCKET, output: OutputOpt = Output.text) -> None:
        """List authorities with their state."""
        items = _call(socket, "GET", f"/v1/authorities/{kind}")
        if output == Output.json:
            _print_json(items)
            return
        for a in items:
            _print(a)

    def _show(a: dict[str, Any], output: Output) -> None:
        _print_json(a) if output == Output.json else _print(a)

    @group.command("prepare")
    def prepare(socket: SocketOpt = DEFAULT_ADMIN_SOCKET, output: OutputOpt = Output.text) -> None:
        """Prepare the next authority (published in the bundle, not yet signing)."""
        _show(_call(socket, "POST", f"/v1/authorities/{kind}/prepare"), output)

    def _transition(action: str, help_text: str) -> None:
        """``meshid authority KIND ACTION --authority-id ID``: one POST, the authority shown."""

        def command(
            authority_id: Annotated[str, typer.Option("--authority-id")],
            socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
            output: OutputOpt = Output.text,
        ) -> None:
            _show(_call(socket, "POST", f"/v1/authorities/{kind}/{authority_id}/{action}"), output)

        command.__doc__ = help_text
        group.command(action)(command)

    _transition("activate", "Make the prepared authority the signer.")
    _transition("taint", "Mark an old authority: every SVID it signed must be replaced now.")

    @group.command("revoke")
    def revoke(
        authority_id: Annotated[str, typer.Option("--authority-id")],
        socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
        force: Annotated[bool, typer.Option("--force")] = False,
        output: OutputOpt = Output.text,
    ) -> None:
        """Remove a tainted authority from the bundle."""
        path = f"/v1/authorities/{kind}/{authority_id}/revoke"
        _show(_call(socket, "POST", path, params={"force": str(force).lower()}), output)

    return group


authority_app.add_typer(_authority_group("x509"), name="x509")
authority_app.add_typer(_authority_group("jwt"), name="jwt")


# -- minting --------------------------------------------------------------------------------
@x509_app.command("mint")
def x509_mint(
    spiffe_id: Annotated[str, typer.Option()],
    write: Annotated[
        Path, typer.Option("--write", help="Folder for svid.pem, svid.key, bundle.pem")
    ],
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    ttl: Annotated[int, typer.Option(help="Seconds; 0 = default")] = 0,
    dns: Annotated[list[str] | None, typer.Option("--dns")] = None,
    key_type: Annotated[KeyType, typer.Option()] = KeyType.EC_P256,
) -> None:
    """Mint an X.509-SVID: the key is made here and never leaves this machine."""
    key = generate_key(key_type)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    body = {
        "spiffe_id": spiffe_id,
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "ttl": ttl,
        "dns_names": dns or [],
    }
    out = _call(socket, "POST", "/v1/x509/mint", json=body)
    try:
        write.mkdir(parents=True, exist_ok=True)
        (write / "svid.pem").write_text(out["chain_pem"])
        write_private_file(write / "svid.key", private_key_pem(key))
        (write / "bundle.pem").write_text(out["bundle_pem"])
    except OSError as err:
        fail(f"cannot write to {write}: {err.strerror}")
    typer.echo(f"X509-SVID {out['spiffe_id']} serial {out['serial']} expires {out['not_after']}")
    typer.echo(f"Wrote {write / 'svid.pem'}, {write / 'svid.key'}, {write / 'bundle.pem'}")


@jwt_app.command("mint")
def jwt_mint(
    spiffe_id: Annotated[str, typer.Option()],
    audience: Annotated[list[str], typer.Option("--audience", "-a", help="Repeatable.")],
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    ttl: Annotated[int, typer.Option(help="Seconds; 0 = default")] = 0,
) -> None:
    """Mint a JWT-SVID and print it."""
    out = _call(
        socket,
        "POST",
        "/v1/jwt/mint",
        json={"spiffe_id": spiffe_id, "audience": audience, "ttl": ttl},
    )
    typer.echo(out["token"])


# -- audit ----------------------------------------------------------------------------------
@audit_app.command("list")
def audit_list(
    socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
    spiffe_id: Annotated[str | None, typer.Option()] = None,
    kind: Annotated[str | None, typer.Option(help="e.g. entry.created, x509_svid.issued")] = None,
    since: Annotated[
        str | None, typer.Option(help="RFC 3339 with zone, e.g. 2026-01-01T00:00Z")
    ] = None,
    limit: Annotated[int, typer.Option()] = 1000,
    output: OutputOpt = Output.text,
) -> None:
    """List audit events, oldest first."""
    params: dict[str, Any] = {"limit": limit}
    if spiffe_id:
        params["spiffe_id"] = spiffe_id
    if kind:
        params["kind"] = kind
    since_at = _rfc3339(since, "--since")
    if since_at is not None:
        params["since"] = since_at.isoformat()
    events = _call(socket, "GET", "/v1/audit", params=params)
    if output == Output.json:
        _print_json(events)
        return
    for ev in events:
        details = json.dumps(ev["details"], sort_keys=True, separators=(",", ":"))
        sid = f" {ev['spiffe_id']}" if ev["spiffe_id"] else ""
        typer.echo(f"{ev['seq']:>6} {ev['at']} {ev['kind']:<20} {ev['actor']}{sid} {details}")


@audit_app.command("verify")
def audit_verify(socket: SocketOpt = DEFAULT_ADMIN_SOCKET, output: OutputOpt = Output.text) -> None:
    """Walk the hash chain; exit 1 naming the first event altered or removed."""
    verdict = _call(socket, "POST", "/v1/audit/verify")
    if output == Output.json:
        _print_json(verdict)
    if not verdict["ok"]:
        fail(f"audit chain broken: {verdict['reason']}")
    if output == Output.text:
        typer.echo(f"Audit chain intact: {verdict['events_checked']} events verified.")


# -- demo -----------------------------------------------------------------------------------
@app.command("demo")
def demo(
    keep: Annotated[bool, typer.Option(help="Leave the server running until Ctrl-C.")] = False,
) -> None:
    """Start a server in a temporary folder and walk through registration, minting and audit."""
    from .demo import run_demo

    raise typer.Exit(run_demo(keep=keep))
