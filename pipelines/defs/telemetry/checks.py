"""`telemetry_coverage_per_gpu`: every GPU scraped often enough in every hour of the run.

Computed from the hour files the asset wrote (not its return value): coverage =
distinct scrape timestamps / expected scrapes (3600 / `telemetry.scrape_interval_s`),
per GPU and hour (`telemetry_coverage`). A GPU seen in the window that is missing from
an hour between its first and last hour there counts as coverage 0 for it (a whole
hour lost); an hour of the window without a file fails too (never pulled).

Threshold 0.9 (check config `min_coverage`): 10 % of an hour is six minutes without
samples, more than any scrape jitter or dcgm-exporter's repeated collections explain.
Below it, the hour's energy comes partly from the power integral across the gap
instead of the counter, so the check fails with ERROR severity and lists each GPU-hour
under the threshold. It does not block: allocation handles gaps and says so.
A check launched without a partition (from the UI) covers the newest 24 pulled hours.
"""

from datetime import datetime
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from ingest.lake import Lake, hour_key, parse_hour_key
from ingest.settings import Settings
from ingest.telemetry import telemetry_coverage
from ingest.usage_hours import hours_between
from pipelines.defs.partitions import run_window
from pipelines.defs.resources import GpuledgerSettings, resolve_settings
from pipelines.defs.telemetry.assets import gpu_telemetry_raw

__all__ = [
    "FALLBACK_HOURS",
    "MIN_COVERAGE",
    "coverage_of_hours",
    "evaluate_coverage",
    "telemetry_coverage_per_gpu",
]

#: A GPU-hour with fewer scrapes than this share of the expected ones fails.
MIN_COVERAGE = 0.9
#: Hours covered by a check run without a partition.
FALLBACK_HOURS = 24

#: The columns of the hour files that coverage needs.
_SAMPLE_SCHEMA = pl.Schema(
    {
        "gpu_key": pl.String(),
        "hour_start": pl.Datetime("us", "UTC"),
        "ts": pl.Datetime("us", "UTC"),
        "placeholder_metrics": pl.List(pl.String()),
        "counter_reset": pl.Boolean(),
        "gap": pl.Boolean(),
        "gap_before_s": pl.Float64(),
    }
)
_HOLE_SCHEMA = pl.Schema({"gpu_key": pl.String(), "hour_start": pl.Datetime("us", "UTC")})


def _pulled_hours(lake: Lake) -> list[datetime]:
    root = lake.telemetry_samples
    if not root.is_dir():
        return []
    return sorted(
        parse_hour_key(p.parent.name.removeprefix("hour="))
        for p in root.glob("hour=*/samples.parquet")
    )


def coverage_of_hours(
    settings: Settings, hours: list[datetime] | None
) -> tuple[pl.DataFrame, list[datetime]]:
    """Coverage per GPU and hour (holes as 0), and the hours that have no file."""
    lake = Lake(settings.lake_path)
    if hours is None:
        hours = _pulled_hours(lake)[-FALLBACK_HOURS:]
    frames = []
    missing = []
    for hour in hours:
        path = lake.telemetry_hour_dir(hour) / "samples.parquet"
        if path.is_file():
            frames.append(pl.read_parquet(path, columns=list(_SAMPLE_SCHEMA)))
        else:
            missing.append(hour)
    interval_s = settings.telemetry.scrape_interval_s
    frame = pl.concat(frames) if frames else pl.DataFrame(schema=_SAMPLE_SCHEMA)
    coverage = telemetry_coverage(frame, interval_s)
    # Whole hours lost: a GPU absent from an hour between its first and last hour here.
    present = set(coverage.select("gpu_key", "hour_start").iter_rows())
    pulled = [h for h in hours if h not in missing]
    holes = []
    for gpu_key, first, last in (
        coverage.group_by("gpu_key")
        .agg(first=pl.col("hour_start").min(), last=pl.col("hour_start").max())
        .iter_rows()
    ):
        for hour in pulled:
            if first < hour < last and (gpu_key, hour) not in present:
                holes.append({"gpu_key": gpu_key, "hour_start": hour})
    if holes:
        lost = pl.DataFrame(holes, schema=_HOLE_SCHEMA).with_columns(
            rows=pl.lit(0, pl.Int64),
            scrapes=pl.lit(0, pl.Int64),
            expected_scrapes=pl.lit(3600.0 / interval_s),
            coverage=pl.lit(0.0),
            placeholder_samples=pl.lit(0, pl.Int64),
            resets=pl.lit(0, pl.Int64),
            gaps=pl.lit(0, pl.Int64),
            max_gap_s=pl.lit(None, pl.Float64),
        )
        coverage = pl.concat([coverage, lost.select(coverage.columns)]).sort(
            "gpu_key", "hour_start"
        )
    return coverage, missing


