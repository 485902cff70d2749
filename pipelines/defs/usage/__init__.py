"""Usage domain: Kafka usage events into hourly, deduplicated files in the lake."""

from __future__ import annotations

import dagster as dg

from pipelines.defs.usage.assets import usage_events_raw
from pipelines.defs.usage.checks import usage_duplicate_rate, usage_quarantine_rate
from pipelines.defs.usage.schedules import (
    usage_hourly_schedule,
    usage_ingest_job,
    usage_late_events_sensor,
)

__all__ = [
    "definitions",
    "usage_duplicate_rate",
    "usage_events_raw",
    "usage_hourly_schedule",
    "usage_ingest_job",
    "usage_late_events_sensor",
    "usage_quarantine_rate",
]


def definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[usage_events_raw],
        asset_checks=[usage_duplicate_rate, usage_quarantine_rate],
        jobs=[usage_ingest_job],
        schedules=[usage_hourly_schedule],
        sensors=[usage_late_events_sensor],
    )
