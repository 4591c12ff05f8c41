"""``meshid policy``: authorization policy commands.

Owns the ``policy`` command group. ``check`` reads policy files, normalizes the request path as
the proxy does (``tls_proxy.path.normalize_path``), builds the ``authz.Request`` the proxy would
build, asks ``authz.Engine`` for the verdict and prints it with its explanation. It must not
decide anything itself: parsing, matching and every reason come from ``authz``; this module
reads files, checks option values, prints and picks the exit status.

Exit status of ``check``: 0 allowed, 2 denied, 1 error, so ``meshid policy check ... && deploy``
works. Typer and click exit 2 on a usage error; ``check`` turns that into 1 so that 2 always
means "denied". A failed check prints one line on stderr and nothing on stdout.

``--socket`` adds the policies stored on the server (read through its admin API). A JWT-SVID
the proxy would have validated is given as ``--request-principal`` and ``--claims``.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from spiffe import SpiffeId
from spiffe.errors import PySpiffeError
from typer.core import TyperCommand
from typer.exceptions import TyperException

from authz import (
    DEFAULT_POSTURE,
    Engine,
    Policy,
    PolicyError,
    PolicyWarning,
    Posture,
    Request,
    Verdict,
    parse_policies,
    parse_policy_dict,
)
from ca.config import DEFAULT_ADMIN_SOCKET
from tls_proxy.path import EncodedSlashes, PathError, normalize_path

EXIT_ALLOWED = 0
EXIT_ERROR = 1  # the same status every other meshid command uses for a failure
EXIT_DENIED = 2  # distinct from errors so scripts can tell "denied" from "could not check"
STDIN = "-"
STDIN_SOURCE = "<stdin>"
NO_SOURCE = "none"  # --source none: a peer without an SVID (plain TCP or one-way TLS)
DEFAULT_METHOD = "GET"  # every HTTP request has a method and a path; check GET / unless told
DEFAULT_PATH = "/"
MAX_PORT = 65535  # TCP port numbers are 16-bit (RFC 9293 §3.1)
HEADER_SEPARATOR = ","  # a repeated header is joined with "," (RFC 9110 §5.3), as Request wants
# RFC 9110 §5.6.2: a header field name is a token.
TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")

policy_app = typer.Typer(help="Authorization policies.", no_args_is_help=True)


class Output(StrEnum):
    text = "text"
    json = "json"


class SlashMode(StrEnum):
    """The proxy's ``encoded_slashes`` setting (see docs/policy.md, Path normalization)."""

    reject = "reject"
    decode = "decode"
    keep = "keep"


_SLASH_MODES: dict[SlashMode, EncodedSlashes] = {
    SlashMode.reject: "reject",
    SlashMode.decode: "decode",
    SlashMode.keep: "keep",
}


