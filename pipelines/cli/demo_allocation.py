"""Demo step 6: allocate the simulated day with Dagster and show what it produced.

Per tenant: tokens, GPU-hours, energy. Per model and GPU type: J per output token
beside ML.ENERGY's figure for that model at the batch the fleet ran. Per tenant: the
allocated energy against the simulator's ground truth (ALLOCATION.md §8).
"""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
from rich.table import Table

from ingest.catalog import connect
from ingest.settings import Settings
from ingest.simulator.run import SimulationResult
from pipelines.allocation_report import (
    MLENERGY_GPU,
    PLAUSIBLE_RANGE,
    fidelity,
    model_efficiency,
    plausible,
    tenant_usage,
)
from pipelines.cli.progress import StepProgress
from pipelines.cli.simulate import console

#: Fidelity target: per-tenant energy within this of the truth, for every tenant with
#: more than FIDELITY_MIN_SHARE of the load (issue 4).
FIDELITY_TARGET = 0.03
FIDELITY_MIN_SHARE = 0.01


def allocate_day(settings: Settings, result: SimulationResult) -> None:
    from pipelines.materialize import materialize_allocation

    start = datetime.fromtimestamp(result.window_start_ms / 1000, UTC)
    end = datetime.fromtimestamp(result.window_end_ms / 1000, UTC)
    with StepProgress(console) as progress:
        run = progress.run(
            f"materializing the allocation (dbt build) for {start:%Y-%m-%d}",
            lambda: materialize_allocation(settings, start, end),
        )
    failed = run.failed_checks
    console.print(
        f"  run {run.run_id[:8]}: {len(run.partition_keys)} hourly partitions, "
        f"{'succeeded' if run.success else 'FAILED'}; {len(run.checks)} checks, "
        f"{len(failed)} failed"
    )
    for check in run.checks:
        if check.name == "allocation_invariants" or not check.passed:
            verdict = "passed" if check.passed else f"failed ({check.severity})"
            console.print(f"  check {check.name}: {verdict}")
            if check.description:
                console.print(f"    {check.description}")
    with connect(settings, read_only=True) as con:
        tenants = tenant_usage(con, start, end)
        models = model_efficiency(con, start, end)
        truth = fidelity(con, result.requests, start, end)
    print_tenants(tenants)
    print_models(models)
    print_fidelity(truth)


def print_tenants(tenants: pl.DataFrame) -> None:
    table = Table(title="Usage per tenant (events ending in the day)", title_justify="left")
    for column in ("tenant", "requests", "prompt tok", "output tok", "GPU-h", "kWh", "orphans"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for row in tenants.iter_rows(named=True):
        table.add_row(
            row["tenant"],
            f"{row['requests']:,}",
            f"{row['prompt_tokens'] / 1e6:,.1f} M",
            f"{row['completion_tokens'] / 1e6:,.1f} M",
            f"{row['gpu_hours']:,.1f}",
            f"{row['energy_kwh']:,.2f}",
            f"{row['orphans']:,}",
        )
    console.print(table)


def print_models(models: pl.DataFrame) -> None:
    table = Table(
        title="J per output token (metered GPU energy / output tokens) vs ML.ENERGY",
        title_justify="left",
    )
    for column in ("model", "GPU", "TP", "batch", "J/token", "ML.ENERGY", "ratio", "plausible"):
        table.add_column(column, justify="left" if column in ("model", "GPU") else "right")
    for row in models.iter_rows(named=True):
        reference = row["mlenergy_j_per_token"]
        verdict = plausible(row["ratio"])
        note = "" if row["gpu_type"] == MLENERGY_GPU else "*"
        table.add_row(
            row["model"],
            _short_gpu(row["gpu_type"]),
            str(row["tp"]),
            f"{row['batch']:.1f}",
            f"{row['j_per_token']:.3f}",
            f"{reference:.3f}{note}" if reference is not None else "not measured",
            f"{row['ratio']:.2f}" if row["ratio"] is not None else "",
            {True: "yes", False: "NO", None: "n/a"}[verdict],
        )
    console.print(table)
    console.print(
        "  ML.ENERGY v3 (lm-arena-chat, H100 SXM, replica energy) at the batch the fleet ran "
        "— interpolated, or extrapolated below batch 8 as P·ITL/batch; plausible = ratio in "
        f"[{PLAUSIBLE_RANGE[0]}, {PLAUSIBLE_RANGE[1]}]. * the H100 figure: ML.ENERGY has no "
        "A100 measurement."
    )


def _short_gpu(model_name: str) -> str:
    for short in ("H100", "A100", "H200", "B200", "L40S"):
        if short in model_name:
            return short
    return model_name


def print_fidelity(truth: pl.DataFrame) -> None:
    table = Table(
        title="Allocated vs true energy per tenant (dynamic energy, simulator's truth)",
        title_justify="left",
    )
    for column in ("tenant", "share", "allocated kWh", "true kWh", "error", "within 3 %"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for row in truth.iter_rows(named=True):
        counted = row["share"] > FIDELITY_MIN_SHARE
        within = abs(row["error"]) <= FIDELITY_TARGET
        table.add_row(
            row["tenant"],
            f"{row['share']:.1%}",
            f"{row['allocated_kwh']:,.2f}",
            f"{row['true_kwh']:,.2f}",
            f"{row['error']:+.2%}",
            ("yes" if within else "NO") if counted else "n/a (< 1 %)",
        )
    console.print(table)
    counted = truth.filter(pl.col("share") > FIDELITY_MIN_SHARE)
    worst = counted.select(pl.col("error").abs().max()).item() if counted.height else 0.0
    console.print(
        f"  largest error among tenants over 1 % of the load: {worst:.2%} "
        f"(target {FIDELITY_TARGET:.0%})"
    )
