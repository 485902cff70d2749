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

#: What `usage_events_raw` writes beside the events, read by dbt's data-quality mart:
#: declared so the dbt sources that name them are known, not unresolved, assets.
USAGE_SIDE_TABLES = (
    dg.AssetSpec(
        ["raw", "usage_quarantine"],
        deps=[usage_events_raw],
        group_name="usage",
        description="Quarantined usage records per hour (written by usage_events_raw).",
    ),
    dg.AssetSpec(
        ["raw", "usage_hours"],
        deps=[usage_events_raw],
        group_name="usage",
        description="The manifest of each built usage hour (written by usage_events_raw).",
    ),
)

__all__ = [
    "USAGE_SIDE_TABLES",
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
        assets=[usage_events_raw, *USAGE_SIDE_TABLES],
        asset_checks=[usage_duplicate_rate, usage_quarantine_rate],
        jobs=[usage_ingest_job],
        schedules=[usage_hourly_schedule],
        sensors=[usage_late_events_sensor],
    )
