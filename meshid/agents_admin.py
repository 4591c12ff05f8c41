"""``meshid agent list|show|ban|evict``: attested agents, through the server's admin API.

``register(agent_app)`` adds the commands to the ``agent`` group (which also holds ``agent run``).
Like every admin command: ``--socket`` (env ``MESHID_SERVER_SOCKET``), ``-o json`` for scripts,
one line on stderr and exit 1 on failure.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import typer

from ca.config import DEFAULT_ADMIN_SOCKET, DEFAULT_SOCKET_ENV


class Output(StrEnum):
    text = "text"
    json = "json"


SocketOpt = Annotated[
    Path, typer.Option("--socket", envvar=DEFAULT_SOCKET_ENV, help="The server's admin socket.")
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="text or json")]
SpiffeIdOpt = Annotated[str, typer.Option("--spiffe-id", help="The agent's SPIFFE ID.")]


def _fail(message: str) -> NoReturn:
    typer.echo(f"meshid: {message}", err=True)
    raise typer.Exit(1)


def _call(socket: Path, method: str, path: str) -> Any:
    from .client import AdminClient, AdminError  # httpx: only when a command runs

    try:
        with AdminClient(socket) as client:
            return client.json(method, path)
    except AdminError as err:
        _fail(str(err))


def _path(spiffe_id: str, action: str = "") -> str:
    return f"/v1/agents/{quote(spiffe_id, safe='')}{action}"


def _print_agent(a: dict[str, Any]) -> None:
    typer.echo(f"SPIFFE ID        : {a['spiffe_id']}")
    typer.echo(f"Attestation type : {a['attestation_type']}")
    typer.echo(f"Expiration time  : {a['expires_at']}")
    typer.echo(f"Serial number    : {a['serial']}")
    typer.echo(f"Banned           : {str(a['banned']).lower()}")
    typer.echo(f"Attested at      : {a['attested_at']}")
    typer.echo(f"Last seen        : {a['last_seen']}")
    for alias in a["aliases"]:
        typer.echo(f"Alias            : {alias}")
    for selector in a["selectors"]:
        typer.echo(f"Selector         : {selector}")
    typer.echo("")


def register(agent_app: typer.Typer) -> None:
    """Add ``list``, ``show``, ``ban`` and ``evict`` to ``agent_app``."""

    @agent_app.command("list")
    def agent_list(
        socket: SocketOpt = DEFAULT_ADMIN_SOCKET, output: OutputOpt = Output.text
    ) -> None:
        """List attested agents."""
        agents = _call(socket, "GET", "/v1/agents")
        if output == Output.json:
            typer.echo(json.dumps(agents, indent=2, sort_keys=True))
            return
        typer.echo(f"Found {len(agents)} attested agent{'' if len(agents) == 1 else 's'}")
        typer.echo("")
        for a in agents:
            _print_agent(a)

    @agent_app.command("show")
    def agent_show(
        spiffe_id: SpiffeIdOpt,
        socket: SocketOpt = DEFAULT_ADMIN_SOCKET,
        output: OutputOpt = Output.text,
    ) -> None:
        """Show one attested agent."""
        agent = _call(socket, "GET", _path(spiffe_id))
        if output == Output.json:
            typer.echo(json.dumps(agent, indent=2, sort_keys=True))
        else:
            _print_agent(agent)

    @agent_app.command("ban")
    def agent_ban(spiffe_id: SpiffeIdOpt, socket: SocketOpt = DEFAULT_ADMIN_SOCKET) -> None:
        """Ban an agent: it can no longer renew, sync or sign (evict it to let it attest again)."""
        _call(socket, "POST", _path(spiffe_id, "/ban"))
        typer.echo(f"Agent banned: {spiffe_id}")

    @agent_app.command("evict")
    def agent_evict(spiffe_id: SpiffeIdOpt, socket: SocketOpt = DEFAULT_ADMIN_SOCKET) -> None:
        """Delete an agent's record: it must attest again."""
        _call(socket, "POST", _path(spiffe_id, "/evict"))
        typer.echo(f"Agent evicted: {spiffe_id}")
