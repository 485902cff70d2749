"""`gpuledger demo`: the main job end to end on the embedded local stack.

Stack up, simulate a day of a 4-node x 8-GPU fleet with 8 tenants, publish and load
it, read back what Kafka and Prometheus hold beside the simulator's ground truth,
ingest the day into the lake and allocate it (Dagster runs), printing per-tenant usage,
J per output token against ML.ENERGY and the allocation's fidelity, and ends with the
month's draft invoices (PDF, CSV, JSON, FOCUS) per tenant, then the efficiency marts
from the analysts' published snapshot and how to open the dashboard on them. Last, live
mode (`demo_live`): a real Triton server behind the metering gateway serves a replayed
trace for three tenants, and the hourly pipeline bills it minutes later.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Annotated

import httpx
import orjson
import polars as pl
import typer
from rich.table import Table

from ingest.catalog import in_memory
from ingest.endpoints import prometheus_url
from ingest.kafka_readback import read_topic
from ingest.settings import Settings
from ingest.simulator import SimulationConfig, default_fleet
from ingest.simulator.run import SimulationResult
from ingest.stack import LocalStack
from ingest.telemetry import telemetry_coverage
from models.errors import ServiceError
from pipelines.cli.app import app, state
from pipelines.cli.demo_allocation import allocate_day
from pipelines.cli.demo_analytics import analytics_summary
from pipelines.cli.demo_invoices import invoice_month
from pipelines.cli.demo_live import note_replaced_topic, run_live_demo
from pipelines.cli.progress import StepProgress
from pipelines.cli.simulate import console, print_summary, run_simulation


@app.command("demo")
def demo_command(
    ctx: typer.Context,
    hours: Annotated[float, typer.Option(min=0.1, max=168, help="Simulated hours.")] = 24.0,
    seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0,
    live_seconds: Annotated[
        float,
        typer.Option(min=5, max=3600, help="Seconds of live Triton traffic at the end."),
    ] = 45.0,
) -> None:
    """Start the local stack, simulate a day of a 32-GPU fleet, and show what landed where."""
    settings = state(ctx).settings()
    stack = LocalStack(settings)
    console.rule("[bold]1. Local stack")
    status = stack.up()
    for service in status:
        console.print(f"  {service.name}: {service.url}")
    console.rule("[bold]2. Simulate and deliver")
    # The simulated window ends at the last UTC midnight: a past day, queried as history.
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - timedelta(hours=hours)
    spec = default_fleet(nodes=4, gpus_per_node=8, tenants=8, seed=seed)
    config = SimulationConfig(start=start, duration_s=hours * 3600.0, seed=seed)
    out_dir = settings.state_dir / "simulations" / f"demo-{start:%Y%m%d}-s{seed}"
    result, report, elapsed = run_simulation(
        spec, config, settings, out_dir, to_kafka=True, to_prometheus=True, blocks_dir=None
    )
    print_summary(result, report, elapsed)
    console.rule("[bold]3. What Kafka holds")
    kafka_by_tenant(settings, result)
    console.rule("[bold]4. What Prometheus holds")
    prometheus_series(settings, result)
    console.rule("[bold]5. Ingest into the lake (Dagster, one run for the day)")
    note_replaced_topic(settings)
    ingest_day(settings, result)
    console.rule("[bold]6. Allocate energy and GPU-seconds to requests (Dagster + dbt)")
    allocate_day(settings, result)
    console.rule("[bold]7. Invoices for the period (rate card, Dagster, PDF/CSV/JSON/FOCUS)")
    invoice_month(settings, result)
    console.rule("[bold]8. Efficiency marts for analysts, and the dashboard")
    analytics_summary(settings)
    # Real traffic now: a Triton server behind the metering gateway, billed live.
    run_live_demo(settings, stack, duration_s=live_seconds, first_step=9)
    console.print(
        "\n[bold]Done.[/bold] Stop the stack with [cyan].venv/bin/gpuledger stack down[/cyan] "
        "(its Kafka keeps events in memory only)."
    )


def kafka_by_tenant(settings: Settings, result: SimulationResult) -> None:
    window_ids = set(result.requests["request_id"].to_list())
    seen: set[str] = set()
    per_tenant: Counter[str] = Counter()
    records = 0
    with StepProgress(console) as progress:
        progress.substep(f"reading {settings.kafka.topic} back")
        advance = progress.counter("records read", None)
        for record in read_topic(settings, on_progress=advance):
            records += 1
            event = orjson.loads(record.value)
            event_id = event.get("id")
            if event_id in window_ids and event_id not in seen:
                seen.add(event_id)
                per_tenant[event.get("subject", "?")] += 1
    expected = result.requests.group_by("tenant").len().sort("len", descending=True)
    table = Table(title="Usage events per tenant", title_justify="left")
    for column in ("tenant", "simulated", "in Kafka (distinct ids)", "match"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for tenant, count in expected.iter_rows():
        got = per_tenant.get(tenant, 0)
        table.add_row(tenant, f"{count:,}", f"{got:,}", "yes" if got == count else "NO")
    console.print(table)
    console.print(
        f"  {records:,} records on the topic; {len(seen):,} distinct ids from this window "
        f"(earlier runs' copies of the same ids are deduplicated downstream)"
    )


def prometheus_series(settings: Settings, result: SimulationResult) -> None:
    url = prometheus_url(settings)
    hours = max(1, round((result.horizon_end_ms - result.window_start_ms) / 3_600_000 + 0.5))
    at = result.horizon_end_ms / 1000
    instances = "|".join(f"{n.hostname}:9400" for n in result.fleet.spec.nodes)
    metrics = result.telemetry.series["metric"].unique().sort().to_list()
    try:
        samples = {
            m: _scalar(url, f'sum(count_over_time({m}{{instance=~"{instances}"}}[{hours}h]))', at)
            for m in metrics
        }
        series = {
            m: _scalar(url, f'count(last_over_time({m}{{instance=~"{instances}"}}[{hours}h]))', at)
            for m in metrics
        }
    except httpx.HTTPError as exc:
        raise ServiceError(f"Prometheus at {url} did not answer: {exc}") from None
    written = (
        result.telemetry.samples.join(
            result.telemetry.series.select("series_id", "metric"), on="series_id"
        )
        .group_by("metric")
        .agg(pl.len().alias("samples"), pl.col("series_id").n_unique().alias("series"))
    )
    table = Table(title="DCGM telemetry", title_justify="left")
    table.add_column("metric", no_wrap=True)
    for column in ("series", "written", "in Prometheus"):
        table.add_column(column, justify="right")
    for metric, n_samples, n_series in written.sort("metric").iter_rows():
        table.add_row(
            metric,
            f"{int(series.get(metric, 0))}/{n_series}",
            f"{n_samples:,}",
            f"{int(samples.get(metric, 0)):,}",
        )
    console.print(table)


def ingest_day(settings: Settings, result: SimulationResult) -> None:
    """Materialize both ingest assets for the simulated hours; compare with the truth."""
    from pipelines.materialize import materialize_ingest

    start = datetime.fromtimestamp(result.window_start_ms / 1000, UTC)
    end = datetime.fromtimestamp(result.window_end_ms / 1000, UTC)
    with StepProgress(console) as progress:
        run = progress.run(
            f"materializing usage_events_raw and gpu_telemetry_raw for {start:%Y-%m-%d}",
            lambda: materialize_ingest(settings, start, end),
        )
    console.print(
        f"  run {run.run_id[:8]}: {len(run.partition_keys)} hourly partitions, "
        f"{'succeeded' if run.success else 'FAILED'}"
    )
    for check in run.checks:
        verdict = "passed" if check.passed else f"failed ({check.severity})"
        console.print(f"  check {check.name}: {verdict}")
        if not check.passed and check.description:
            console.print(f"    {check.description}")
    con = in_memory(settings)
    truth = (
        result.requests.filter(pl.col("end_ts") < end)
        .group_by("tenant")
        .agg(
            pl.len().alias("events"),
            pl.col("prompt_tokens").sum(),
            pl.col("completion_tokens").sum(),
        )
    )
    lake = con.sql(
        """
        SELECT tenant, count(*) AS events, sum(prompt_tokens) AS prompt_tokens,
               sum(completion_tokens) AS completion_tokens
        FROM raw.usage_events
        WHERE topic = $topic AND hour_start >= $start AND hour_start < $end
        GROUP BY tenant
        """,
        params={"topic": settings.kafka.topic, "start": start, "end": end},
    ).pl()
    joined = truth.join(lake, on="tenant", how="full", suffix="_lake", coalesce=True).sort(
        "events", descending=True, nulls_last=True
    )
    table = Table(
        title="Usage events in the lake (events ending in the day) vs the simulator",
        title_justify="left",
    )
    for column in ("tenant", "events", "prompt tokens", "completion tokens", "= simulator"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for row in joined.iter_rows(named=True):
        same = all(
            row[k] == row[f"{k}_lake"] for k in ("events", "prompt_tokens", "completion_tokens")
        )
        table.add_row(
            row["tenant"],
            f"{row['events_lake'] or 0:,}",
            f"{row['prompt_tokens_lake'] or 0:,}",
            f"{row['completion_tokens_lake'] or 0:,}",
            "yes"
            if same
            else f"NO ({row['events'] or 0:,} / {row['prompt_tokens'] or 0:,} / "
            f"{row['completion_tokens'] or 0:,})",
        )
    console.print(table)
    coverage = telemetry_coverage(
        con.sql(
            "SELECT gpu_key, hour_start, ts, placeholder_metrics, counter_reset, gap, "
            "gap_before_s FROM raw.gpu_telemetry WHERE hour_start >= $start AND hour_start < $end",
            params={"start": start, "end": end},
        ).pl(),
        result.config.telemetry.scrape_interval_s,
    )
    per_gpu = (
        coverage.group_by("gpu_key")
        .agg(
            pl.col("scrapes").sum(),
            pl.col("expected_scrapes").sum(),
            pl.col("placeholder_samples").sum(),
            pl.col("resets").sum(),
            pl.col("gaps").sum(),
            pl.col("max_gap_s").max(),
        )
        .with_columns(coverage=pl.col("scrapes") / pl.col("expected_scrapes"))
        .sort("gpu_key")
    )
    table = Table(title="Telemetry coverage per GPU over the day", title_justify="left")
    for column in ("GPU (host/uuid)", "scrapes", "coverage", "blanks", "resets", "gaps"):
        table.add_column(column, justify="left" if column.startswith("GPU") else "right")
    for row in per_gpu.iter_rows(named=True):
        host, uuid = row["gpu_key"].split("/", 1)
        table.add_row(
            f"{host}/{uuid[:12]}…",
            f"{row['scrapes']:,}",
            f"{row['coverage']:.1%}",
            f"{row['placeholder_samples']}",
            f"{row['resets']}",
            f"{row['gaps']}",
        )
    console.print(table)
    console.print(
        f'  Query it: [cyan].venv/bin/python -c "import duckdb; '
        f"print(duckdb.connect('{settings.warehouse_path}', read_only=True)"
        f".sql('select * from raw.usage_events limit 5'))\"[/cyan]"
    )


def _scalar(url: str, query: str, at: float) -> float:
    response = httpx.get(f"{url}/api/v1/query", params={"query": query, "time": at}, timeout=120)
    response.raise_for_status()
    result = response.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0
