"""How completely each GPU was scraped in each hour, from the hour files."""

from __future__ import annotations

import polars as pl

from models.errors import InputError


def telemetry_coverage(frame: pl.DataFrame, scrape_interval_s: float) -> pl.DataFrame:
    """Per GPU and hour: rows, distinct scrapes, expected scrapes, coverage and faults.

    `frame` has the hour files' columns (at least `gpu_key`, `hour_start`, `ts`,
    `placeholder_metrics`, `counter_reset`, `gap`, `gap_before_s`). Coverage is
    distinct scrape timestamps / (3600 / interval); it can exceed 1 when Prometheus
    scrapes faster than `scrape_interval_s` says.
    """
    if scrape_interval_s <= 0:
        raise InputError("telemetry coverage: scrape_interval_s must be more than 0")
    expected = 3600.0 / scrape_interval_s
    return (
        frame.group_by("gpu_key", "hour_start")
        .agg(
            rows=pl.len().cast(pl.Int64),
            scrapes=pl.col("ts").n_unique().cast(pl.Int64),
            placeholder_samples=pl.col("placeholder_metrics").list.len().sum().cast(pl.Int64),
            resets=pl.col("counter_reset").sum().cast(pl.Int64),
            gaps=pl.col("gap").sum().cast(pl.Int64),
            max_gap_s=pl.col("gap_before_s").max(),
        )
        .with_columns(
            expected_scrapes=pl.lit(expected, dtype=pl.Float64),
            coverage=pl.col("scrapes") / expected,
        )
        .select(
            "gpu_key",
            "hour_start",
            "rows",
            "scrapes",
            "expected_scrapes",
            "coverage",
            "placeholder_samples",
            "resets",
            "gaps",
            "max_gap_s",
        )
        .sort("gpu_key", "hour_start")
    )
