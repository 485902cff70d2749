"""What starts telemetry runs: an hourly schedule.

`telemetry_hourly_schedule` ticks at minute 5 of every hour and pulls the hour that
ended at minute 0: by then Prometheus has scraped the hour's last samples (a scrape
is every 15 s by default), so the file is complete (`pull_telemetry` marks an hour
pulled before its end plus one scrape interval as incomplete, and a re-run replaces it).
"""

from __future__ import annotations

import dagster as dg

from pipelines.defs.telemetry.assets import gpu_telemetry_raw

__all__ = ["TELEMETRY_MINUTE_OF_HOUR", "telemetry_hourly_schedule", "telemetry_ingest_job"]

TELEMETRY_MINUTE_OF_HOUR = 5

telemetry_ingest_job = dg.define_asset_job(
    "telemetry_ingest_job",
    selection=dg.AssetSelection.assets(gpu_telemetry_raw),
    description="Pull DCGM telemetry for an hour (with the coverage check).",
)

telemetry_hourly_schedule = dg.build_schedule_from_partitioned_job(
    telemetry_ingest_job,
    name="telemetry_hourly_schedule",
    minute_of_hour=TELEMETRY_MINUTE_OF_HOUR,
    description="Pull the hour that ended five minutes ago.",
)
