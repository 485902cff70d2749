"""`gpuledger allocate`: the allocation (dbt models) for a window, as one Dagster run.

Runs `allocation_models` with its dbt tests and `allocation_invariants` for every hour
of the window (`pipelines.materialize.materialize_allocation`) on what the lake holds,
then prints per tenant the requests, tokens, GPU-hours and energy the marts billed, the
fleet's metered and unallocated idle energy, and the invariants' verdict. A failing
check (a dbt test or the invariants) is listed, and the command exits 1.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ingest.catalog import connect
from ingest.settings import Settings
from models.errors import GpuledgerError
from pipelines.allocation_report import tenant_usage
from pipelines.cli.app import app, state
from pipelines.cli.ingest import window
from pipelines.cli.progress import StepProgress

__all__ = ["allocate_command", "fleet_totals"]


class AllocationFailed(GpuledgerError):
    """The allocation run finished, but a blocking check failed."""

    exit_code = 1


def fleet_totals(settings: Settings, start: datetime, end: datetime) -> tuple[int, float, float]:
    """(GPU-hours covered by telemetry, metered kWh, idle kWh left unallocated)."""
    with connect(settings) as con:
        row = con.execute(
            """
            select count(*), coalesce(sum(metered_j), 0), coalesce(sum(idle_unallocated_j), 0)
            from marts.fct_gpu_hourly where hour_start >= $start and hour_start < $end
            """,
            {"start": start, "end": end},
        ).fetchone()
    assert row is not None
    return int(row[0]), row[1] / 3.6e6, row[2] / 3.6e6


@app.command("allocate")
def allocate_command(
    ctx: typer.Context,
    start: Annotated[
        str | None, typer.Option(help="First hour (UTC). [default: yesterday]")
    ] = None,
    end: Annotated[str | None, typer.Option(help="End (exclusive).")] = None,
    hours: Annotated[float | None, typer.Option(min=1, help="Hours from --start.")] = None,
) -> None:
    """Allocate GPU energy and time to requests for a window (one Dagster run, dbt build)."""
    from pipelines.allocation import load_allocation_config, window_hours
    from pipelines.defs.partitions import partition_keys_between
    from pipelines.materialize import materialize_allocation

    # Bound to the stdout of now: the run silences stdout (dagster-dbt echoes dbt's log
    # lines there) while the progress line keeps turning.
    console = Console(file=sys.stdout)
    settings = state(ctx).settings()
    begin, finish = window(start, end, hours)
    first, last = window_hours(begin, finish)
    partition_keys_between(begin, finish)  # a bad window fails here, before the run
    load_allocation_config(settings)  # and so does a bad allocation config
    with StepProgress(console) as progress:
        run = progress.run(
            f"allocating {first:%Y-%m-%d %H:00} to {last:%Y-%m-%d %H:00} UTC (dbt build)",
            lambda: materialize_allocation(settings, begin, finish),
        )
    passed = sum(c.passed for c in run.checks)
    console.print(
        f"run {run.run_id[:8]}: {len(run.partition_keys)} hourly partitions, "
        f"{'succeeded' if run.success else 'FAILED'}; {passed}/{len(run.checks)} checks passed"
    )
    if run.success:
        with connect(settings) as con:
            tenants = tenant_usage(con, first, last)
        table = Table(title="Per tenant", title_justify="left")
        for column in ("tenant", "requests", "prompt tokens", "completion tokens"):
            table.add_column(column, justify="left" if column == "tenant" else "right")
        table.add_column("GPU-hours", justify="right")
        table.add_column("kWh", justify="right")
        for row in tenants.sort("tenant").iter_rows(named=True):
            table.add_row(
                row["tenant"],
                f"{row['requests']:,}",
                f"{row['prompt_tokens']:,}",
                f"{row['completion_tokens']:,}",
                f"{row['gpu_hours']:,.3f}",
                f"{row['energy_kwh']:,.3f}",
            )
        console.print(table)
        gpu_hours, metered_kwh, idle_kwh = fleet_totals(settings, first, last)
        console.print(
            f"fleet: {gpu_hours} GPU-hours metered {metered_kwh:,.3f} kWh, of which "
            f"{idle_kwh:,.3f} kWh idle left unallocated"
        )
    try:
        invariants = run.check("allocation_invariants")
    except KeyError:
        console.print("invariants: not checked (the models they check were not built)")
    else:
        verdict = "passed" if invariants.passed else "FAILED"
        console.print(f"invariants: {verdict}: {invariants.description}")
        for name in ("energy_not_closing", "time_not_closing", "tokens_not_billed_once"):
            for row in invariants.metadata.get(name, [])[:5]:
                console.print(f"  {name}: {row}")
    for check in run.failed_checks:
        if check.name != "allocation_invariants":
            console.print(f"  check {check.asset}:{check.name} failed ({check.severity})")
    if not run.success:
        failed = sorted(c.name for c in run.failed_checks) or ["(no check: see the run log)"]
        raise AllocationFailed(
            f"allocation run {run.run_id[:8]} failed its checks: {', '.join(failed[:3])}"
            + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        )
