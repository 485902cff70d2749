"""`gpuledger publish`: a new analysts' snapshot of the marts, and what the current is.

Scheduled runs publish after every allocation and invoice run; this command publishes
by hand: every partition the warehouse holds (the first time, or after a backfill
outside Dagster), or the days and periods of a window. `--info` prints the current
snapshot and how to query it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from models.errors import InputError
from pipelines.analytics.publish import PUBLISHED_TABLES, publish, snapshot_info
from pipelines.cli.app import app, state
from pipelines.cli.ingest import window

__all__ = ["publish_command"]

console = Console()
_NAMES = [t.name for t in PUBLISHED_TABLES]


@app.command("publish")
def publish_command(
    ctx: typer.Context,
    start: Annotated[
        str | None, typer.Option(help="Window start (ISO 8601, UTC); default: everything.")
    ] = None,
    end: Annotated[str | None, typer.Option(help="Window end (default: start + --hours).")] = None,
    hours: Annotated[float | None, typer.Option(min=1 / 60, help="Window length.")] = None,
    table: Annotated[
        list[str] | None,
        typer.Option("--table", help=f"Only these tables (repeat): {', '.join(_NAMES)}."),
    ] = None,
    info: Annotated[
        bool, typer.Option("--info", help="Show the current snapshot; publish nothing.")
    ] = False,
) -> None:
    """Publish the marts as a new read-only snapshot for analysts and the dashboard."""
    settings = state(ctx).settings()
    catalog = settings.analytics_path
    if info:
        if not catalog.is_file():
            raise InputError(f"no published snapshot at {catalog}: run `gpuledger publish`")
        _print_info(catalog)
        return
    unknown = sorted(set(table or []) - set(_NAMES))
    if unknown:
        raise InputError(f"--table: unknown {', '.join(unknown)} (one of {', '.join(_NAMES)})")
    begin, finish = (None, None) if start is None else window(start, end, hours)
    with console.status("publishing a snapshot of the marts"):
        report = publish(settings, begin, finish, tables=table or None)
    console.print(
        f"snapshot {report.snapshot_id}: {sum(len(v) for v in report.rewritten.values())} "
        f"partitions written in {report.seconds:.1f} s; {report.removed_files} old files removed"
    )
    if report.missing:
        console.print(f"  not in the warehouse yet: {', '.join(report.missing)}")
    _print_info(catalog)


def _print_info(path: Path) -> None:
    current = snapshot_info(path)
    published = f"{current['published_at']:%Y-%m-%d %H:%M:%S} UTC"
    table = Table(
        title=f"Snapshot {current['snapshot_id']} (published {published})",
        title_justify="left",
    )
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, rows in sorted(current["tables"].items()):
        table.add_row(f"marts.{name}", f"{rows:,}")
    console.print(table)
    console.print(
        f'  query it: duckdb -readonly {path} "SELECT * FROM marts.mart_fleet_daily"\n'
        f"  or in Python: duckdb.connect('{path}', read_only=True)"
    )
