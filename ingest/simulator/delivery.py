"""Delivering a simulation: files on disk, events to Kafka, telemetry into Prometheus.

Output directory (one per run):
- `requests.parquet` — every request: tenant, model, GPUs, tokens, status, timestamps,
  and its true dynamic energy and GPU-seconds under the simulator's physics;
- `gpu_hours.parquet` — per GPU and hour: true energy, idle and dynamic energy, busy s;
- `anomalies.parquet` — injected counter resets, missed scrapes, outages, placeholders;
- `telemetry_series.parquet`, `telemetry_samples.parquet` — the samples exactly as
  loaded into Prometheus;
- `fleet.json` and `manifest.json` — the fleet and everything needed to reproduce it.

Publishing (Python, holding the GIL) and building TSDB blocks (mostly promtool child
processes) run side by side.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ingest.endpoints import (
    check_kafka,
    check_prometheus,
    is_local_stack_prometheus,
    prometheus_url,
)
from ingest.settings import Settings
from ingest.simulator.calibration import MODELS
from ingest.simulator.events import usage_event_frame
from ingest.simulator.run import SimulationResult
from ingest.stack import LocalStack
from ingest.telemetry_backfill import BackfillReport, backfill, delete_window
from ingest.usage_consumer import register_tenants
from ingest.usage_publisher import PublishReport, publish
from models.errors import ServiceError

#: Called with the name of each step as it starts; "" marks the calling thread's
#: current step done.
StepCallback = Callable[[str], None]
CountCallback = Callable[[int], None]


@dataclass(frozen=True)
class DeliveryReport:
    out_dir: Path
    events: int
    published: PublishReport | None
    publish_s: float
    backfill: BackfillReport | None
    backfill_s: float
    blocks_dir: Path | None


def write_outputs(result: SimulationResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    result.requests.write_parquet(out_dir / "requests.parquet")
    result.gpu_truth.write_parquet(out_dir / "gpu_hours.parquet")
    result.telemetry.anomalies.write_parquet(out_dir / "anomalies.parquet")
    result.telemetry.series.write_parquet(out_dir / "telemetry_series.parquet")
    result.telemetry.samples.write_parquet(out_dir / "telemetry_samples.parquet")
    (out_dir / "fleet.json").write_text(result.fleet.spec.model_dump_json(indent=2) + "\n")
    (out_dir / "manifest.json").write_text(json.dumps(manifest(result), indent=2) + "\n")


def manifest(result: SimulationResult) -> dict[str, Any]:
    config = result.config
    return {
        "seed": config.seed,
        "window_start_ms": result.window_start_ms,
        "window_end_ms": result.window_end_ms,
        "telemetry_end_ms": result.horizon_end_ms,
        "rate_per_s": config.rate_per_s,
        "trace": str(config.trace.path) if config.trace is not None else None,
        "physics": asdict(config.physics),
        "telemetry": asdict(config.telemetry),
        "requests": result.requests.height,
        "telemetry_samples": result.telemetry.samples.height,
        "telemetry_series": result.telemetry.series.height,
        "gpus": len(result.fleet.gpus),
        "replicas": len(result.fleet.replicas),
    }


def preflight(settings: Settings, *, to_kafka: bool, to_prometheus: bool) -> str | None:
    """Fail fast, before a long simulation, if Kafka or Prometheus cannot take the output.

    Returns the Prometheus URL to backfill into (None when not loading telemetry).
    """
    if to_kafka:
        check_kafka(settings)
    if not to_prometheus:
        return None
    url = prometheus_url(settings)
    check_prometheus(settings)
    if not is_local_stack_prometheus(settings):
        raise ServiceError(
            f"cannot backfill into Prometheus at {url}: only the local stack's data "
            "directory is writable from here; use --blocks-dir DIR and move the blocks "
            "into that server's data directory"
        )
    return url


def event_payloads(result: SimulationResult) -> pl.DataFrame:
    return usage_event_frame(result.requests, {name: m.version for name, m in MODELS.items()})


def deliver(
    result: SimulationResult,
    settings: Settings,
    out_dir: Path,
    *,
    to_kafka: bool = True,
    to_prometheus: bool = True,
    blocks_dir: Path | None = None,
    on_step: StepCallback | None = None,
    on_published: CountCallback | None = None,
) -> DeliveryReport:
    """Write the run's files, publish its events and load its telemetry."""
    step = on_step or (lambda _name: None)
    step("writing files")
    write_outputs(result, out_dir)
    if to_kafka:
        # The consumer quarantines events of tenants it does not know: register ours.
        register_tenants(settings, [t.id for t in result.fleet.spec.tenants])
    step("")
    stack = LocalStack(settings)
    data_dir: Path | None = None
    url: str | None = None
    if to_prometheus and blocks_dir is None:
        url = preflight(settings, to_kafka=False, to_prometheus=True)
        data_dir = stack.prometheus_data_dir
    events = None
    if to_kafka:
        step("serialising events")
        events = event_payloads(result)

    def load_telemetry() -> tuple[BackfillReport, float]:
        began = time.perf_counter()
        target = blocks_dir if blocks_dir is not None else data_dir
        assert target is not None
        if url is not None:
            hosts = [n.hostname for n in result.fleet.spec.nodes]
            delete_window(
                url,
                hosts,
                result.window_start_ms,
                result.horizon_end_ms,
                job=result.config.telemetry.job,
            )
        report = backfill(result.telemetry, out_dir / "backfill", target, on_step=step)
        if url is not None:
            step("restarting Prometheus")
            stack.restart_prometheus()
        step("")  # this thread's last step is done
        return report, time.perf_counter() - began

    backfill_report: BackfillReport | None = None
    backfill_s = 0.0
    published: PublishReport | None = None
    publish_s = 0.0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load_telemetry) if (to_prometheus or blocks_dir) else None
        try:
            if events is not None:
                step("publishing events")
                began = time.perf_counter()
                published = publish(
                    settings,
                    events["key"].to_list(),
                    events["value"].to_list(),
                    on_progress=on_published,
                )
                publish_s = time.perf_counter() - began
                step("")
        except BaseException:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(Exception):
                    pending.result()  # let it finish; the first error is the one reported
            raise
        if pending is not None:
            backfill_report, backfill_s = pending.result()
    return DeliveryReport(
        out_dir=out_dir,
        events=result.requests.height,
        published=published,
        publish_s=publish_s,
        backfill=backfill_report,
        backfill_s=backfill_s,
        blocks_dir=blocks_dir,
    )
