"""What starts usage runs: the hourly schedule and the late-events sensor.

`usage_hourly_schedule` ticks at minute 20 of every hour and builds the newest hour
whose lateness watermark has passed: the latest hour H with
H + 1 h + `ingest.lateness_watermark_s` <= the tick time. The watermark is read from
the settings at each tick (not at import), so changing it needs no code change; the
default 900 s builds the hour that ended 20 minutes before (5 minutes after its
watermark). One tick, one hour, keyed by the hour (a re-evaluated tick is deduplicated).

`usage_late_events_sensor` asks the lake for built hours that have events which
landed after they were built (`late_events`) and requests a rebuild of each; the run
key carries the hour, when it was built and the late count, so a rebuild happens once
per new batch of late events. Late events land when any usage run catches
consumption up (every run consumes all partitions), so they are seen within the hour.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from ingest.lake import Lake
from ingest.settings import Settings
from ingest.usage_hours import late_events, read_manifest
from pipelines.defs.partitions import PARTITIONS_START, hour_partition_key
from pipelines.defs.resources import GpuledgerSettings, KafkaResource, resolve_settings
from pipelines.defs.usage.assets import usage_events_raw

__all__ = [
    "USAGE_SCHEDULE_CRON",
    "hour_due",
    "late_run_requests",
    "usage_hourly_schedule",
    "usage_ingest_job",
    "usage_late_events_sensor",
]

USAGE_SCHEDULE_CRON = "20 * * * *"

usage_ingest_job = dg.define_asset_job(
    "usage_ingest_job",
    selection=dg.AssetSelection.assets(usage_events_raw),
    description="Consume usage events and build their hours (with the usage checks).",
)


def hour_due(at: datetime, watermark_s: float) -> datetime:
    """The newest hour whose end + watermark is at or before `at`."""
    latest = at.astimezone(UTC) - timedelta(hours=1, seconds=watermark_s)
    return latest.replace(minute=0, second=0, microsecond=0)


@dg.schedule(
    name="usage_hourly_schedule",
    cron_schedule=USAGE_SCHEDULE_CRON,
    job=usage_ingest_job,
    execution_timezone="UTC",
    description="Build the newest hour whose lateness watermark has passed.",
)
def usage_hourly_schedule(
    context: dg.ScheduleEvaluationContext, gpuledger: GpuledgerSettings
) -> dg.RunRequest | dg.SkipReason:
    settings = gpuledger.settings()
    at = context.scheduled_execution_time or datetime.now(UTC)
    hour = hour_due(at, settings.ingest.lateness_watermark_s)
    if hour < PARTITIONS_START:
        return dg.SkipReason(f"hour {hour.isoformat()} is before the first partition")
    key = hour_partition_key(hour)
    return dg.RunRequest(run_key=f"usage-hour:{key}", partition_key=key)


def late_run_requests(settings: Settings) -> list[dg.RunRequest]:
    """A rebuild request per built hour that has late events."""
    topic = settings.kafka.topic
    lake = Lake(settings.lake_path)
    requests = []
    for hour, count in late_events(settings, topic=topic).iter_rows():
        if hour < PARTITIONS_START:
            continue
        manifest = read_manifest(lake.usage_hour_dir(topic, hour) / "_manifest.json") or {}
        built_at = manifest.get("materialized_at", "")
        key = hour_partition_key(hour)
        requests.append(
            dg.RunRequest(
                run_key=f"usage-late:{topic}:{key}:built={built_at}:late={count}",
                partition_key=key,
                tags={"gpuledger/late_events": str(count)},
            )
        )
    return requests


@dg.sensor(
    name="usage_late_events_sensor",
    job=usage_ingest_job,
    minimum_interval_seconds=300,
    description="Rebuild usage hours that have events which landed after they were built.",
)
def usage_late_events_sensor(
    context: dg.SensorEvaluationContext, gpuledger: GpuledgerSettings, kafka: KafkaResource
) -> dg.SensorResult | dg.SkipReason:
    requests = late_run_requests(resolve_settings(gpuledger, kafka))
    if not requests:
        return dg.SkipReason("no built hour has late events")
    context.log.info(
        f"late events in {len(requests)} hours: "
        + ", ".join(str(r.partition_key) for r in requests)
    )
    return dg.SensorResult(run_requests=requests)
