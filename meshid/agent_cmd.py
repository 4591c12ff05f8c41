"""``meshid agent ...`` and ``meshid svid fetch ...``: run the node agent, check it, and fetch
SVIDs from the Workload API with the real py-spiffe client (as any workload would)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from .agents_admin import register as register_agent_admin
from .logs import setup_logging

agent_app = typer.Typer(help="Run and manage node agents.", no_args_is_help=True)
svid_app = typer.Typer(help="Fetch SVIDs from the Workload API.", no_args_is_help=True)
fetch_app = typer.Typer(help="Fetch X.509 or JWT SVIDs.", no_args_is_help=True)
svid_app.add_typer(fetch_app, name="fetch")
register_agent_admin(agent_app)  # agent list|show|ban|evict, over the server's admin API

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"


def _fail(message: str) -> None:
    typer.echo(f"meshid: {message}", err=True)
    raise typer.Exit(1)


def _endpoint(socket: Path | None) -> str:
    """The Workload API address: --socket, else SPIFFE_ENDPOINT_SOCKET, else the default."""
    from node_agent.config import DEFAULT_SOCKET

    if socket is not None:
        return f"unix://{socket.absolute()}"
    return os.environ.get(ENDPOINT_ENV) or f"unix://{DEFAULT_SOCKET}"


WorkloadSocket = Annotated[
    Path | None,
    typer.Option(
        "--socket", help=f"Workload API socket (default: ${ENDPOINT_ENV} or the agent's)."
    ),
]


@agent_app.command("run")
def agent_run(
    server: Annotated[
        list[str] | None, typer.Option("--server", help="HOST:PORT; repeatable")
    ] = None,
    trust_domain: Annotated[str | None, typer.Option()] = None,
    trust_bundle: Annotated[
        Path | None, typer.Option(help="PEM bundle to trust the server")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option()] = None,
    socket: Annotated[
        Path | None, typer.Option("--socket", help="Workload API socket to serve")
    ] = None,
    join_token: Annotated[str | None, typer.Option(envvar="MESHID_JOIN_TOKEN")] = None,
    x509pop_cert: Annotated[Path | None, typer.Option()] = None,
    x509pop_key: Annotated[Path | None, typer.Option()] = None,
    config: Annotated[Path | None, typer.Option(help="YAML configuration file")] = None,
    persist_svid_cache: Annotated[
        bool | None,
        typer.Option(
            "--persist-svid-cache/--no-persist-svid-cache",
            help="Keep workload SVIDs and keys on disk (0600) to serve through a restart "
            "while no server answers (default: memory only).",
        ),
    ] = None,
) -> None:
    """Run the node agent in the foreground until SIGTERM."""
    from node_agent.agent import Agent
    from node_agent.config import load_agent_config
    from node_agent.errors import AgentError

    try:
        cfg = load_agent_config(
            config,
            {
                "servers": server,
                "trust_domain": trust_domain,
                "trust_bundle": trust_bundle,
                "data_dir": data_dir,
                "socket": socket,
                "join_token": join_token,
                "x509pop_cert": x509pop_cert,
                "x509pop_key": x509pop_key,
                "persist_svid_cache": persist_svid_cache,
            },
        )
    except AgentError as err:
        _fail(str(err))
    setup_logging(cfg.log_level)

    async def main() -> None:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    try:
        asyncio.run(main())
    except AgentError as err:
        _fail(str(err))


@agent_app.command("healthcheck")
def agent_healthcheck(socket: WorkloadSocket = None) -> None:
    """Exit 0 when the agent's Workload API answers and is ready."""
    import grpc

    from workload_api._messages import X509BundlesRequest, X509BundlesResponse

    target = _endpoint(socket)
    channel = grpc.insecure_channel(target)
    try:
        call = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509Bundles",
            request_serializer=X509BundlesRequest.SerializeToString,
            response_deserializer=X509BundlesResponse.FromString,
        )(X509BundlesRequest(), metadata=[("workload.spiffe.io", "true")], timeout=5)
        next(iter(call))
        call.cancel()
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else None
        if code != grpc.StatusCode.PERMISSION_DENIED:  # answered: alive, we just have no entry
            _fail(f"agent not healthy at {target}: {code.name if code else err}")
    finally:
        channel.close()
    typer.echo("Agent is healthy.")


@fetch_app.command("x509")
def fetch_x509(
    socket: WorkloadSocket = None,
    write: Annotated[
        Path | None, typer.Option("--write", help="Write svid.N.pem/.key, bundle.pem")
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="text or json")] = "text",
) -> None:
    """Fetch this process's X.509-SVIDs as a workload would (py-spiffe client)."""
    from cryptography.hazmat.primitives import serialization
    from spiffe import WorkloadApiClient
    from spiffe.errors import PySpiffeError

    try:
        with WorkloadApiClient(_endpoint(socket)) as client:
            context = client.fetch_x509_context(timeout=10)
    except PySpiffeError as err:
        _fail(f"cannot fetch X.509-SVIDs: {err}")
    rows = []
    for i, svid in enumerate(context.x509_svids):
        rows.append(
            {
                "spiffe_id": str(svid.spiffe_id),
                "not_after": svid.leaf.not_valid_after_utc.isoformat(),
                "serial": f"{svid.leaf.serial_number:#x}",
            }
        )
        if write is not None:
            write.mkdir(parents=True, exist_ok=True)
            svid.save(
                str(write / f"svid.{i}.pem"),
                str(write / f"svid.{i}.key"),
                serialization.Encoding.PEM,
            )
            os.chmod(write / f"svid.{i}.key", 0o600)
    if write is not None:
        bundles = context.x509_bundle_set._bundles
        with (write / "bundle.pem").open("wb") as f:
            for bundle in bundles.values():
                for cert in bundle.x509_authorities:
                    f.write(cert.public_bytes(serialization.Encoding.PEM))
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(
            f"SPIFFE ID: {row['spiffe_id']}  expires {row['not_after']}  serial {row['serial']}"
        )
    if write is not None:
        typer.echo(f"Wrote {len(rows)} SVID(s) and bundle.pem to {write}")


@fetch_app.command("jwt")
def fetch_jwt(
    audience: Annotated[list[str], typer.Option("--audience", "-a")],
    socket: WorkloadSocket = None,
    spiffe_id: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Fetch a JWT-SVID for the audience and print it."""
    from spiffe import SpiffeId, WorkloadApiClient
    from spiffe.errors import PySpiffeError

    try:
        with WorkloadApiClient(_endpoint(socket)) as client:
            svid = client.fetch_jwt_svid(
                audience=set(audience), subject=SpiffeId(spiffe_id) if spiffe_id else None
            )
    except PySpiffeError as err:
        _fail(f"cannot fetch a JWT-SVID: {err}")
    typer.echo(svid.token)
