"""The ingest assets materialized by Dagster against a real broker and Prometheus.

Three simulated hours are delivered to the module's own stack (delivery restarts
Prometheus, which the shared session stack must not see), then both assets are
materialized for the three hours in one run, twice, and compared with the simulator's
truth. Damage to the lake (and a separate topic with bad events) must fail the checks;
a late event must make the late-events sensor ask for its hour again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import orjson
import polars as pl
import pyarrow.parquet as pq
import pytest

from ingest.catalog import in_memory
from ingest.lake import Lake
from ingest.settings import Settings
from ingest.simulator.delivery import event_payloads
from ingest.simulator.run import SimulationResult
from ingest.usage_consumer import StopWhen, consume
from ingest.usage_publisher import publish
from pipelines.defs.partitions import hour_partition_key
from pipelines.defs.resources import GpuledgerSettings, KafkaResource
from pipelines.defs.usage.schedules import usage_late_events_sensor
from pipelines.materialize import (
    PARTITION_RANGE_END_TAG,
    PARTITION_RANGE_START_TAG,
    IngestRunResult,
    check_ingest,
    materialize_ingest,
)
from tests.conftest import running_stack, simulate_small_fleet

pytestmark = pytest.mark.integration

# Three past hours, on the hour.
START = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)
END = START + timedelta(hours=3)
SEED = 5
KEYS = [hour_partition_key(START + timedelta(hours=i)) for i in range(3)]
USAGE = "usage_events_raw"
TELEMETRY = "gpu_telemetry_raw"


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_stack(
        tmp_path_factory.mktemp("ingest-assets") / "state",
        kafka={"topic": "gpuledger.usage.v1", "topic_partitions": 4},
        telemetry={"retries": 1, "backoff_s": 0.01},
    ) as settings:
        yield settings


@pytest.fixture(scope="module")
def simulated(own_stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return simulate_small_fleet(
        own_stack,
        tmp_path_factory.mktemp("run"),
        start=START,
        hours=3,
        seed=SEED,
        rate_per_s=1.0,
    )


def lake_counts(settings: Settings) -> dict[str, Any]:
    """What the raw views hold for the window."""
    with in_memory(settings) as con:
        params = {"start": START, "end": END}
        window = "hour_start >= $start AND hour_start < $end"
        events, ids = con.execute(
            f"SELECT count(*), count(DISTINCT event_id) FROM raw.usage_events WHERE {window}",
            params,
        ).fetchone()  # type: ignore[misc]
        quarantined = con.execute(
            f"SELECT count(*) FROM raw.usage_quarantine WHERE {window}", params
        ).fetchone()[0]  # type: ignore[index]
        telemetry = con.execute(
            f"SELECT count(*) FROM raw.gpu_telemetry WHERE {window}", params
        ).fetchone()[0]  # type: ignore[index]
        duplicate_rows = con.execute(
            f"SELECT count(*) FROM (SELECT gpu_key, ts FROM raw.gpu_telemetry WHERE {window} "
            "GROUP BY ALL HAVING count(*) > 1)",
            params,
        ).fetchone()[0]  # type: ignore[index]
    return {
        "events": events,
        "event_ids": ids,
        "quarantined": quarantined,
        "telemetry_rows": telemetry,
        "telemetry_duplicate_rows": duplicate_rows,
    }


@dataclass(frozen=True)
class Runs:
    first: IngestRunResult
    first_counts: dict[str, Any]
    first_seconds: float
    second: IngestRunResult
    second_counts: dict[str, Any]
    instance: dg.DagsterInstance


@pytest.fixture(scope="module")
def runs(own_stack: Settings, simulated: SimulationResult) -> Runs:
    instance = dg.DagsterInstance.ephemeral()
    began = time.perf_counter()
    first = materialize_ingest(own_stack, START, END, instance=instance)
    first_seconds = time.perf_counter() - began
    first_counts = lake_counts(own_stack)
    second = materialize_ingest(own_stack, START, END, instance=instance)
    return Runs(first, first_counts, first_seconds, second, lake_counts(own_stack), instance)


def truth_in_window(result: SimulationResult) -> pl.DataFrame:
    return result.requests.filter((pl.col("end_ts") >= START) & (pl.col("end_ts") < END))


def test_one_run_covers_every_hour_of_both_assets(runs: Runs) -> None:
    records = runs.instance.get_runs()
    assert len(records) == 2  # one per materialize_ingest call, never one per hour
    for result in (runs.first, runs.second):
        assert result.success, result.failed_checks
        assert result.partition_keys == tuple(KEYS)
        run = runs.instance.get_run_by_id(result.run_id)
        assert run is not None
        assert run.tags[PARTITION_RANGE_START_TAG] == KEYS[0]
        assert run.tags[PARTITION_RANGE_END_TAG] == KEYS[-1]
        assert set(result.materializations) == {USAGE, TELEMETRY}
        for asset in (USAGE, TELEMETRY):
            assert sorted(result.materializations[asset]) == KEYS
    first = runs.first.metadata(USAGE, KEYS[0])
    assert first["window_hours"] == 3
    assert first["consumed_records"] > 0
    assert first["window_watermark_passed"] is True
    assert "watermark_warning" not in first
    assert runs.second.metadata(USAGE, KEYS[0])["consumed_records"] == 0  # caught up


def test_materializing_again_changes_nothing(runs: Runs) -> None:
    assert runs.first_counts == runs.second_counts
    assert runs.first_counts["events"] == runs.first_counts["event_ids"]  # no duplicates
    assert runs.first_counts["telemetry_duplicate_rows"] == 0
    assert runs.first_counts["quarantined"] == 0
    for key in KEYS:
        first, second = runs.first.metadata(USAGE, key), runs.second.metadata(USAGE, key)
        for name in ("events", "duplicates", "quarantined", "prompt_tokens", "completion_tokens"):
            assert first[name] == second[name], (key, name)
        assert second["duplicates"] == 0
        assert (
            runs.first.metadata(TELEMETRY, key)["rows"]
            == runs.second.metadata(TELEMETRY, key)["rows"]
        )


def test_a_rebuild_with_nothing_new_counts_no_late_events(runs: Runs) -> None:
    """Guards against a rebuild reporting all its events as late ones."""
    for key in KEYS:
        assert runs.second.metadata(USAGE, key)["late_incorporated"] == 0, key


def test_tokens_per_tenant_match_the_simulator(
    own_stack: Settings, simulated: SimulationResult, runs: Runs
) -> None:
    truth = (
        truth_in_window(simulated)
        .group_by("tenant")
        .agg(
            events=pl.len().cast(pl.Int64),
            prompt_tokens=pl.col("prompt_tokens").sum(),
            completion_tokens=pl.col("completion_tokens").sum(),
        )
        .sort("tenant")
    )
    with in_memory(own_stack) as con:
        got = con.sql(
            "SELECT tenant, count(*)::BIGINT AS events, sum(prompt_tokens)::BIGINT AS "
            "prompt_tokens, sum(completion_tokens)::BIGINT AS completion_tokens "
            "FROM raw.usage_events WHERE hour_start >= $start AND hour_start < $end "
            "GROUP BY tenant ORDER BY tenant",
            params={"start": START, "end": END},
        ).pl()
    assert got.to_dicts() == truth.to_dicts()
    # The per-hour metadata says the same as the lake.
    per_hour = (
        truth_in_window(simulated)
        .group_by(hour=pl.col("end_ts").dt.truncate("1h"))
        .agg(events=pl.len(), prompt_tokens=pl.col("prompt_tokens").sum())
        .sort("hour")
    )
    for hour, events, prompt in per_hour.iter_rows():
        metadata = runs.second.metadata(USAGE, hour_partition_key(hour))
        assert (metadata["events"], metadata["prompt_tokens"]) == (events, prompt)


def test_telemetry_rows_per_gpu_match_the_scrapes(
    own_stack: Settings, simulated: SimulationResult, runs: Runs
) -> None:
    series = simulated.telemetry.series.select("series_id", "Hostname", "UUID")
    scrapes = (
        simulated.telemetry.samples.join(series, on="series_id")
        .with_columns(ts=pl.from_epoch("ts_ms", time_unit="ms").dt.replace_time_zone("UTC"))
        .filter((pl.col("ts") >= START) & (pl.col("ts") < END))
        .select(
            gpu_key=pl.col("Hostname") + "/" + pl.col("UUID"),
            hour_start=pl.col("ts").dt.truncate("1h").cast(pl.Datetime("us", "UTC")),
            ts=pl.col("ts"),
        )
        .unique()
        .group_by("gpu_key", "hour_start")
        .agg(expected=pl.len().cast(pl.Int64))
    )
    with in_memory(own_stack) as con:
        rows = con.sql(
            "SELECT gpu_key, hour_start, count(*)::BIGINT AS rows FROM raw.gpu_telemetry "
            "WHERE hour_start >= $start AND hour_start < $end GROUP BY ALL",
            params={"start": START, "end": END},
        ).pl()
    joined = scrapes.join(rows, on=["gpu_key", "hour_start"], how="full", coalesce=True)
    assert joined.height == 4 * 3  # 4 GPUs x 3 hours
    assert (joined["rows"] == joined["expected"]).all(), joined.filter(
        pl.col("rows") != pl.col("expected")
    )
    # Scrapes every 15 s with only the simulator's rare missed scrapes: coverage > 0.9.
    assert joined["expected"].min() > 0.9 * 240  # type: ignore[operator]
    for key in KEYS:
        assert runs.first.metadata(TELEMETRY, key)["gpus"] == 4


def test_every_check_passes_on_the_delivered_window(runs: Runs) -> None:
    for result in (runs.first, runs.second):
        names = {c.name: c for c in result.checks}
        assert set(names) == {
            "usage_duplicate_rate",
            "usage_quarantine_rate",
            "telemetry_coverage_per_gpu",
        }
        assert all(c.passed for c in result.checks), result.failed_checks
        assert names["telemetry_coverage_per_gpu"].metadata["gpu_hours_checked"] == 12
        assert names["usage_quarantine_rate"].metadata["hours_checked"] == 3


def test_coverage_check_fails_when_a_gpus_samples_are_lost(own_stack: Settings, runs: Runs) -> None:
    path = Lake(own_stack.lake_path).telemetry_hour_dir(START + timedelta(hours=1))
    path = path / "samples.parquet"
    original = path.read_bytes()
    table = pq.read_table(path)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    victim = sorted(frame["gpu_key"].unique())[0]
    cut = START + timedelta(hours=1, minutes=40)
    try:
        # 40 minutes of one GPU's samples lost: coverage 1/3.
        damaged = frame.filter((pl.col("gpu_key") != victim) | (pl.col("ts") >= cut))
        pq.write_table(damaged.to_arrow().cast(table.schema), path)
        result = check_ingest(own_stack, START, END)
        outcome = result.check("telemetry_coverage_per_gpu")
        assert not outcome.passed and outcome.severity == "ERROR"
        assert outcome.metadata["gpus_below"] == [victim]
        assert outcome.metadata["gpu_hours_below"] == 1
        assert 0.3 < outcome.metadata["lowest_coverage"] < 0.37
        assert victim in outcome.metadata["below_threshold"]
        assert result.check("usage_quarantine_rate").passed  # the others are untouched
        assert result.materializations == {}  # checks only: nothing was rebuilt
        # The whole hour lost for that GPU: a hole between its hours, coverage 0.
        pq.write_table(
            frame.filter(pl.col("gpu_key") != victim).to_arrow().cast(table.schema), path
        )
        outcome = check_ingest(own_stack, START, END).check("telemetry_coverage_per_gpu")
        assert not outcome.passed
        assert outcome.metadata["gpus_below"] == [victim]
        assert outcome.metadata["lowest_coverage"] == 0.0
    finally:
        path.write_bytes(original)
    assert check_ingest(own_stack, START, END).check("telemetry_coverage_per_gpu").passed


def test_bad_events_above_the_threshold_fail_the_usage_checks(
    own_stack: Settings, simulated: SimulationResult, tmp_path: Path
) -> None:
    """A separate topic and lake: 5 % unknown tenants and 10 % redelivered copies."""
    topic = "damaged.usage.v1"
    settings = own_stack.model_copy(
        update={
            "lake_dir": tmp_path / "lake",
            "duckdb_path": tmp_path / "warehouse.duckdb",
            "kafka": own_stack.kafka.model_copy(update={"topic": topic}),
        }
    )
    hour_end = START + timedelta(hours=1)
    events = event_payloads(simulated).filter(
        (pl.col("end_ts") >= START) & (pl.col("end_ts") < hour_end)
    )
    values = events["value"].to_list()
    keys = events["key"].to_list()
    bad = len(values) // 20
    for i in range(bad):
        event = orjson.loads(values[i])
        event["subject"] = "tenant-nobody-registered"
        values[i] = orjson.dumps(event)
    redelivered = len(values) // 10
    publish(
        settings,
        keys + keys[-redelivered:],
        values + values[-redelivered:],
        topic=topic,
    )
    result = materialize_ingest(settings, START, hour_end)
    assert not result.success  # the blocking quarantine check failed the run
    quarantine = result.check("usage_quarantine_rate")
    assert not quarantine.passed and quarantine.severity == "ERROR"
    assert quarantine.metadata["max_quarantine_rate"] == pytest.approx(
        bad / (len(values) + redelivered)
    )
    duplicates = result.check("usage_duplicate_rate")
    assert not duplicates.passed and duplicates.severity == "WARN"
    assert duplicates.metadata["max_duplicate_rate"] == pytest.approx(
        redelivered / (len(values) - bad + redelivered)
    )
    metadata = result.metadata(USAGE, KEYS[0])
    assert (metadata["quarantined"], metadata["duplicates"]) == (bad, redelivered)
    assert result.check("telemetry_coverage_per_gpu").passed


def test_a_late_event_makes_the_sensor_rebuild_its_hour(
    own_stack: Settings, simulated: SimulationResult, runs: Runs
) -> None:
    context_resources = {
        "gpuledger": GpuledgerSettings.pinned(own_stack),
        "kafka": KafkaResource(),
    }
    assert isinstance(
        usage_late_events_sensor(dg.build_sensor_context(resources=context_resources)),
        dg.SkipReason,
    )
    # A new event for the second hour, arriving after the hour was built.
    hour = START + timedelta(hours=1)
    template = (
        event_payloads(simulated)
        .filter((pl.col("end_ts") >= hour) & (pl.col("end_ts") < hour + timedelta(hours=1)))
        .row(0, named=True)
    )
    event = orjson.loads(template["value"])
    event["id"] = "late-0001"
    late_tokens = event["data"]["prompt_tokens"]
    tenant = event["subject"]
    publish(own_stack, [b"late-0001"], [orjson.dumps(event)])
    consume(own_stack, stop=StopWhen(idle_s=1.0))  # what the next hourly run does first

    result = usage_late_events_sensor(dg.build_sensor_context(resources=context_resources))
    assert isinstance(result, dg.SensorResult)
    requests = result.run_requests or []
    assert [r.partition_key for r in requests] == [KEYS[1]]
    assert requests[0].run_key is not None and requests[0].run_key.endswith(":late=1")

    def tenant_prompt_tokens() -> int:
        with in_memory(own_stack) as con:
            return int(
                con.execute(
                    "SELECT sum(prompt_tokens) FROM raw.usage_events "
                    "WHERE tenant = $tenant AND hour_start = $hour",
                    {"tenant": tenant, "hour": hour},
                ).fetchone()[0]  # type: ignore[index]
            )

    before = tenant_prompt_tokens()
    rebuilt = materialize_ingest(own_stack, hour, hour + timedelta(hours=1))
    assert rebuilt.success
    assert rebuilt.metadata(USAGE, hour.strftime("%Y-%m-%d-%H:%M"))["late_incorporated"] == 1
    assert tenant_prompt_tokens() == before + late_tokens
    assert isinstance(
        usage_late_events_sensor(dg.build_sensor_context(resources=context_resources)),
        dg.SkipReason,
    )


def test_runtime_of_one_run_over_three_hours(runs: Runs) -> None:
    """Not a benchmark: guards against a run that rebuilds per hour or waits on Kafka."""
    assert runs.first_seconds < 60
