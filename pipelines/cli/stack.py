"""`gpuledger stack up | down | status`: the embedded local Kafka broker and Prometheus.

Other commands find the running stack through its state files under
`<state_dir>/stack/`, so nothing needs exporting after `up`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ingest.endpoints import check_kafka, check_prometheus
from ingest.settings import Settings
from ingest.stack import LocalStack, ServiceState, ServiceStatus, StackStatus
from models.errors import ServiceError
from pipelines.cli.app import app, state

stack_app = typer.Typer(
    help="The embedded local stack: a Tansu Kafka broker and Prometheus on 127.0.0.1.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")


def _console() -> Console:
    # Built per command so it writes to the current stdout (tests capture it).
    return Console(highlight=False, soft_wrap=True)


@stack_app.command("up")
def up(ctx: typer.Context) -> None:
    """Start the broker and Prometheus (idempotent) and wait until both are healthy."""
    settings = state(ctx).settings()
    console = _console()
    started_s = time.monotonic()
    with console.status("starting the local stack…") as spinner:
        stack = LocalStack(settings, progress=lambda message: spinner.update(f"{message}…"))
        result = stack.up()
    elapsed_s = time.monotonic() - started_s
    for service in result:
        console.print(_line(service))
    console.print(f"Kafka bootstrap: {result.kafka.url}")
    console.print(f"Prometheus:      {result.prometheus.url}")
    console.print(f"[dim]{result.kafka.note}[/dim]")
    console.print(f"[dim]ready in {elapsed_s:.1f} s; state in {result.stack_dir}[/dim]")
    for note in _overrides(settings):
        console.print(f"[yellow]note:[/yellow] {note}")


@stack_app.command("down")
def down(ctx: typer.Context) -> None:
    """Stop the processes `up` started (only those); Prometheus's data is kept."""
    settings = state(ctx).settings()
    console = _console()
    stack = LocalStack(settings)
    result = stack.down()
    for service in result:
        console.print(_line(service))
    if result.kafka.detail.startswith("stopped") or result.kafka.detail.startswith("killed"):
        console.print("[dim]the broker's memory:// topics and offsets are gone[/dim]")
    console.print(f"[dim]Prometheus data kept in {stack.prometheus_data_dir}[/dim]")


@stack_app.command("status")
def status(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of a table.")
    ] = False,
) -> None:
    """Show each service and check the endpoints commands will use.

    Exits 0 when every endpoint in use answers, 3 otherwise (with a one-line error).
    """
    settings = state(ctx).settings()
    result = LocalStack(settings).status()
    external = _check_external(settings)
    problem = _first_problem(settings, result, external)
    if as_json:
        document = {
            "stack_dir": str(result.stack_dir),
            "services": [_as_dict(s) for s in result],
            "configured": [
                {"name": name, "address": address, "healthy": error is None, "error": error}
                for name, address, error in external
            ],
        }
        typer.echo(json.dumps(document, indent=2))
    else:
        _print_status(_console(), result, external)
    if problem is not None:
        raise ServiceError(problem)


def _line(service: ServiceStatus) -> str:
    where = service.url or "-"
    pid = f"pid {service.pid}" if service.pid is not None else "-"
    return f"{service.name:<11} {where:<23} {pid:<10} {service.detail}"


def _overrides(settings: Settings) -> list[str]:
    notes = []
    if settings.kafka.bootstrap_servers:
        notes.append(
            f"GPULEDGER_KAFKA__BOOTSTRAP_SERVERS is set: commands use "
            f"{settings.kafka.bootstrap_servers}, not this broker"
        )
    if settings.prometheus.url:
        notes.append(
            f"GPULEDGER_PROMETHEUS__URL is set: commands use {settings.prometheus.url}, "
            "unless it is this Prometheus"
        )
    return notes


def _check_external(settings: Settings) -> list[tuple[str, str, str | None]]:
    """(name, address, error or None) for each endpoint configured outside the stack."""
    checks: list[tuple[str, str, str | None]] = []
    if settings.kafka.bootstrap_servers:
        try:
            check_kafka(settings)
            error = None
        except ServiceError as exc:
            error = exc.message
        checks.append(("kafka", settings.kafka.bootstrap_servers, error))
    if settings.prometheus.url:
        try:
            check_prometheus(settings)
            error = None
        except ServiceError as exc:
            error = exc.message
        checks.append(("prometheus", settings.prometheus.url, error))
    return checks


def _first_problem(
    settings: Settings, result: StackStatus, external: list[tuple[str, str, str | None]]
) -> str | None:
    for _name, _address, error in external:
        if error is not None:
            return error
    configured = {name for name, _address, _error in external}
    local_in_use = [s for s in result if s.name not in configured]
    if local_in_use and all(s.state is not ServiceState.RUNNING for s in local_in_use):
        return "the local stack is not running: run `gpuledger stack up`"
    for service in local_in_use:
        if service.state is not ServiceState.RUNNING:
            return f"{service.name} is {service.state} ({service.detail}): run `gpuledger stack up`"
        if not service.healthy:
            return (
                f"{service.name} (pid {service.pid}) is running but not healthy "
                f"({service.detail}); log {service.log_path}"
            )
    return None


def _print_status(
    console: Console, result: StackStatus, external: list[tuple[str, str, str | None]]
) -> None:
    table = Table(title=f"local stack ({result.stack_dir})", title_justify="left")
    for column in ("service", "state", "healthy", "pid", "address"):
        table.add_column(column, overflow="fold")
    for service in result:
        healthy = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[service.healthy]
        table.add_row(
            service.name,
            service.state.value if service.state is not ServiceState.STALE else "[red]stale[/red]",
            healthy,
            str(service.pid) if service.pid is not None else "-",
            service.url or "-",
        )
    for name, address, error in external:
        table.add_row(
            f"{name} (configured)",
            "external",
            "[green]yes[/green]" if error is None else "[red]no[/red]",
            "-",
            address,
        )
    console.print(table)
    for service in result:
        if service.state is ServiceState.STALE or (
            service.state is ServiceState.RUNNING and service.healthy is False
        ):
            console.print(f"{service.name}: {service.detail}")
    console.print(f"[dim]kafka: {result.kafka.note}[/dim]")
    console.print(f"[dim]logs: {result.stack_dir}/<service>.log[/dim]")


def _as_dict(service: ServiceStatus) -> dict[str, Any]:
    return {
        "name": service.name,
        "state": service.state.value,
        "healthy": service.healthy,
        "pid": service.pid,
        "port": service.port,
        "url": service.url,
        "log_path": str(service.log_path) if service.log_path else None,
        "detail": service.detail,
        "note": service.note or None,
        "started_at": service.started_at.isoformat() if service.started_at else None,
    }
