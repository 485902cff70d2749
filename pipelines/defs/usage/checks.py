"""Checks on `usage_events_raw`, computed from what the lake holds for the run's hours.

Both read the hour's files, not the asset's return value: `events.parquet` and
`quarantine.parquet` row counts (and the quarantine reasons), and from `_manifest.json`
the duplicate count (duplicates are dropped, so only the manifest knows them). A
manifest that disagrees with its files, or an hour of the window that was never built,
fails both checks.

- `usage_duplicate_rate` (WARN, threshold 5 %): duplicates / (events + duplicates +
  conflicting copies). Redelivered copies are expected (producer retries, consumer
  replays) and deduplication keeps the data correct, so this only warns; above a few
  percent the producers or the gateway are retrying far more than they should.
- `usage_quarantine_rate` (ERROR, blocking, threshold 1 %): (quarantined + conflicting
  copies) / every copy. Quarantined events are not billed, so above 1 % revenue is at
  stake (an unknown tenant, a broken producer): downstream assets of the run wait.

Thresholds are check config (`max_rate`), so a run can tighten or relax them. A check
launched without a partition (from the UI) covers the newest 24 built hours.
"""

from datetime import datetime
from typing import Any

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
from pydantic import Field

from ingest.lake import Lake, hour_key, parse_hour_key
from ingest.settings import Settings
from ingest.usage_hours import hours_between, read_manifest
from pipelines.defs.partitions import run_window
from pipelines.defs.resources import GpuledgerSettings, KafkaResource, resolve_settings
from pipelines.defs.usage.assets import usage_events_raw

__all__ = [
    "DUPLICATE_RATE_WARN",
    "FALLBACK_HOURS",
    "QUARANTINE_RATE_ERROR",
    "describe",
    "evaluate_rate",
    "usage_duplicate_rate",
    "usage_hour_stats",
    "usage_quarantine_rate",
]

#: Above this share of duplicate copies in an hour, warn.
DUPLICATE_RATE_WARN = 0.05
#: Above this share of quarantined copies in an hour, fail (blocking).
QUARANTINE_RATE_ERROR = 0.01
#: Hours covered by a check run without a partition.
FALLBACK_HOURS = 24

_STATS_SCHEMA = pl.Schema(
    {
        "hour_start": pl.Datetime("us", "UTC"),
        "built": pl.Boolean(),
        "events": pl.Int64(),
        "duplicates": pl.Int64(),
        "conflicts": pl.Int64(),
        "quarantined": pl.Int64(),
        "consistent": pl.Boolean(),
        "duplicate_rate": pl.Float64(),
        "quarantine_rate": pl.Float64(),
    }
)


def _built_hours(lake: Lake, topic: str) -> list[datetime]:
    directory = lake.usage_topic_dir(topic)
    if not directory.is_dir():
        return []
    return sorted(
        parse_hour_key(p.parent.name.removeprefix("hour="))
        for p in directory.glob("hour=*/_manifest.json")
    )


def usage_hour_stats(settings: Settings, hours: list[datetime] | None) -> pl.DataFrame:
    """Per hour (None: the newest `FALLBACK_HOURS` built): counts from the lake's files."""
    lake = Lake(settings.lake_path)
    topic = settings.kafka.topic
    if hours is None:
        hours = _built_hours(lake, topic)[-FALLBACK_HOURS:]
    rows: list[dict[str, Any]] = []
    for hour in hours:
        directory = lake.usage_hour_dir(topic, hour)
        manifest = read_manifest(directory / "_manifest.json")
        events_path = directory / "events.parquet"
        quarantine_path = directory / "quarantine.parquet"
        if manifest is None or not events_path.is_file() or not quarantine_path.is_file():
            rows.append({"hour_start": hour, "built": False, "consistent": False})
            continue
        events = pq.read_metadata(events_path).num_rows
        reasons = pq.read_table(quarantine_path, columns=["reason"]).column("reason")
        conflicts = sum(1 for r in reasons.to_pylist() if r == "conflicting_duplicate")
        quarantined = len(reasons) - conflicts
        duplicates = int(manifest.get("duplicates", 0))
        consistent = (
            manifest.get("events") == events
            and manifest.get("conflicts") == conflicts
            and manifest.get("quarantined") == quarantined
        )
        copies = events + duplicates + conflicts
        rows.append(
            {
                "hour_start": hour,
                "built": True,
                "events": events,
                "duplicates": duplicates,
                "conflicts": conflicts,
                "quarantined": quarantined,
                "consistent": consistent,
                "duplicate_rate": duplicates / copies if copies else 0.0,
                "quarantine_rate": (
                    (conflicts + quarantined) / (copies + quarantined)
                    if copies + quarantined
                    else 0.0
                ),
            }
        )
    return pl.DataFrame(rows, schema=_STATS_SCHEMA)


