"""`gpuledger demo-live`: real Triton traffic, metered, measured and billed within minutes.

1. the local stack (Kafka, Prometheus), as `gpuledger demo` uses it;
2. a live fleet (`pipelines.live_fleet`): a real Triton server with the demo LLM, the
   metering gateway with three tenants' keys, and a DCGM simulator whose GPU power
   follows the requests in flight, scraped by Prometheus with Triton's own metrics;
3. a load generator replaying the bundled Mooncake trace through the gateway;
4. the hourly pipeline on the live data, as a provisional run of the hour in progress
   (Dagster: ingest, allocation with dbt, revenue assurance against Triton's
   counters), then the month's draft invoices.

Its own state lives in `<state_dir>/live` (lake, warehouse, keys, spool, invoices), so
it never mixes with `gpuledger demo`'s simulated day; Kafka and Prometheus are shared.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from ingest.catalog import connect
from ingest.load import LoadReport, PlannedRequest, RequestResult, plan_from_trace, run_load
from ingest.settings import Settings
from ingest.stack import LocalStack
from pipelines.cli.app import app, state
from pipelines.cli.progress import StepProgress
from pipelines.cli.simulate import console
from pipelines.live_fleet import DEMO_MODEL, LiveFleet, live_fleet, live_rate_card_text

LIVE_TOPIC = "gpuledger.usage.v1.live"


def live_settings(settings: Settings, stack: LocalStack) -> Settings:
    """The live demo's settings: its own state under `<state_dir>/live`, the stack's
    Kafka and Prometheus."""
    bootstrap, prometheus = stack.kafka_bootstrap(), stack.prometheus_url()
    return settings.model_copy(
        update={
            "state_dir": settings.state_dir / "live",
            "kafka": settings.kafka.model_copy(
                update={"bootstrap_servers": bootstrap, "topic": LIVE_TOPIC}
            ),
            "prometheus": settings.prometheus.model_copy(update={"url": prometheus}),
            "duckdb_path": None,
            "lake_dir": None,
        }
    )


@app.command("demo-live")
def demo_live_command(
    ctx: typer.Context,
    duration: Annotated[
        float, typer.Option(min=5, max=3600, help="Seconds of trace to replay.")
    ] = 60.0,
    speed: Annotated[float, typer.Option(min=0.01, help="Replay speed (x real time).")] = 1.0,
    token_scale: Annotated[
        float,
        typer.Option(min=0.001, max=1.0, help="Scale the trace's token counts (CPU-sized)."),
    ] = 0.1,
    decode_ms: Annotated[
        float, typer.Option(min=0, help="The demo model's time per output token (ms).")
    ] = 20.0,
) -> None:
    """Triton + metering gateway + live DCGM + Prometheus + trace load; then bill it."""
    settings = state(ctx).settings()
    stack = LocalStack(settings)
    console.rule("[bold]1. Local stack")
    for service in stack.up():
        console.print(f"  {service.name}: {service.url}")
    run_live_demo(
        settings,
        stack,
        duration_s=duration,
        speed=speed,
        token_scale=token_scale,
        decode_s_per_token=decode_ms / 1000,
        first_step=2,
    )


def note_replaced_topic(settings: Settings) -> None:
    """The demo's Kafka keeps topics in memory: after `stack down` the topic is a new one
    (a new id, offsets from 0) that ingest refuses to read on from the old offsets. The
    demo owns its lake, so it sets the old topic's landing aside and says so."""
    from ingest.usage_consumer import set_aside_landing_of_a_replaced_topic

    moved = set_aside_landing_of_a_replaced_topic(settings, settings.kafka.topic)
    if moved is not None:
        console.print(
            f"  Kafka's topic {settings.kafka.topic} is a new one since the last demo (the "
            f"stack restarted): the old topic's landing files moved to {moved}"
        )


