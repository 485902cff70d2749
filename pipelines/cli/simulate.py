"""`gpuledger simulate`: a simulated fleet's usage events, telemetry and ground truth."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from ingest.settings import Settings
from ingest.simulator import (
    FleetSpec,
    SimulationConfig,
    TelemetryConfig,
    TraceColumns,
    WorkloadConfig,
    default_fleet,
    read_trace,
    simulate,
)
from ingest.simulator.delivery import DeliveryReport, deliver, preflight
from ingest.simulator.run import DEFAULT_RATE_PER_GPU_S, SimulationResult
from models.errors import InputError
from pipelines.cli.app import app, state
from pipelines.cli.progress import StepProgress

console = Console()


class HostnameLabel(StrEnum):
    Hostname = "Hostname"
    hostname = "hostname"
    mixed = "mixed"


class TimeUnit(StrEnum):
    s = "s"
    ms = "ms"
    us = "us"
    ns = "ns"
    iso = "iso"


def parse_start(text: str | None) -> datetime:
    """ISO 8601 date or date-time; without a zone it is read as UTC. Default: yesterday."""
    if text is None:
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return today - timedelta(days=1)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"--start: {text!r} is not an ISO 8601 date or date-time (e.g. 2026-11-23T00:00Z)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def load_fleet(path: Path) -> FleetSpec:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"fleet {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"fleet {path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return FleetSpec.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise InputError(f"fleet {path}: {field}: {first['msg']}") from None


@app.command("simulate")
def simulate_command(
    ctx: typer.Context,
    start: Annotated[
        str | None,
        typer.Option(
            help="Window start, ISO 8601, UTC unless a zone is given. [default: yesterday 00:00Z]"
        ),
    ] = None,
    hours: Annotated[float, typer.Option(min=0.01, max=744, help="Window length in hours.")] = 24.0,
    seed: Annotated[
        int, typer.Option(min=0, help="Random seed; the same seed gives the same output.")
    ] = 0,
    nodes: Annotated[int, typer.Option(min=1, max=512, help="Nodes in the built-in fleet.")] = 4,
    gpus_per_node: Annotated[int, typer.Option(min=1, max=16, help="GPUs per node.")] = 8,
    tenants: Annotated[
        int, typer.Option(min=1, max=10_000, help="Tenants in the built-in fleet.")
    ] = 8,
    fleet: Annotated[
        Path | None,
        typer.Option(help="Fleet YAML (nodes, deployments, tenants) instead of the built-in one."),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            min=0.0, help=f"Mean requests/s over the fleet. [default: {DEFAULT_RATE_PER_GPU_S}/GPU]"
        ),
    ] = None,
    scrape_interval: Annotated[
        float, typer.Option(min=1, max=3600, help="Prometheus scrape interval, s.")
    ] = 15.0,
    collect_interval: Annotated[
        float, typer.Option(min=1, max=3600, help="dcgm-exporter collect interval, s.")
    ] = 30.0,
    hostname_label: Annotated[
        HostnameLabel,
        typer.Option(help="Hostname label spelling (dcgm-exporter 4.x / main / both)."),
    ] = HostnameLabel.Hostname,
    counter_resets_per_gpu_day: Annotated[
        float, typer.Option(min=0, help="Energy counter resets.")
    ] = 0.05,
    missed_scrape_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of scrapes lost.")
    ] = 0.002,
    outages_per_node_day: Annotated[
        float, typer.Option(min=0, help="Exporter outages (2-15 min).")
    ] = 0.25,
    placeholder_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of blank (placeholder) samples.")
    ] = 0.0005,
    error_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of failed requests.")
    ] = 0.003,
    cancel_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of cancelled requests.")
    ] = 0.01,
    trace: Annotated[
        Path | None, typer.Option(help="Replay this request trace (CSV or JSONL).")
    ] = None,
    trace_time_column: Annotated[
        str, typer.Option(help="Trace column with arrival times.")
    ] = "timestamp",
    trace_time_unit: Annotated[
        TimeUnit, typer.Option(help="Unit of the time column.")
    ] = TimeUnit.ms,
    trace_prompt_column: Annotated[
        str, typer.Option(help="Trace column with prompt tokens.")
    ] = "input_length",
    trace_completion_column: Annotated[
        str, typer.Option(help="Trace column with completion tokens.")
    ] = "output_length",
    trace_tenant_column: Annotated[
        str | None, typer.Option(help="Trace column naming tenants (fleet ids).")
    ] = None,
    trace_model_column: Annotated[
        str | None, typer.Option(help="Trace column naming models.")
    ] = None,
    trace_cached_column: Annotated[
        str | None, typer.Option(help="Trace column with cached prompt tokens.")
    ] = None,
    trace_repeat: Annotated[
        bool, typer.Option(help="Tile a short trace to fill the window.")
    ] = True,
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory. [default: <state_dir>/simulations/<start>-s<seed>]"),
    ] = None,
    kafka: Annotated[bool, typer.Option(help="Publish usage events to Kafka.")] = True,
    prometheus: Annotated[
        bool, typer.Option(help="Load telemetry into the local Prometheus.")
    ] = True,
    blocks_dir: Annotated[
        Path | None,
        typer.Option(
            help="Write TSDB blocks here (for another Prometheus) instead of loading them."
        ),
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            help="Live mode: the window starts now; serve /metrics like dcgm-exporter for "
            "Prometheus to scrape and publish each event when its request ends."
        ),
    ] = False,
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Live mode: exporter port (0 = any free).")
    ] = 9400,
) -> None:
    """Simulate a fleet: usage events to Kafka, DCGM telemetry into Prometheus, truth to Parquet."""
    settings = state(ctx).settings()
    if live and (start is not None or blocks_dir is not None):
        raise InputError("--live starts the window now; it takes neither --start nor --blocks-dir")
    # Live mode starts the window a moment ahead, so simulating does not eat into it.
    window_start = (
        datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
        if live
        else parse_start(start)
    )
    if live:
        preflight(settings, to_kafka=kafka, to_prometheus=False)
    else:
        preflight(settings, to_kafka=kafka, to_prometheus=prometheus and blocks_dir is None)
    spec = (
        load_fleet(fleet)
        if fleet is not None
        else default_fleet(nodes, gpus_per_node, tenants, seed)
    )
    trace_requests = None
    if trace is not None:
        trace_requests = read_trace(
            trace,
            TraceColumns(
                time=trace_time_column,
                time_unit=trace_time_unit.value,
                prompt=trace_prompt_column,
                completion=trace_completion_column,
                tenant=trace_tenant_column,
                model=trace_model_column,
                cached=trace_cached_column,
            ),
            repeat=trace_repeat,
        )
    config = SimulationConfig(
        start=window_start,
        duration_s=hours * 3600.0,
        seed=seed,
        rate_per_s=rate,
        workload=WorkloadConfig(
            rate_per_s=rate or 0.0, error_rate=error_rate, cancel_rate=cancel_rate
        ),
        telemetry=TelemetryConfig(
            scrape_interval_s=scrape_interval,
            collect_interval_s=collect_interval,
            hostname_label=hostname_label.value,
            counter_resets_per_gpu_day=counter_resets_per_gpu_day,
            missed_scrape_rate=missed_scrape_rate,
            outages_per_node_day=outages_per_node_day,
            placeholder_rate=placeholder_rate,
        ),
        trace=trace_requests,
    )
    out_dir = out or settings.state_dir / "simulations" / f"{window_start:%Y%m%dT%H%M%SZ}-s{seed}"
    if live:
        run_live_mode(
            spec, config, settings, out_dir, port=port, register=prometheus, publish=kafka
        )
        return
    result, report, elapsed = run_simulation(
        spec,
        config,
        settings,
        out_dir,
        to_kafka=kafka,
        to_prometheus=prometheus,
        blocks_dir=blocks_dir,
    )
    print_summary(result, report, elapsed)


def run_simulation(
    spec: FleetSpec,
    config: SimulationConfig,
    settings: Settings,
    out_dir: Path,
    *,
    to_kafka: bool,
    to_prometheus: bool,
    blocks_dir: Path | None,
) -> tuple[SimulationResult, DeliveryReport, float]:
    began = time.perf_counter()
    with StepProgress(console) as progress:
        result = simulate(spec, config, on_step=progress.substep)
        report = deliver(
            result,
            settings,
            out_dir,
            to_kafka=to_kafka,
            to_prometheus=to_prometheus,
            blocks_dir=blocks_dir,
            on_step=progress.substep,
            on_published=progress.counter("events published", result.requests.height),
        )
    return result, report, time.perf_counter() - began


def run_live_mode(
    spec: FleetSpec,
    config: SimulationConfig,
    settings: Settings,
    out_dir: Path,
    *,
    port: int,
    register: bool,
    publish: bool,
) -> None:
    """Precompute the window, then play it out in real time until its end or Ctrl-C."""
    from ingest.simulator.delivery import write_outputs
    from ingest.simulator.live import LiveStatus, run_live

    with StepProgress(console) as progress:
        result = simulate(spec, config, on_step=progress.substep)
        progress.run("writing ground truth", lambda: write_outputs(result, out_dir))
    console.print(
        f"Live: {len(result.fleet.gpus)} GPUs, {result.requests.height:,} requests over "
        f"{config.duration_s / 3600:g} h from {config.start:%H:%M:%S} UTC; truth in {out_dir}"
    )
    console.print("  Ctrl-C stops; events of requests that have ended are flushed first.")

    def tick(status: LiveStatus) -> None:
        if status.sim_s >= 0 and int(status.sim_s) % 60 == 0:
            console.print(
                f"  {status.sim_s / 60:5.0f} min: {status.scrapes:,} scrapes served at "
                f"{status.url}, {status.published:,} events published, {status.pending:,} to come"
            )

    report = run_live(result, settings, port=port, register=register, publish=publish, on_tick=tick)
    console.print(
        f"Stopped ({report.reason}): {report.published:,}/{report.events:,} events published, "
        f"{report.scrapes:,} scrapes served at {report.url}"
    )


def print_summary(result: SimulationResult, report: DeliveryReport, elapsed_s: float) -> None:
    requests = result.requests
    start = datetime.fromtimestamp(result.window_start_ms / 1000, UTC)
    end = datetime.fromtimestamp(result.window_end_ms / 1000, UTC)
    console.print(
        f"[bold]Simulated[/bold] {start:%Y-%m-%d %H:%M}–{end:%Y-%m-%d %H:%M} UTC: "
        f"{len(result.fleet.gpus)} GPUs, {len(result.fleet.replicas)} replicas, "
        f"{requests.height:,} requests in {elapsed_s:.1f} s"
    )
    if report.published is not None:
        rate = report.published.published / report.publish_s if report.publish_s else 0.0
        console.print(
            f"  Kafka: {report.published.published:,} events on {report.published.topic} "
            f"({rate:,.0f} events/s)"
        )
    if report.backfill is not None:
        where = report.blocks_dir or "the local Prometheus"
        rate = report.backfill.samples / report.backfill_s if report.backfill_s else 0.0
        console.print(
            f"  Telemetry: {report.backfill.samples:,} samples in {report.backfill.series} series, "
            f"{report.backfill.blocks} blocks into {where} ({rate:,.0f} samples/s)"
        )
    console.print(f"  Ground truth and samples: {report.out_dir}")
    table = Table(title="Ground truth by tenant", title_justify="left")
    for column in ("tenant", "requests", "prompt tok", "completion tok", "energy kWh", "GPU-h"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    by_tenant = (
        requests.group_by("tenant")
        .agg(
            pl.len().alias("n"),
            pl.col("prompt_tokens").sum(),
            pl.col("completion_tokens").sum(),
            (pl.col("true_energy_j").sum() / 3.6e6).alias("kwh"),
            (pl.col("true_gpu_seconds").sum() / 3600).alias("gpuh"),
        )
        .sort("n", descending=True)
    )
    for row in by_tenant.iter_rows(named=True):
        table.add_row(
            row["tenant"],
            f"{row['n']:,}",
            f"{row['prompt_tokens']:,}",
            f"{row['completion_tokens']:,}",
            f"{row['kwh']:.2f}",
            f"{row['gpuh']:.1f}",
        )
    console.print(table)
    truth = result.gpu_truth
    console.print(
        f"  Fleet energy {truth['energy_j'].sum() / 3.6e6:.1f} kWh = idle "
        f"{truth['idle_j'].sum() / 3.6e6:.1f} + dynamic {truth['dynamic_j'].sum() / 3.6e6:.1f} kWh "
        f"(requests: {requests['true_energy_j'].sum() / 3.6e6:.1f} kWh)"
    )
    if requests.height == 0:
        raise InputError("simulation produced no requests: raise --rate or --hours")