def evaluate_rate(stats: pl.DataFrame, column: str, max_rate: float) -> tuple[bool, dict[str, Any]]:
    """Passed, and metadata: every hour built and consistent, `column` <= max_rate."""
    unbuilt = stats.filter(~pl.col("built"))
    inconsistent = stats.filter(pl.col("built") & ~pl.col("consistent"))
    over = stats.filter(pl.col("built") & (pl.col(column) > max_rate))
    passed = stats.height > 0 and not (unbuilt.height or inconsistent.height or over.height)
    built = stats.filter(pl.col("built"))
    worst = built.sort(column, descending=True).head(1)
    metadata: dict[str, Any] = {
        "threshold": max_rate,
        "hours_checked": stats.height,
        f"max_{column}": float(worst[column][0]) if worst.height else 0.0,
        "worst_hour": hour_key(worst["hour_start"][0]) if worst.height else "",
        "hours_over_threshold": over.height,
        "hours_not_built": dg.MetadataValue.json(
            [hour_key(h) for h in unbuilt["hour_start"].to_list()]
        ),
        "hours_inconsistent": dg.MetadataValue.json(
            [hour_key(h) for h in inconsistent["hour_start"].to_list()]
        ),
        "per_hour": dg.MetadataValue.md(_markdown(stats, column)),
    }
    return passed, metadata


def _markdown(stats: pl.DataFrame, column: str) -> str:
    lines = [
        f"| hour | events | duplicates | conflicts | quarantined | {column} | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in stats.iter_rows(named=True):
        if not row["built"]:
            lines.append(f"| {hour_key(row['hour_start'])} | | | | | | not built |")
            continue
        note = "" if row["consistent"] else "manifest disagrees with files"
        lines.append(
            f"| {hour_key(row['hour_start'])} | {row['events']} | {row['duplicates']} | "
            f"{row['conflicts']} | {row['quarantined']} | {row[column]:.4%} | {note} |"
        )
    return "\n".join(lines)


def _hours(context: dg.AssetCheckExecutionContext) -> list[datetime] | None:
    window = run_window(context)
    if window is None:
        return None
    return hours_between(*window)


def describe(passed: bool, column: str, max_rate: float, metadata: dict[str, Any]) -> str:
    """One line for the UI: the verdict and why."""
    hours = metadata["hours_checked"]
    if passed:
        return f"{column} at most {max_rate:.2%} in all {hours} hours"
    reasons = []
    if metadata["hours_over_threshold"]:
        reasons.append(
            f"{metadata['hours_over_threshold']} hours above {max_rate:.2%} "
            f"(worst {metadata[f'max_{column}']:.2%} at {metadata['worst_hour']})"
        )
    not_built = len(metadata["hours_not_built"].value)
    if not_built:
        reasons.append(f"{not_built} hours not built")
    inconsistent = len(metadata["hours_inconsistent"].value)
    if inconsistent:
        reasons.append(f"{inconsistent} hours whose manifest disagrees with their files")
    if not hours:
        reasons.append("no hours built")
    return f"{column}: " + "; ".join(reasons)


class DuplicateRateConfig(dg.Config):
    max_rate: float = Field(default=DUPLICATE_RATE_WARN, ge=0, le=1)


class QuarantineRateConfig(dg.Config):
    max_rate: float = Field(default=QUARANTINE_RATE_ERROR, ge=0, le=1)


@dg.asset_check(asset=usage_events_raw)
def usage_duplicate_rate(
    context: dg.AssetCheckExecutionContext,
    config: DuplicateRateConfig,
    gpuledger: GpuledgerSettings,
    kafka: KafkaResource,
) -> dg.AssetCheckResult:
    """Duplicate copies per hour at most 5 % (WARN): redeliveries are deduplicated, but
    many of them mean a producer retrying far too often."""
    stats = usage_hour_stats(resolve_settings(gpuledger, kafka), _hours(context))
    passed, metadata = evaluate_rate(stats, "duplicate_rate", config.max_rate)
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        description=describe(passed, "duplicate_rate", config.max_rate, metadata),
    )


@dg.asset_check(asset=usage_events_raw, blocking=True)
def usage_quarantine_rate(
    context: dg.AssetCheckExecutionContext,
    config: QuarantineRateConfig,
    gpuledger: GpuledgerSettings,
    kafka: KafkaResource,
) -> dg.AssetCheckResult:
    """Quarantined copies (invalid or conflicting) per hour at most 1 % (ERROR,
    blocking): quarantined events are not billed."""
    stats = usage_hour_stats(resolve_settings(gpuledger, kafka), _hours(context))
    passed, metadata = evaluate_rate(stats, "quarantine_rate", config.max_rate)
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
        description=describe(passed, "quarantine_rate", config.max_rate, metadata),
    )
