"""What starts allocation runs: an hourly schedule after the ingest schedules.

`allocation_hourly_schedule` ticks at minute 40 and allocates the hour *before* the one
the usage schedule built at minute 20 of the same hour (`usage.schedules.hour_due` at 20
minutes before the tick, with the lateness watermark read from the settings at each
tick). One hour more: an hour's last slice on every GPU ends at the next hour's first
scrape, and the next hour's telemetry is only pulled at minute 5 after it ends; allocated
earlier, the last seconds of every GPU-hour would be missing and the requests in them
orphans. With the default watermark (900 s) a tick at 10:40 allocates 08:00-09:00:
usage built at 09:20, telemetry to 10:00 pulled at 10:05. A late usage rebuild
(late-events sensor) is followed by a re-allocation when the hour is asked again (a
backfill, or `gpuledger allocate`). One tick, one hour, keyed by the hour (a
re-evaluated tick is deduplicated).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg

from pipelines.defs.allocation.assets import allocation_models
from pipelines.defs.efficiency.assets import analytics_snapshot
from pipelines.defs.partitions import PARTITIONS_START, hour_partition_key
from pipelines.defs.resources import GpuledgerSettings
from pipelines.defs.usage.schedules import USAGE_SCHEDULE_CRON, hour_due

__all__ = [
    "ALLOCATION_SCHEDULE_CRON",
    "allocation_hour_due",
    "allocation_hourly_schedule",
    "allocation_job",
]

ALLOCATION_MINUTE_OF_HOUR = 40
ALLOCATION_SCHEDULE_CRON = f"{ALLOCATION_MINUTE_OF_HOUR} * * * *"
_USAGE_MINUTE_OF_HOUR = int(USAGE_SCHEDULE_CRON.split()[0])

allocation_job = dg.define_asset_job(
    "allocation_job",
    selection=dg.AssetSelection.assets(allocation_models, analytics_snapshot),
    description=(
        "dbt build of the allocation and efficiency marts for an hour (dbt tests and "
        "allocation_invariants), then a new analysts' snapshot."
    ),
)


def allocation_hour_due(at: datetime, watermark_s: float) -> datetime:
    """The hour before the one the usage schedule built at its latest tick at or before
    `at`: the newest hour whose next hour's telemetry has been pulled too."""
    at = at.astimezone(UTC)
    usage_tick = at.replace(minute=_USAGE_MINUTE_OF_HOUR, second=0, microsecond=0)
    if usage_tick > at:
        usage_tick -= timedelta(hours=1)
    return hour_due(usage_tick, watermark_s) - timedelta(hours=1)


@dg.schedule(
    name="allocation_hourly_schedule",
    cron_schedule=ALLOCATION_SCHEDULE_CRON,
    job=allocation_job,
    execution_timezone="UTC",
    description="Allocate the hour before the one the usage schedule built at minute 20.",
)
def allocation_hourly_schedule(
    context: dg.ScheduleEvaluationContext, gpuledger: GpuledgerSettings
) -> dg.RunRequest | dg.SkipReason:
    settings = gpuledger.settings()
    at = context.scheduled_execution_time or datetime.now(UTC)
    hour = allocation_hour_due(at, settings.ingest.lateness_watermark_s)
    if hour < PARTITIONS_START:
        return dg.SkipReason(f"hour {hour.isoformat()} is before the first partition")
    key = hour_partition_key(hour)
    return dg.RunRequest(run_key=f"allocation-hour:{key}", partition_key=key)
