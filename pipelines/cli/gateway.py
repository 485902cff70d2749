"""`gpuledger gateway keys add | list | revoke`: the metering gateway's API keys.

`add` prints the new key once, on stdout, and stores only its digest; `list` shows ids,
tenants and limits, never a secret; `revoke` stops a key at once (the gateway reloads
the file). `serve` runs the gateway: an OpenAI-compatible endpoint in front of the
configured Triton servers that writes one usage event per request to its spool and
forwards them to Kafka.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ingest.gateway.keys_file import add_key, load_keys, revoke_key
from ingest.settings import load_settings
from pipelines.cli.app import app, state

__all__ = ["gateway_app"]

gateway_app = typer.Typer(help="The metering gateway: serve, API keys.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: add, list, revoke.", no_args_is_help=True)
gateway_app.add_typer(keys_app, name="keys")
app.add_typer(gateway_app, name="gateway")
console = Console(stderr=True)


@keys_app.command("add")
def add_command(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="The tenant billed for the key's requests.")],
    rate: Annotated[
        float | None, typer.Option(min=0.001, help="Requests per second (unset: no limit).")
    ] = None,
    burst: Annotated[int, typer.Option(min=1, help="Requests at once above the rate.")] = 20,
    note: Annotated[str, typer.Option(help="What the key is for.")] = "",
) -> None:
    """Create a key for TENANT; the key is printed once and never stored."""
    settings = state(ctx).settings()
    key, record = add_key(
        settings.api_keys_path,
        tenant,
        datetime.now(UTC),
        rate_per_s=rate,
        burst=burst,
        note=note,
    )
    console.print(
        f"key {record.key_id} for tenant {record.tenant} stored in {settings.api_keys_path} "
        "(digest only); the key follows on stdout and is not shown again"
    )
    typer.echo(key)


@keys_app.command("list")
def list_command(ctx: typer.Context) -> None:
    """The keys: id, tenant, limit, created, revoked. Never a secret."""
    settings = state(ctx).settings()
    table = Table(title=f"API keys ({settings.api_keys_path})", title_justify="left")
    for column in ("key id", "tenant", "rate/s", "burst", "created", "revoked", "note"):
        table.add_column(column)
    for r in load_keys(settings.api_keys_path):
        table.add_row(
            r.key_id,
            r.tenant,
            "—" if r.rate_per_s is None else f"{r.rate_per_s:g}",
            str(r.burst),
            f"{r.created_at:%Y-%m-%d %H:%M}",
            "" if r.revoked_at is None else f"{r.revoked_at:%Y-%m-%d %H:%M}",
            r.note,
        )
    Console().print(table)


@keys_app.command("revoke")
def revoke_command(
    ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="The key's id.")]
) -> None:
    """Revoke a key by its id."""
    settings = state(ctx).settings()
    record = revoke_key(settings.api_keys_path, key_id, datetime.now(UTC))
    console.print(f"key {record.key_id} of tenant {record.tenant} revoked")


@gateway_app.command("serve")
def serve_command(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on. [default: gateway.host]")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port to listen on. [default: gateway.port]"),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="TOML settings file (overrides the global --config).", dir_okay=False
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option(help="Log one line per HTTP request (never headers).")
    ] = False,
) -> None:
    """Serve the OpenAI-compatible metering gateway until Ctrl-C (or SIGTERM)."""
    from ingest.gateway.server import Gateway, run_gateway

    settings = load_settings(config) if config is not None else state(ctx).settings()
    listen_host = host or settings.gateway.host
    listen_port = settings.gateway.port if port is None else port

    def announce(gateway: Gateway) -> None:
        servers = ", ".join(
            f"{s.server_name} ({', '.join(s.models)})" for s in settings.gateway.servers
        )
        console.print(
            f"gateway listening on {gateway.url}/v1 (OpenAI-compatible)\n"
            f"  Triton servers: {servers}\n"
            f"  API keys: {settings.api_keys_path}\n"
            f"  spool: {settings.spool_path}\n"
            f"  Kafka topic: {settings.kafka.topic}\n"
            "Ctrl-C stops it (in-flight requests finish, the spool is drained)."
        )

    run_gateway(
        settings,
        host=listen_host,
        port=listen_port,
        access_log=access_log,
        on_listening=announce,
    )
    console.print("gateway stopped")
