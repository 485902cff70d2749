"""Assurance domain: usage events reconciled against Triton's own request counters.

`assurance_job` builds `triton_reconciliation` for an hour (with its check
`triton_counts_match`); `assurance_hourly_schedule` runs it at minute 40 of every hour
for the hour the usage schedule built at minute 20 (the newest hour past the lateness
watermark, read from the settings at each tick).
"""

from datetime import UTC, datetime

import dagster as dg

from pipelines.defs.assurance.assets import triton_reconciliation
from pipelines.defs.assurance.checks import triton_counts_match
from pipelines.defs.partitions import PARTITIONS_START, hour_partition_key
from pipelines.defs.resources import GpuledgerSettings
from pipelines.defs.usage.schedules import hour_due

__all__ = [
    "ASSURANCE_SCHEDULE_CRON",
    "assurance_hourly_schedule",
    "assurance_job",
    "definitions",
    "triton_counts_match",
    "triton_reconciliation",
]

#: 20 minutes after the usage schedule, which builds the same hour.
ASSURANCE_SCHEDULE_CRON = "40 * * * *"

assurance_job = dg.define_asset_job(
    "assurance_job",
    selection=dg.AssetSelection.assets(triton_reconciliation),
    description="Reconcile an hour's usage events against Triton's request counters "
    "(with the check triton_counts_match).",
)


@dg.schedule(
    name="assurance_hourly_schedule",
    cron_schedule=ASSURANCE_SCHEDULE_CRON,
    job=assurance_job,
    execution_timezone="UTC",
    description="Reconcile the hour the usage schedule built (newest past its watermark).",
)
def assurance_hourly_schedule(
    context: dg.ScheduleEvaluationContext, gpuledger: GpuledgerSettings
) -> dg.RunRequest | dg.SkipReason:
    settings = gpuledger.settings()
    at = context.scheduled_execution_time or datetime.now(UTC)
    hour = hour_due(at, settings.ingest.lateness_watermark_s)
    if hour < PARTITIONS_START:
        return dg.SkipReason(f"hour {hour.isoformat()} is before the first partition")
    key = hour_partition_key(hour)
    return dg.RunRequest(run_key=f"assurance-hour:{key}", partition_key=key)


def definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[triton_reconciliation],
        asset_checks=[triton_counts_match],
        jobs=[assurance_job],
        schedules=[assurance_hourly_schedule],
    )