class _CheckCommand(TyperCommand):
    """A command whose usage errors exit 1, keeping exit status 2 for "denied"."""

    # ``ctx`` is typer's vendored click Context, which typer does not export under a public name.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except TyperException as err:  # click's UsageError and BadParameter derive from it
            err.exit_code = EXIT_ERROR
            raise


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit 1 (as ``meshid.commands.fail``, which this module cannot import)."""
    typer.echo(f"meshid: {' '.join(message.splitlines())}", err=True)
    raise typer.Exit(EXIT_ERROR)


# -- reading the inputs -----------------------------------------------------------------------


def _read_policies(files: list[Path]) -> tuple[list[Policy], list[PolicyWarning]]:
    """Parse every file; policy names must be unique across all of them, as in one file."""
    policies: list[Policy] = []
    warnings: list[PolicyWarning] = []
    seen: dict[str, str] = {}
    for file in files:
        source = STDIN_SOURCE if str(file) == STDIN else str(file)
        try:
            text = sys.stdin.read() if str(file) == STDIN else file.read_text(encoding="utf-8")
        except OSError as err:
            _fail(f"cannot read {file}: {err.strerror}")
        except UnicodeDecodeError as err:
            _fail(f"{source}: expected UTF-8 text: {err.reason} at byte {err.start}")
        try:
            result = parse_policies(text, source)
        except PolicyError as err:
            _fail(str(err))
        for policy in result.policies:
            if policy.name in seen:
                _fail(
                    str(
                        PolicyError(
                            source,
                            "metadata.name",
                            f"expected a unique name; {policy.name!r} is already used in "
                            f"{seen[policy.name]}",
                        )
                    )
                )
            seen[policy.name] = source
        policies.extend(result.policies)
        warnings.extend(result.warnings)
    return policies, warnings


def _stored_policies(socket: Path) -> list[Policy]:
    """The policies the server stores, parsed as the proxies will parse them."""
    from .client import AdminClient, AdminError

    try:
        with AdminClient(socket) as client:
            stored = client.json("GET", "/v1/policies")
    except AdminError as err:
        _fail(str(err))
    policies: list[Policy] = []
    for row in stored:
        try:
            parsed = parse_policy_dict(row["document"], f"stored policy {row['name']}")
            policies.extend(parsed.policies)
        except PolicyError as err:
            _fail(str(err))
    return policies


def _spiffe_id(value: str, option: str) -> SpiffeId:
    try:
        spiffe_id = SpiffeId(value)
    except PySpiffeError as err:
        _fail(f"{option}: expected a SPIFFE ID like spiffe://example.org/web: {err}")
    if str(spiffe_id) != value:
        _fail(
            f"{option}: {value!r} is not in canonical form (expected {str(spiffe_id)!r}); "
            "SPIFFE-ID §2.1 requires a lower-case scheme and trust domain"
        )
    return spiffe_id


def _headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in values:
        name, equals, value = item.partition("=")
        name = name.strip().lower()
        if not equals or not name or not set(name) <= TOKEN_CHARS:
            _fail(f"--header: expected NAME=VALUE with a header name (RFC 9110 §5.1), got {item!r}")
        value = value.strip()
        headers[name] = f"{headers[name]}{HEADER_SEPARATOR}{value}" if name in headers else value
    return headers


def _jwt(principal: str | None, claims: str | None) -> dict[str, Any]:
    """The ``Request`` fields of a validated JWT-SVID: its ``sub`` and its claims."""
    if principal is None:
        if claims is not None:
            _fail("--claims: give --request-principal too (the sub of the JWT-SVID)")
        return {}
    sub = str(_spiffe_id(principal, "--request-principal"))
    parsed: Any = {}
    if claims is not None:
        try:
            parsed = json.loads(claims)
        except json.JSONDecodeError as err:
            _fail(f"--claims: expected a JSON object ({err})")
        if not isinstance(parsed, dict):
            _fail(f"--claims: expected a JSON object, got {type(parsed).__name__}")
    return {"request_principal": sub, "claims": {**parsed, "sub": sub}}


def _normalized(raw: str, encoded_slashes: EncodedSlashes) -> str:
    try:
        return normalize_path(raw, encoded_slashes=encoded_slashes)
    except PathError as err:
        _fail(f"--path {raw!r}: the proxy would answer 400 Bad Request before authorization: {err}")


# -- printing -----------------------------------------------------------------------------------


def _headline(verdict: Verdict) -> str:
    word = "ALLOW" if verdict.allowed else "DENY"
    if verdict.policy is not None:
        return f"{word} by policy {verdict.policy} rule {verdict.rule}"
    return f"{word}: {verdict.reason}"


def _describe_request(request: Request) -> list[str]:
    source = request.source_principal or "an unauthenticated peer (no SVID)"
    if request.source_address is not None:
        source = f"{source} at {request.source_address}"
    port = "" if request.destination_port is None else f" port {request.destination_port}"
    if request.is_l4:
        lines = [f"request: TCP connection to {request.destination}{port}"]
    else:
        host = "" if request.host is None else f" host {request.host}"
        lines = [f"request: {request.method} {request.path}{host} to {request.destination}{port}"]
        lines += [f"header:  {name}: {value}" for name, value in request.headers.items()]
    lines.append(f"source:  {source}")
    if request.request_principal is not None:
        lines.append(f"jwt:     {request.request_principal} (validated JWT-SVID)")
    return lines


def _text_report(
    verdict: Verdict,
    request: Request,
    raw_path: str | None,
    warnings: list[PolicyWarning],
) -> list[str]:
    details = _describe_request(request)
    if raw_path is not None and raw_path != request.path:
        details.append(
            f"path:    {raw_path} is normalized to {request.path}; the proxy forwards that path "
            "and policies are matched against it"
        )
    for result in verdict.dry_run:
        matched = "no rule matched" if result.rule is None else f"rule {result.rule} matched"
        would = "allow" if result.allowed else "deny"
        details.append(
            f"dry-run: {result.policy} ({result.action}, {matched}) would {would}: {result.reason}"
        )
    details += [f"audit:   {match.policy} rule {match.rule} matched" for match in verdict.audit]
    details += [f"warning: {warning}" for warning in warnings]
    return [_headline(verdict), *(f"  {line}" for line in details)]


def _json_report(
    verdict: Verdict, request: Request, warnings: list[PolicyWarning]
) -> dict[str, Any]:
    report: dict[str, Any] = verdict.as_dict()  # decision, policy, rule, reason first
    report["warnings"] = [
        {"source": w.source, "line": w.line, "path": w.path, "message": w.message} for w in warnings
    ]
    report["normalized_path"] = None if request.is_l4 else request.path
    report["request"] = {
        "source": request.source_principal,
        "source_ip": request.source_address,
        "destination": request.destination,
        "port": request.destination_port,
        "l4": request.is_l4,
        "method": None if request.is_l4 else request.method,
        "path": None if request.is_l4 else request.path,
        "host": None if request.is_l4 else request.host,
        "headers": {} if request.is_l4 else dict(request.headers),
        "request_principal": request.request_principal,
    }
    return report


# -- the command --------------------------------------------------------------------------------


@policy_app.command("check", cls=_CheckCommand)
def check(
    destination: Annotated[str, typer.Option(help="SPIFFE ID of the workload the proxy protects.")],
    file: Annotated[
        list[Path] | None,
        typer.Option(
            "--file", "-f", help="Policy file (YAML, --- between documents); repeatable; - = stdin."
        ),
    ] = None,
    socket: Annotated[
        Path | None,
        typer.Option(
            "--socket",
            help="Check against the policies stored on the server (its admin socket).",
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(help="SPIFFE ID of the verified peer; omit or 'none' for a peer without one."),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help=f"HTTP method (default {DEFAULT_METHOD}).")
    ] = None,
    path: Annotated[
        str | None,
        typer.Option(
            help=f"Request target, normalized as the proxy does (default {DEFAULT_PATH})."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help=":authority or Host; omitted = none.")] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="NAME=VALUE; repeatable.")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_PORT, help="Destination port the proxy accepted on."),
    ] = None,
    source_ip: Annotated[str | None, typer.Option(help="The peer's IP address.")] = None,
    request_principal: Annotated[
        str | None,
        typer.Option(help="The sub of a JWT-SVID the proxy validated (Authorization: Bearer)."),
    ] = None,
    claims: Annotated[
        str | None,
        typer.Option(help='That JWT-SVID\'s claims as a JSON object, e.g. \'{"aud": ["x"]}\'.'),
    ] = None,
    l4: Annotated[
        bool, typer.Option("--l4", help="A TCP connection: no method, path, host or headers.")
    ] = False,
    posture: Annotated[
        Posture,
        typer.Option(help="Default posture of the destination (when no ALLOW policy selects it)."),
    ] = DEFAULT_POSTURE,
    trust_domain: Annotated[
        str | None,
        typer.Option(help="Our trust domain, for all-authenticated (default: the destination's)."),
    ] = None,
    federates_with: Annotated[
        list[str] | None,
        typer.Option(help="A federated trust domain all-authenticated admits; repeatable."),
    ] = None,
    encoded_slashes: Annotated[
        SlashMode, typer.Option(help="The proxy's handling of %2F, %5C and \\ in paths.")
    ] = SlashMode.reject,
    output: Annotated[Output, typer.Option("--output", "-o", help="text or json")] = Output.text,
) -> None:
    """Decide a request against policy files and explain the verdict.

    Exit status: 0 allowed, 2 denied, 1 error (bad policy file, refused path, bad option).

    So `meshid policy check ... && deploy` deploys only when the request is allowed.
    """
    if not file and socket is None:
        _fail("give --file (policy files) or --socket (the policies stored on the server)")
    policies, warnings = _read_policies(file or [])
    if socket is not None:
        policies.extend(_stored_policies(socket))
    dest_id = _spiffe_id(destination, "--destination")
    principal = None
    if source is not None and source != NO_SOURCE:
        principal = str(_spiffe_id(source, "--source"))
    if source_ip is not None:
        try:
            ipaddress.ip_address(source_ip)
        except ValueError:
            _fail(f"--source-ip: expected an IPv4 or IPv6 address, got {source_ip!r}")
    headers = _headers(header or [])
    raw_path: str | None = None
    if l4:
        given = [
            name
            for name, value in (("--method", method), ("--path", path), ("--host", host))
            if value is not None
        ] + (["--header"] if headers else [])
        given += [
            name
            for name, value in (("--request-principal", request_principal), ("--claims", claims))
            if value is not None
        ]
        if given:
            _fail(f"--l4 is a TCP connection without HTTP attributes; drop {', '.join(given)}")
        request = Request(
            destination=destination,
            source_principal=principal,
            source_address=source_ip,
            destination_port=port,
            is_l4=True,
        )
    else:
        raw_path = DEFAULT_PATH if path is None else path
        request = Request(
            destination=destination,
            source_principal=principal,
            source_address=source_ip,
            destination_port=port,
            method=DEFAULT_METHOD if method is None else method,
            host=host,
            path=_normalized(raw_path, _SLASH_MODES[encoded_slashes]),
            headers=headers,
            **_jwt(request_principal, claims),
        )
    try:
        engine = Engine.compile(
            policies,
            trust_domain=trust_domain or dest_id.trust_domain.name,
            federated_trust_domains=federates_with or (),
            default_posture=posture,
        )
    except PolicyError as err:
        if err.source == "engine":  # a setting, not a policy, broke a rule
            _fail(f"--trust-domain/--federates-with: {err.expected}")
        _fail(str(err))
    verdict = engine.evaluate(request)
    if output == Output.json:
        typer.echo(json.dumps(_json_report(verdict, request, warnings), indent=2))
    else:
        typer.echo("\n".join(_text_report(verdict, request, raw_path, warnings)))
    raise typer.Exit(EXIT_ALLOWED if verdict.allowed else EXIT_DENIED)


# -- the policies stored on the server ------------------------------------------------------

ServerSocket = Annotated[
    Path,
    typer.Option("--socket", envvar="MESHID_SERVER_SOCKET", help="The server's admin socket."),
]


def _admin(socket: Path, method: str, path: str, **kwargs: Any) -> Any:
    from .client import AdminClient, AdminError

    try:
        with AdminClient(socket) as client:
            response = client.request(method, path, **kwargs)
    except AdminError as err:
        _fail(str(err))
    return response.json() if response.content else None


@policy_app.command("apply")
def apply(
    file: Annotated[
        list[Path], typer.Option("--file", "-f", help="Policy file; repeatable; - = stdin.")
    ],
    socket: ServerSocket = DEFAULT_ADMIN_SOCKET,
) -> None:
    """Store policies on the server (create or replace by name). All of a file, or none of it."""
    for path in file:
        source = STDIN_SOURCE if str(path) == STDIN else str(path)
        try:
            text = sys.stdin.read() if str(path) == STDIN else path.read_text(encoding="utf-8")
        except OSError as err:
            _fail(f"cannot read {path}: {err.strerror}")
        result = _admin(socket, "POST", "/v1/policies", json={"text": text, "source": source})
        for warning in result["warnings"]:
            typer.echo(f"warning: {warning}", err=True)
        for applied in result["applied"]:
            state = "applied" if applied["changed"] else "unchanged"
            typer.echo(f"{applied['name']}: {state} (revision {applied['revision']})")


@policy_app.command("list")
def list_(
    socket: ServerSocket = DEFAULT_ADMIN_SOCKET,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.text,
) -> None:
    """List the policies stored on the server."""
    rows = _admin(socket, "GET", "/v1/policies")
    if output == Output.json:
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    typer.echo(f"Found {len(rows)} polic{'y' if len(rows) == 1 else 'ies'}")
    for row in rows:
        spec = row["document"].get("spec", {})
        typer.echo(
            f"{row['name']}  action {spec.get('action', 'ALLOW')}  "
            f"rules {len(spec.get('rules', []))}  revision {row['revision']}"
        )


@policy_app.command("show")
def show(
    name: Annotated[str, typer.Option("--name")],
    socket: ServerSocket = DEFAULT_ADMIN_SOCKET,
) -> None:
    """Show one stored policy as YAML."""
    import yaml

    row = _admin(socket, "GET", f"/v1/policies/{name}")
    typer.echo(yaml.safe_dump(row["document"], sort_keys=False).rstrip())


@policy_app.command("delete")
def delete(
    name: Annotated[str, typer.Option("--name")],
    socket: ServerSocket = DEFAULT_ADMIN_SOCKET,
) -> None:
    """Delete a stored policy."""
    _admin(socket, "DELETE", f"/v1/policies/{name}")
    typer.echo(f"Deleted policy {name}")
