"""Telemetry domain: DCGM samples from Prometheus into hourly files in the lake."""

from __future__ import annotations

import dagster as dg

from pipelines.defs.telemetry.assets import gpu_telemetry_raw
from pipelines.defs.telemetry.checks import telemetry_coverage_per_gpu
from pipelines.defs.telemetry.schedules import telemetry_hourly_schedule, telemetry_ingest_job

__all__ = [
    "definitions",
    "gpu_telemetry_raw",
    "telemetry_coverage_per_gpu",
    "telemetry_hourly_schedule",
    "telemetry_ingest_job",
]


def definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[gpu_telemetry_raw],
        asset_checks=[telemetry_coverage_per_gpu],
        jobs=[telemetry_ingest_job],
        schedules=[telemetry_hourly_schedule],
    )