def evaluate_coverage(
    coverage: pl.DataFrame, missing: list[datetime], min_coverage: float, hours: int
) -> tuple[bool, dict[str, Any]]:
    """Passed, and metadata naming every GPU-hour below `min_coverage`."""
    below = coverage.filter(pl.col("coverage") < min_coverage).sort("coverage", "gpu_key")
    passed = hours > 0 and not missing and below.height == 0
    lowest = coverage.sort("coverage").head(1)
    metadata: dict[str, Any] = {
        "min_coverage": min_coverage,
        "hours_checked": hours,
        "hours_without_file": dg.MetadataValue.json([hour_key(h) for h in missing]),
        "gpus_checked": coverage["gpu_key"].n_unique(),
        "gpu_hours_checked": coverage.height,
        "gpu_hours_below": below.height,
        "lowest_coverage": float(lowest["coverage"][0]) if lowest.height else 1.0,
        "lowest_gpu": f"{lowest['gpu_key'][0]} @ {hour_key(lowest['hour_start'][0])}"
        if lowest.height
        else "",
        "gpus_below": dg.MetadataValue.json(sorted(set(below["gpu_key"].to_list()))),
    }
    if below.height:
        lines = [
            "| gpu | hour | scrapes | expected | coverage | gaps | max gap (s) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in below.iter_rows(named=True):
            max_gap = "" if row["max_gap_s"] is None else f"{row['max_gap_s']:.0f}"
            lines.append(
                f"| {row['gpu_key']} | {hour_key(row['hour_start'])} | {row['scrapes']} | "
                f"{row['expected_scrapes']:.0f} | {row['coverage']:.3f} | {row['gaps']} | "
                f"{max_gap} |"
            )
        metadata["below_threshold"] = dg.MetadataValue.md("\n".join(lines))
    return passed, metadata


class CoverageConfig(dg.Config):
    min_coverage: float = Field(default=MIN_COVERAGE, ge=0, le=1)


@dg.asset_check(asset=gpu_telemetry_raw)
def telemetry_coverage_per_gpu(
    context: dg.AssetCheckExecutionContext,
    config: CoverageConfig,
    gpuledger: GpuledgerSettings,
) -> dg.AssetCheckResult:
    """Every GPU's scrapes per hour at least 90 % of the expected (ERROR, not blocking);
    per-GPU detail in the metadata."""
    settings = resolve_settings(gpuledger)
    window = run_window(context)
    hours = None if window is None else hours_between(*window)
    coverage, missing = coverage_of_hours(settings, hours)
    checked = len(hours) if hours is not None else coverage["hour_start"].n_unique()
    passed, metadata = evaluate_coverage(coverage, missing, config.min_coverage, checked)
    below = metadata["gpu_hours_below"]
    description = (
        f"every GPU at or above {config.min_coverage:.0%} coverage in {checked} hours"
        if passed
        else f"{below} GPU-hours below {config.min_coverage:.0%} coverage"
        + (f"; {len(missing)} hours without a file" if missing else "")
        + ("; no hours pulled" if checked == 0 else "")
    )
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
        description=description,
    )