def run_live_demo(
    settings: Settings,
    stack: LocalStack,
    *,
    duration_s: float = 60.0,
    speed: float = 1.0,
    token_scale: float = 0.1,
    decode_s_per_token: float = 0.02,
    first_step: int = 1,
) -> None:
    """Steps 2-4 of the module docstring, on a running local stack."""
    steps = iter(range(first_step, first_step + 10))
    live = live_settings(settings, stack)
    live.state_dir.mkdir(parents=True, exist_ok=True)
    work = live.state_dir / "fleet"
    console.rule(f"[bold]{next(steps)}. Live: Triton, the metering gateway, live DCGM telemetry")
    with live_fleet(live, work, stack=stack, decode_s_per_token=decode_s_per_token) as fleet:
        live = fleet.settings
        console.print(
            f"  Triton {fleet.triton.grpc_url} (gRPC), metrics {fleet.triton.metrics_url}"
        )
        console.print(f"  gateway {fleet.gateway_url} (OpenAI API), spool {live.spool_path}")
        console.print(
            f"  DCGM exporter {fleet.exporter.url}/metrics, GPUs {fleet.server.gpu_uuids}"
        )
        tenant, key = next(iter(fleet.keys.items()))
        console.print(
            f"  try it while the load runs (key of tenant {tenant}, shown once):\n"
            f"    curl -s {fleet.gateway_url}/v1/chat/completions -H 'Authorization: Bearer "
            f'{key}\' -d \'{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", '
            f'"content": "hello"}}], "max_tokens": 8}}\''
        )
        with StepProgress(console) as progress:
            progress.run("waiting for Prometheus to scrape the fleet", fleet.wait_scraped)
        console.rule(f"[bold]{next(steps)}. Live: replay the Mooncake trace through the gateway")
        plan = plan_from_trace(
            list(fleet.keys), duration_s=duration_s, speed=speed, token_scale=token_scale
        )
        report = _replay(fleet.gateway_url, plan, fleet.keys, fleet)
        _print_load(report)
        with StepProgress(console) as progress:
            progress.run("delivering the spooled usage events to Kafka", fleet.drain)
            progress.run(
                "waiting for the last scrape of telemetry and counters", fleet.wait_scraped
            )
        counters = fleet.gateway.forwarder.counters()
        console.print(f"  forwarder: {counters['forwarded']} events to {LIVE_TOPIC}")
        server_name = fleet.server.server_name
    _bill(live, report, next(steps), server_name)


def _replay(
    url: str, plan: list[PlannedRequest], keys: dict[str, str], fleet: LiveFleet
) -> LoadReport:
    done = threading.Event()
    results: list[LoadReport] = []
    with StepProgress(console) as progress:
        advance = progress.counter(f"{len(plan)} requests over {plan[-1].at_s:.0f} s", len(plan))

        def on_result(_result: RequestResult) -> None:
            advance(1)

        def work() -> None:
            results.append(run_load(url, plan, keys, model=DEMO_MODEL, on_result=on_result))
            done.set()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        # GPU power follows what is in flight: sample it while the load runs.
        samples: list[tuple[int, float]] = []
        activity = fleet.gateway.app.state.activity
        while not done.wait(0.5):
            by_gpu = activity.inflight_by_gpu()
            power = sum(
                fleet.exporter.power_w(u, by_gpu.get(u, 0.0)) for u in fleet.server.gpu_uuids
            )
            samples.append((activity.inflight(), power))
        thread.join()
    if samples:
        mean_w = sum(p for _, p in samples) / len(samples)
        peak_w = max(p for _, p in samples)
        idle_w = fleet.exporter.power_w(fleet.server.gpu_uuids[0], 0.0)
        console.print(
            f"  in flight: peak {max(n for n, _ in samples)}; GPU power: mean {mean_w:.0f} W, "
            f"peak {peak_w:.0f} W (idle {idle_w:.0f} W)"
        )
    return results[0]


