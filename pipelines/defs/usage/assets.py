"""`usage_events_raw`: usage events from Kafka, deduplicated into one file set per hour.

A run covers its partition window: one hour, or a range of hours when a backfill runs
as a single run (`BackfillPolicy.single_run()`). It first catches consumption up
(every Kafka partition, exactly once per record, into the landing files), then builds
the window's hours from what has landed (first copy of each event id wins, conflicts
and invalid events quarantined), then refreshes the DuckDB catalog views.

The work is in `ingest_usage_window` and the metadata builders, plain functions; the
asset is a thin wrapper.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from ingest.catalog import ensure_catalog
from ingest.settings import Settings
from ingest.usage_consumer import ConsumeReport, StopWhen, consume
from ingest.usage_hours import HourReport, materialize_usage_hours
from pipelines.defs.partitions import hour_partition_key, hourly_asset
from pipelines.defs.resources import GpuledgerSettings, KafkaResource, resolve_settings

__all__ = [
    "UsageIngestConfig",
    "UsageWindowResult",
    "ingest_usage_window",
    "usage_events_raw",
    "usage_hour_metadata",
    "usage_run_metadata",
    "watermark_warning",
]


@dataclass(frozen=True)
class UsageWindowResult:
    start: datetime
    end: datetime
    topic: str
    consumed: ConsumeReport | None  # None when consumption was left to a running consumer
    hours: list[HourReport]
    warehouse: Path
    lateness_watermark_s: float
    warning: str | None


def watermark_warning(end: datetime, watermark_s: float, now: datetime) -> str | None:
    """A warning when events for the window may still arrive (its watermark is ahead)."""
    passes_at = end + timedelta(seconds=watermark_s)
    if passes_at <= now:
        return None
    return (
        f"the lateness watermark of the window ending {end.isoformat()} passes at "
        f"{passes_at.isoformat()} ({watermark_s:.0f} s after it): events arriving until then "
        f"are late; usage_late_events_sensor requests a rebuild of their hours"
    )


def ingest_usage_window(
    settings: Settings,
    start: datetime,
    end: datetime,
    *,
    consume_idle_s: float | None = 2.0,
    now: datetime | None = None,
) -> UsageWindowResult:
    """Catch consumption up (unless `consume_idle_s` is None), build the hours of
    `[start, end)`, refresh the catalog."""
    consumed = None
    if consume_idle_s is not None:
        consumed = consume(settings, stop=StopWhen(idle_s=consume_idle_s))
    current = now or datetime.now(UTC)
    hours = materialize_usage_hours(settings, start, end, now=current)
    warehouse = ensure_catalog(settings)
    watermark_s = settings.ingest.lateness_watermark_s
    return UsageWindowResult(
        start=start,
        end=end,
        topic=settings.kafka.topic,
        consumed=consumed,
        hours=hours,
        warehouse=warehouse,
        lateness_watermark_s=watermark_s,
        warning=watermark_warning(end, watermark_s, current),
    )


def usage_hour_metadata(report: HourReport) -> dict[str, Any]:
    """One hour's figures, for its partition's materialization."""
    return {
        "dagster/row_count": report.events,
        "events": report.events,
        "duplicates": report.duplicates,
        "conflicts": report.conflicts,
        "quarantined": report.quarantined,
        "late_incorporated": report.late_incorporated,
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": report.completion_tokens,
        "duplicate_rate": round(report.duplicate_rate, 6),
        "quarantine_rate": round(report.quarantine_rate, 6),
        "watermark_passed": report.watermark_passed,
    }


def usage_run_metadata(result: UsageWindowResult) -> dict[str, Any]:
    """The run's figures (the whole window), recorded on each of its partitions."""
    hours = result.hours
    metadata: dict[str, Any] = {
        "topic": result.topic,
        "window_start": result.start.isoformat(),
        "window_end": result.end.isoformat(),
        "window_hours": len(hours),
        "window_events": sum(h.events for h in hours),
        "window_duplicates": sum(h.duplicates for h in hours),
        "window_conflicts": sum(h.conflicts for h in hours),
        "window_quarantined": sum(h.quarantined for h in hours),
        "window_late_incorporated": sum(h.late_incorporated for h in hours),
        "window_prompt_tokens": sum(h.prompt_tokens for h in hours),
        "window_completion_tokens": sum(h.completion_tokens for h in hours),
        "window_watermark_passed": all(h.watermark_passed for h in hours),
        "lateness_watermark_s": result.lateness_watermark_s,
        "warehouse": dg.MetadataValue.path(str(result.warehouse)),
    }
    if result.consumed is not None:
        consumed = result.consumed
        metadata.update(
            {
                "consumed_records": consumed.records,
                "consumed_valid": consumed.valid,
                "consumed_quarantined": consumed.quarantined,
                "consumed_files": consumed.files,
                "consume_seconds": round(consumed.seconds, 3),
                "consume_stopped_because": consumed.stopped_because,
                "consume_positions": dg.MetadataValue.json(
                    {str(p): o for p, o in sorted(consumed.positions.items())}
                ),
            }
        )
    else:
        metadata["consume_stopped_because"] = "not run (config consume=false)"
    if result.warning is not None:
        metadata["watermark_warning"] = result.warning
    return metadata


class UsageIngestConfig(dg.Config):
    consume: bool = Field(
        default=True,
        description="catch consumption up before building the hours; false where a "
        "long-running `gpuledger ingest usage --follow` lands the records",
    )
    consume_idle_s: float = Field(
        default=2.0, gt=0, description="consumption stops once caught up and idle this long"
    )


@hourly_asset(group_name="ingest", kinds={"kafka", "duckdb"})
def usage_events_raw(
    context: dg.AssetExecutionContext,
    config: UsageIngestConfig,
    gpuledger: GpuledgerSettings,
    kafka: KafkaResource,
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    """Usage events per hour, one row per event id (first copy wins), with duplicates
    counted and invalid or conflicting copies quarantined: `raw.usage_events`,
    `raw.usage_quarantine`, `raw.usage_hours` in the warehouse."""
    settings = resolve_settings(gpuledger, kafka)
    window = context.partition_time_window
    result = ingest_usage_window(
        settings,
        window.start.astimezone(UTC),
        window.end.astimezone(UTC),
        consume_idle_s=config.consume_idle_s if config.consume else None,
    )
    for report in result.hours:
        context.add_asset_metadata(
            usage_hour_metadata(report), partition_key=hour_partition_key(report.hour)
        )
    if result.warning is not None:
        context.log.warning(result.warning)
    return dg.MaterializeResult(metadata=usage_run_metadata(result))
