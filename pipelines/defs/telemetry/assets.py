"""`gpu_telemetry_raw`: DCGM samples from Prometheus, one file per hour, as scraped.

A run covers its partition window (one hour, or a single-run backfill's range): it
pulls the window's hours (`pull_telemetry`: range vectors, so gaps stay visible;
resets, gaps, repeats and DCGM placeholders marked), then refreshes the DuckDB catalog
views. Each hour's file is replaced atomically, so re-running is idempotent.
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from ingest.catalog import ensure_catalog
from ingest.settings import Settings
from ingest.telemetry import HourReport, TelemetryPullReport, pull_telemetry
from pipelines.defs.partitions import hour_partition_key, hourly_asset
from pipelines.defs.resources import GpuledgerSettings, PrometheusResource, resolve_settings

__all__ = [
    "TelemetryWindowResult",
    "gpu_telemetry_raw",
    "ingest_telemetry_window",
    "telemetry_hour_metadata",
    "telemetry_run_metadata",
]


@dataclass(frozen=True)
class TelemetryWindowResult:
    pulled: TelemetryPullReport
    warehouse: Path


def ingest_telemetry_window(
    settings: Settings, start: datetime, end: datetime
) -> TelemetryWindowResult:
    """Pull the DCGM samples of `[start, end)` into the lake; refresh the catalog."""
    pulled = pull_telemetry(settings, start, end)
    return TelemetryWindowResult(pulled=pulled, warehouse=ensure_catalog(settings))


def telemetry_hour_metadata(report: HourReport) -> dict[str, Any]:
    """One hour's figures, for its partition's materialization."""
    metadata: dict[str, Any] = {
        "dagster/row_count": report.rows,
        "gpus": report.gpus,
        "rows": report.rows,
        "samples": report.samples,
        "placeholder_samples": report.placeholder_samples,
        "counter_resets": report.counter_resets,
        "gaps": report.gaps,
        "repeated": report.repeated,
        "complete": report.complete,
        "queries": report.queries,
    }
    if report.max_gap_s is not None:
        metadata["max_gap_s"] = float(report.max_gap_s)
    if report.warnings:
        metadata["hour_warnings"] = dg.MetadataValue.json(list(report.warnings))
    return metadata


def telemetry_run_metadata(result: TelemetryWindowResult) -> dict[str, Any]:
    """The run's figures (the whole window), recorded on each of its partitions."""
    pulled = result.pulled
    metadata: dict[str, Any] = {
        "prometheus_url": pulled.prometheus_url,
        "window_start": pulled.start.isoformat(),
        "window_end": pulled.end.isoformat(),
        "window_hours": len(pulled.hours),
        "window_gpus": pulled.gpus,
        "window_rows": pulled.rows,
        "window_samples": pulled.samples,
        "window_placeholder_samples": pulled.placeholder_samples,
        "window_counter_resets": pulled.counter_resets,
        "window_gaps": pulled.gaps,
        "window_empty_hours": len(pulled.empty_hours),
        "pull_seconds": round(pulled.elapsed_s, 3),
        "warehouse": dg.MetadataValue.path(str(result.warehouse)),
    }
    if pulled.warnings:
        metadata["warnings"] = dg.MetadataValue.json(list(pulled.warnings))
    return metadata


@hourly_asset(group_name="ingest", kinds={"prometheus", "duckdb"})
def gpu_telemetry_raw(
    context: dg.AssetExecutionContext,
    gpuledger: GpuledgerSettings,
    prometheus: PrometheusResource,
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    """DCGM samples per GPU per scrape, per hour, with counter resets, gaps, repeated
    collections and placeholders marked: `raw.gpu_telemetry` in the warehouse."""
    settings = resolve_settings(gpuledger, prometheus=prometheus)
    window = context.partition_time_window
    result = ingest_telemetry_window(
        settings, window.start.astimezone(UTC), window.end.astimezone(UTC)
    )
    for report in result.pulled.hours:
        context.add_asset_metadata(
            telemetry_hour_metadata(report), partition_key=hour_partition_key(report.hour_start)
        )
    for warning in result.pulled.warnings:
        context.log.warning(warning)
    return dg.MaterializeResult(metadata=telemetry_run_metadata(result))
