"""Simulated DCGM telemetry backfilled into a real Prometheus, pulled into the lake,
and compared with what the simulator wrote: sample for sample, fault for fault.

The module has its own local stack (backfilling restarts Prometheus, which the shared
session stack must not see).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from ingest.lake import Lake
from ingest.settings import Settings
from ingest.simulator import SimulationConfig, TelemetryConfig, default_fleet, simulate
from ingest.simulator.delivery import deliver
from ingest.simulator.run import SimulationResult
from ingest.stack.process import find_free_port
from ingest.telemetry import (
    LOOKBACK_S,
    METRICS,
    TELEMETRY_SCHEMA,
    TelemetryPullReport,
    placeholder_mask,
    pull_telemetry,
    telemetry_coverage,
)
from models.errors import ServiceError
from tests.conftest import running_stack

pytestmark = pytest.mark.integration

# A past window on an hour. Seed 11 injects 7 outages (one spanning the hour boundary
# for longer than the reader's lookback) and 12 counter resets.
START = datetime(2026, 11, 18, 6, 0, tzinfo=UTC)
SEED = 11
HOUR_MS = 3_600_000
COLLECT_S = 30.0


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_stack(
        tmp_path_factory.mktemp("telemetry-reader") / "state",
        telemetry={"retries": 1, "backoff_s": 0.01},
    ) as settings:
        yield settings


@pytest.fixture(scope="module")
def simulated(own_stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    config = SimulationConfig(
        start=START,
        duration_s=2 * 3600,
        seed=SEED,
        rate_per_s=2.0,
        telemetry=TelemetryConfig(
            hostname_label="mixed",
            counter_resets_per_gpu_day=12,
            outages_per_node_day=24,
            placeholder_rate=0.01,
            missed_scrape_rate=0.005,
        ),
    )
    result = simulate(default_fleet(nodes=2, gpus_per_node=4, tenants=3, seed=SEED), config)
    deliver(result, own_stack, tmp_path_factory.mktemp("run"), to_kafka=False)
    return result


def _hours_of(result: SimulationResult) -> tuple[datetime, datetime]:
    end_ms = math.ceil(result.horizon_end_ms / HOUR_MS) * HOUR_MS
    return START, datetime.fromtimestamp(end_ms / 1000, UTC)


@pytest.fixture(scope="module")
def pulled(
    own_stack: Settings, simulated: SimulationResult
) -> tuple[TelemetryPullReport, pl.DataFrame]:
    start, end = _hours_of(simulated)
    report = pull_telemetry(own_stack, start, end)
    return report, _read_lake(own_stack)


def _read_lake(settings: Settings) -> pl.DataFrame:
    files = sorted(Lake(settings.lake_path).telemetry_samples.glob("hour=*/samples.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files])


def _written(result: SimulationResult) -> pl.DataFrame:
    """Every simulated sample: hostname, UUID, metric, ts_ms, value."""
    series = result.telemetry.series.with_columns(
        hostname=pl.coalesce(
            [c for c in ("Hostname", "hostname") if c in result.telemetry.series.columns]
        )
    ).select("series_id", "metric", "hostname", gpu_uuid="UUID")
    return result.telemetry.samples.join(series, on="series_id").drop("series_id")


def _long(frame: pl.DataFrame) -> pl.DataFrame:
    """The pulled wide rows back to (hostname, UUID, metric, ts_ms, value), non-null."""
    parts = [
        frame.filter(pl.col(column).is_not_null()).select(
            "hostname",
            "gpu_uuid",
            metric=pl.lit(metric),
            ts_ms=pl.col("ts").dt.epoch("ms"),
            value=pl.col(column),
        )
        for metric, column in METRICS
    ]
    return pl.concat(parts)


def _key(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select("hostname", "gpu_uuid", "metric", "ts_ms", "value").sort(
        "hostname", "gpu_uuid", "metric", "ts_ms"
    )


def test_every_sample_comes_back_exactly(
    simulated: SimulationResult, pulled: tuple[TelemetryPullReport, pl.DataFrame]
) -> None:
    report, frame = pulled
    written = _written(simulated)
    blank = np.zeros(written.height, dtype=bool)
    for metric, _ in METRICS:
        rows = (written["metric"] == metric).to_numpy()
        blank[rows] = placeholder_mask(written["value"].to_numpy()[rows], metric)
    real = written.filter(~pl.Series(blank))
    got = _long(frame)
    assert got.height == real.height
    assert _key(got).equals(_key(real))  # timestamps and values exact, row for row
    assert report.samples == written.height
    # One row per GPU per scrape, and its identity columns filled from the labels.
    scrapes = written.select("hostname", "gpu_uuid", "ts_ms").unique().height
    assert frame.height == scrapes == report.rows
    assert frame.select("gpu_key", "ts").is_duplicated().sum() == 0
    assert frame["hostname"].null_count() == 0
    assert set(frame["hostname"]) == {n.hostname for n in simulated.fleet.spec.nodes}
    assert (frame["gpu_key"] == frame["hostname"] + "/" + frame["gpu_uuid"]).all()
    assert frame["model_name"].null_count() == frame["driver_version"].null_count() == 0
    assert set(frame["job"]) == {"dcgm-exporter"}
    assert frame["mig_instance_id"].null_count() == frame.height
    gpus = {(g.hostname, g.uuid): g.local_index for g in simulated.fleet.gpus}
    assert {
        (h, u): i for h, u, i in frame.select("hostname", "gpu_uuid", "gpu_index").unique().rows()
    } == gpus


def test_placeholders_are_listed_and_nulled(
    simulated: SimulationResult, pulled: tuple[TelemetryPullReport, pl.DataFrame]
) -> None:
    _, frame = pulled
    injected = simulated.telemetry.anomalies.filter(pl.col("kind") == "placeholder")
    assert injected.height > 50
    expected = set(injected.select("hostname", "gpu_uuid", "metric", "start_ms").iter_rows())
    listed = (
        frame.select(
            "hostname", "gpu_uuid", "placeholder_metrics", ts_ms=pl.col("ts").dt.epoch("ms")
        )
        .explode("placeholder_metrics")
        .drop_nulls("placeholder_metrics")
    )
    got = set(listed.select("hostname", "gpu_uuid", "placeholder_metrics", "ts_ms").iter_rows())
    assert got == expected
    for metric, column in METRICS:
        flagged = frame.filter(pl.col("placeholder_metrics").list.contains(metric))
        assert flagged[column].null_count() == flagged.height, metric


def test_each_counter_reset_is_flagged_at_the_first_sample_after_it(
    simulated: SimulationResult, pulled: tuple[TelemetryPullReport, pl.DataFrame]
) -> None:
    _, frame = pulled
    resets = simulated.telemetry.anomalies.filter(pl.col("kind") == "counter_reset")
    assert resets.height >= 5
    phase = dict(simulated.telemetry.phases.select("hostname", "collect_phase_s").iter_rows())
    window_ms = simulated.window_start_ms
    expected: set[tuple[str, int]] = set()
    energy = frame.filter(pl.col("energy_mj").is_not_null()).sort("gpu_key", "ts")
    for gpu_key, rows in energy.group_by("gpu_key"):
        host, uuid = rows["hostname"][0], rows["gpu_uuid"][0]
        ts_ms = rows["ts"].dt.epoch("ms").to_numpy()
        # A scrape reports the exporter's latest collection: when was it taken?
        t_s = (ts_ms - window_ms) / 1000.0
        collected_s = phase[host] + np.floor((t_s - phase[host]) / COLLECT_S) * COLLECT_S
        for start_ms in resets.filter(pl.col("gpu_uuid") == uuid)["start_ms"]:
            at_s = (start_ms - window_ms) / 1000.0
            after = np.nonzero(collected_s > at_s)[0]
            if after.size and after[0] > 0:  # a reset before the first sample is invisible
                expected.add((str(gpu_key[0]), int(ts_ms[after[0]])))
    flagged = set(
        frame.filter("counter_reset").select("gpu_key", pl.col("ts").dt.epoch("ms")).iter_rows()
    )
    assert len(expected) >= 5
    assert flagged == expected


def test_each_outage_is_a_gap_with_no_rows_inside(
    simulated: SimulationResult, pulled: tuple[TelemetryPullReport, pl.DataFrame]
) -> None:
    _, frame = pulled
    outages = simulated.telemetry.anomalies.filter(pl.col("kind") == "outage")
    boundary = simulated.window_start_ms + HOUR_MS
    # The seed's premise: one outage spans an hour start by more than the lookback, so
    # the predecessor of that hour's first sample had to be looked up further back.
    assert (
        outages.filter(
            (pl.col("start_ms") < boundary - LOOKBACK_S * 1000) & (pl.col("end_ms") > boundary)
        ).height
        >= 1
    )
    checked = 0
    rows = frame.with_columns(ts_ms=pl.col("ts").dt.epoch("ms"))
    for host, begin_ms, end_ms in outages.select("hostname", "start_ms", "end_ms").iter_rows():
        node = rows.filter(pl.col("hostname") == host)
        assert node.filter(pl.col("ts_ms").is_between(begin_ms, end_ms, closed="left")).is_empty()
        for _, gpu in node.group_by("gpu_key"):
            before = gpu.filter(pl.col("ts_ms") < begin_ms)
            after = gpu.filter(pl.col("ts_ms") >= end_ms).sort("ts_ms")
            if before.is_empty() or after.is_empty():
                continue
            first = after.row(0, named=True)
            assert first["gap"] is True
            assert first["gap_before_s"] >= (end_ms - begin_ms) / 1000
            assert first["gap_before_s"] == (first["ts_ms"] - before["ts_ms"].max()) / 1000
            checked += 1
    assert checked >= 4 * 4
    # Nothing else is a gap: every other pause is a missed scrape or two.
    assert frame.filter(~pl.col("gap"))["gap_before_s"].max() <= 45.0


def test_repeated_marks_scrapes_of_the_same_collection(
    simulated: SimulationResult, pulled: tuple[TelemetryPullReport, pl.DataFrame]
) -> None:
    _, frame = pulled
    phase = dict(simulated.telemetry.phases.select("hostname", "collect_phase_s").iter_rows())
    frame = frame.sort("gpu_key", "ts").with_columns(
        t_s=(pl.col("ts").dt.epoch("ms") - simulated.window_start_ms) / 1000.0,
        phase=pl.col("hostname").replace_strict(phase),
    )
    collection = ((pl.col("t_s") - pl.col("phase")) / COLLECT_S).floor()
    expected = frame.select(
        same=(collection == collection.shift(1)).fill_null(False)
        & (pl.col("gpu_key") == pl.col("gpu_key").shift(1)).fill_null(False)
    )["same"]
    assert frame["repeated"].sum() > frame.height // 3
    assert (frame["repeated"] == expected).all()


def test_hour_files_partition_the_samples(
    own_stack: Settings,
    simulated: SimulationResult,
    pulled: tuple[TelemetryPullReport, pl.DataFrame],
) -> None:
    report, frame = pulled
    start, end = _hours_of(simulated)
    assert [h.hour_start for h in report.hours] == [
        start + timedelta(hours=i) for i in range(int((end - start) / timedelta(hours=1)))
    ]
    total = 0
    for hour in report.hours:
        part = pl.read_parquet(hour.path)
        assert pq.read_schema(hour.path).remove_metadata() == TELEMETRY_SCHEMA
        assert part.height == hour.rows
        assert (part["hour_start"] == hour.hour_start).all()
        assert part["ts"].min() >= hour.hour_start
        assert part["ts"].max() < hour.hour_start + timedelta(hours=1)
        assert part.equals(part.sort("gpu_key", "ts"))
        total += part.height
    assert total == frame.height
    # Each first sample of an hour knows its predecessor from the previous hour.
    later = frame.filter(pl.col("hour_start") > start).sort("gpu_key", "ts")
    firsts = later.group_by("gpu_key", "hour_start").first()
    assert firsts["gap_before_s"].null_count() == 0
    coverage = telemetry_coverage(frame, 15.0)
    assert coverage.height == frame.select("gpu_key", "hour_start").unique().height
    scrapes = (
        _written(simulated)
        .select("hostname", "gpu_uuid", "ts_ms")
        .unique()
        .group_by(
            gpu_key=pl.col("hostname") + "/" + pl.col("gpu_uuid"),
            hour_start=pl.from_epoch(pl.col("ts_ms") // HOUR_MS * HOUR_MS, "ms")
            .cast(pl.Datetime("us"))
            .dt.replace_time_zone("UTC"),
        )
        .agg(expected=pl.len().cast(pl.Int64) / 240.0)
    )
    both = coverage.join(scrapes, on=["gpu_key", "hour_start"], how="full", coalesce=True)
    assert both.height == coverage.height
    assert (both["coverage"] == both["expected"]).all()
    assert both["coverage"].min() < 0.8  # the outages show
    assert coverage["resets"].sum() == frame["counter_reset"].sum() == report.counter_resets


def test_repulling_replaces_without_duplicates(
    own_stack: Settings,
    simulated: SimulationResult,
    pulled: tuple[TelemetryPullReport, pl.DataFrame],
) -> None:
    report, frame = pulled
    start, end = _hours_of(simulated)
    again = pull_telemetry(own_stack, start, end)
    assert [h.rows for h in again.hours] == [h.rows for h in report.hours]
    assert _read_lake(own_stack).equals(frame)
    files = sorted(p.name for p in Lake(own_stack.lake_path).telemetry_samples.rglob("*"))
    assert files.count("samples.parquet") == len(report.hours)
    assert all(not name.endswith(".tmp") for name in files)


def test_a_stopped_prometheus_is_a_one_line_error_and_files_stay(
    own_stack: Settings,
    simulated: SimulationResult,
    pulled: tuple[TelemetryPullReport, pl.DataFrame],
    tmp_path: Path,
) -> None:
    report, _ = pulled
    path = report.hours[0].path
    manifest = path.parent / "_manifest.json"
    before, manifest_before = path.read_bytes(), manifest.read_bytes()
    mtime = path.stat().st_mtime_ns
    url = f"http://127.0.0.1:{find_free_port()}"
    stopped = own_stack.model_copy(
        update={"prometheus": own_stack.prometheus.model_copy(update={"url": url})}
    )
    start, end = _hours_of(simulated)
    with pytest.raises(ServiceError) as caught:
        pull_telemetry(stopped, start, end)
    assert caught.value.message == (
        f"Prometheus at {url} is unreachable: connection refused (after 2 attempts)"
    )
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == mtime
    assert manifest.read_bytes() == manifest_before