def _print_load(report: LoadReport) -> None:
    failed = [r for r in report.results if r.status_code != 200 or r.error]
    table = Table(title="What the clients got", title_justify="left")
    for column in ("tenant", "requests", "prompt tokens", "completion tokens"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for tenant, (n, p, c) in sorted(report.by_tenant().items()):
        table.add_row(tenant, f"{n:,}", f"{p:,}", f"{c:,}")
    console.print(table)
    latencies = sorted(r.latency_s for r in report.ok)
    if latencies:
        console.print(
            f"  {len(report.ok)} ok, {len(failed)} failed in {report.elapsed_s:.0f} s; "
            f"latency p50 {latencies[len(latencies) // 2]:.2f} s"
        )


def _bill(live: Settings, report: LoadReport, step: int, server_name: str) -> None:
    from pipelines.materialize import (
        materialize_allocation,
        materialize_assurance,
        materialize_ingest,
    )
    from pipelines.materialize_billing import materialize_invoices

    ended = report.ok
    now = datetime.now(UTC)
    start = (now - timedelta(seconds=report.elapsed_s + 120)).replace(
        minute=0, second=0, microsecond=0
    )
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    console.rule(f"[bold]{step}. Live: the hourly pipeline on the live data (provisional)")
    if not live.rate_card_path.exists():
        live.rate_card_path.write_text(live_rate_card_text())
    note_replaced_topic(live)
    with StepProgress(console) as progress:
        runs = [
            progress.run(
                "ingest usage and telemetry",
                lambda: materialize_ingest(live, start, end, provisional=True),
            ),
            progress.run(
                "allocate energy and GPU-seconds (dbt)",
                lambda: materialize_allocation(live, start, end, provisional=True),
            ),
            progress.run(
                "reconcile against Triton's counters",
                lambda: materialize_assurance(live, start, end, provisional=True),
            ),
            progress.run(
                "draft the month's invoices",
                lambda: materialize_invoices(live, f"{start:%Y-%m}", efficiency=False),
            ),
        ]
    for label, run in zip(("ingest", "allocation", "assurance", "invoices"), runs, strict=True):
        failed = [c for c in run.checks if not c.passed]
        console.print(
            f"  {label}: run {run.run_id[:8]} {'succeeded' if run.success else 'FAILED'}, "
            f"{len(run.checks) - len(failed)} of {len(run.checks)} checks passed"
        )
        for check in failed:
            console.print(f"    check {check.name} failed ({check.severity}): {check.description}")
            if check.name == "telemetry_coverage_per_gpu":
                console.print("    (expected in a provisional run: the hour is not over yet)")
    with connect(live) as con:
        rows = con.sql(
            """
            SELECT tenant, count(*) AS requests, sum(prompt_tokens) AS prompt,
                   sum(completion_tokens) AS completion, sum(energy_j) AS energy_j
            FROM marts.fct_request_allocation
            WHERE model = $model AND arrival_ts >= $start
            GROUP BY tenant ORDER BY tenant
            """,
            params={"model": DEMO_MODEL, "start": start},
        ).fetchall()
        recon = con.sql(
            "SELECT server, model, hour_start, events, triton_requests, difference, flagged "
            "FROM assurance.triton_reconciliation WHERE hour_start >= $start ORDER BY hour_start",
            params={"start": start},
        ).fetchall()
    table = Table(title="Metered, measured, allocated (the hour so far)", title_justify="left")
    for column in (
        "tenant",
        "requests",
        "prompt tokens",
        "completion tokens",
        "energy J",
        "J/output token",
    ):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for tenant, n, p, c, e in rows:
        table.add_row(
            tenant, f"{n:,}", f"{p:,}", f"{c:,}", f"{e:,.1f}", f"{e / c:.3f}" if c else "-"
        )
    console.print(table)
    table = Table(
        title="Revenue assurance: usage events against Triton's counters", title_justify="left"
    )
    for column in ("server", "model", "hour", "events", "Triton", "difference", "flagged"):
        table.add_column(column)
    for server, model, hour, events, triton, diff, flagged in recon:
        table.add_row(
            server,
            model,
            f"{hour:%Y-%m-%d %H:00}",
            str(events),
            str(triton),
            f"{diff:+d}",
            "yes" if flagged else "",
        )
    console.print(table)
    if any(flagged and server != server_name for server, *_, flagged in recon):
        console.print(
            f"  This run's server is {server_name}. Flagged rows of other servers are earlier "
            "live demos in this hour whose events left with a topic the stack lost when it "
            "restarted (their landing files are set aside in the lake): Triton counted "
            "them, this lake's topic has none."
        )
    drafts = live.invoices_path / "draft" / f"{start:%Y-%m}"
    console.print(
        f"  {len(ended)} requests metered; draft invoices in {drafts}\n"
        "  The run was provisional: after the hour ends, the scheduled run replaces it.\n"
        f"  Warehouse for SQL: {live.warehouse_path}"
    )
