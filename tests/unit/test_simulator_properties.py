"""The simulator agrees with itself: events, telemetry and ground truth are one world."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from ingest.simulator import SimulationConfig, TelemetryConfig, default_fleet, simulate
from ingest.simulator.delivery import event_payloads
from ingest.simulator.run import SimulationResult
from ingest.simulator.telemetry import DCGM_FP64_BLANK, DCGM_INT64_BLANK, ENERGY_METRIC
from models.usage_event import parse_usage_event

START = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)


def small_run(
    seed: int,
    *,
    nodes: int = 2,
    gpus: int = 8,
    tenants: int = 4,
    minutes: float = 30,
    rate: float | None = 3.0,
    telemetry: TelemetryConfig | None = None,
) -> SimulationResult:
    config = SimulationConfig(
        start=START,
        duration_s=minutes * 60,
        seed=seed,
        rate_per_s=rate,
        telemetry=telemetry or TelemetryConfig(),
    )
    return simulate(default_fleet(nodes, gpus, tenants, seed), config)


fleets = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "nodes": st.integers(1, 4),
        "gpus": st.sampled_from([1, 2, 4, 6, 8]),
        "tenants": st.integers(1, 6),
        "minutes": st.floats(5, 40),
        "rate": st.floats(0.2, 6.0),
    }
)
faulty = TelemetryConfig(
    counter_resets_per_gpu_day=40.0,
    missed_scrape_rate=0.05,
    outages_per_node_day=20.0,
    placeholder_rate=0.01,
    hostname_label="mixed",
)
hypothesis_settings = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def series_with_samples(result: SimulationResult, metric: str) -> pl.DataFrame:
    ids = result.telemetry.series.filter(pl.col("metric") == metric)
    return result.telemetry.samples.join(ids, on="series_id").sort("series_id", "ts_ms")


@hypothesis_settings
@given(params=fleets)
def test_every_events_gpus_exist_in_the_telemetry(params: dict[str, float]) -> None:
    result = small_run(**params, telemetry=faulty)  # type: ignore[arg-type]
    telemetry_gpus = set(result.telemetry.series.select("UUID", "instance").unique().iter_rows())
    for event in result.requests.select("gpu_uuids", "hostname").iter_rows():
        uuids, host = event
        for uuid in uuids:
            assert (uuid, f"{host}:9400") in telemetry_gpus


@hypothesis_settings
@given(params=fleets)
def test_energy_counters_are_monotonic_except_injected_resets(params: dict[str, float]) -> None:
    result = small_run(**params, telemetry=faulty)  # type: ignore[arg-type]
    samples = series_with_samples(result, ENERGY_METRIC).filter(
        pl.col("value") < float(DCGM_INT64_BLANK)  # placeholders are not counter values
    )
    resets = result.telemetry.anomalies.filter(pl.col("kind") == "counter_reset")
    for (uuid,), group in samples.group_by(["UUID"]):
        ts = group["ts_ms"].to_numpy()
        value = group["value"].to_numpy()
        went_down = np.flatnonzero(np.diff(value) < 0)
        reset_ms = resets.filter(pl.col("gpu_uuid") == uuid)["start_ms"].to_numpy()
        for i in went_down:
            # A decrease is explained by a reset between the two samples.
            assert np.any((reset_ms > ts[i] - 30_000) & (reset_ms <= ts[i + 1])), (uuid, ts[i])


@hypothesis_settings
@given(params=fleets)
def test_gpu_energy_is_idle_plus_its_requests_true_energy(params: dict[str, float]) -> None:
    result = small_run(**params)  # type: ignore[arg-type]
    truth = result.gpu_truth
    # Per GPU: metered energy (the timeline the counter integrates) = idle + dynamic.
    per_gpu = truth.group_by("gpu_uuid").agg(
        pl.col("energy_j").sum(), pl.col("idle_j").sum(), pl.col("dynamic_j").sum()
    )
    metered = {
        t.gpu.uuid: float(t.energy_at(np.array([result.horizon_s]))[0]) for t in result.timelines
    }
    for uuid, energy, idle, dynamic in per_gpu.iter_rows():
        assert energy == pytest.approx(idle + dynamic, rel=1e-9)
        assert metered[uuid] == pytest.approx(energy, rel=1e-9)
    # Per GPU group: its GPUs' dynamic energy = the sum of its requests' true energy.
    by_replica = (
        truth.filter(pl.col("replica").is_not_null())
        .group_by("replica")
        .agg(pl.col("dynamic_j").sum())
    )
    requests = result.requests.group_by("replica").agg(pl.col("true_energy_j").sum())
    joined = by_replica.join(requests, on="replica", how="full", coalesce=True).fill_null(0.0)
    for _, dynamic, true_energy in joined.iter_rows():
        assert dynamic == pytest.approx(true_energy, rel=1e-9, abs=1e-6)
    # Spare GPUs (no replica) draw idle power only.
    spare = truth.filter(pl.col("replica").is_null())
    assert spare["dynamic_j"].sum() == 0.0


def test_counter_is_the_true_energy_at_each_collection() -> None:
    result = small_run(
        7, telemetry=TelemetryConfig(counter_resets_per_gpu_day=0, placeholder_rate=0)
    )
    samples = series_with_samples(result, ENERGY_METRIC)
    phases = {row[0]: row[1] for row in result.telemetry.phases.iter_rows()}
    interval = result.config.telemetry.collect_interval_s
    for timeline in result.timelines:
        group = samples.filter(pl.col("UUID") == timeline.gpu.uuid)
        scrape_s = (group["ts_ms"].to_numpy() - result.window_start_ms) / 1000
        phase = phases[timeline.gpu.hostname]
        collected_s = phase + np.floor((scrape_s - phase + 1e-6) / interval) * interval
        counter_mj = group["value"].to_numpy()
        increase_j = (counter_mj - counter_mj[0]) / 1000
        true_j = timeline.energy_at(collected_s) - timeline.energy_at(collected_s[:1])
        np.testing.assert_allclose(increase_j, true_j, atol=0.002)  # integer-mJ counter


def test_same_seed_same_events_and_telemetry() -> None:
    one, two = small_run(11), small_run(11)
    assert_frame_equal(event_payloads(one), event_payloads(two))
    assert_frame_equal(one.telemetry.samples, two.telemetry.samples)
    assert_frame_equal(one.telemetry.series, two.telemetry.series)
    assert_frame_equal(one.requests, two.requests)
    other = small_run(12)
    assert not event_payloads(other)["value"].equals(event_payloads(one)["value"])


def test_every_simulated_event_satisfies_the_contract() -> None:
    result = small_run(3, minutes=20)
    payloads = event_payloads(result)
    requests = result.requests
    assert payloads.height == requests.height > 100
    for payload, row in zip(payloads["value"], requests.iter_rows(named=True), strict=True):
        event = parse_usage_event(payload)
        assert event.id == row["request_id"]
        assert event.subject == row["tenant"]
        assert event.data.prompt_tokens == row["prompt_tokens"]
        assert event.data.completion_tokens == row["completion_tokens"]
        assert event.data.cached_prompt_tokens == row["cached_tokens"]
        assert event.data.gpu_uuids == row["gpu_uuids"]
        assert event.data.status == row["status"]
        assert event.time == event.data.end_time == row["end_ts"]
        assert (event.data.first_token_time is None) == (row["completion_tokens"] == 0)


def test_outcomes_and_phases_are_consistent() -> None:
    result = small_run(5, minutes=40, rate=8.0)
    r = result.requests
    assert r.filter(pl.col("prefill_start_ts") < pl.col("arrival_ts")).height == 0
    assert r.filter(pl.col("end_ts") < pl.col("prefill_start_ts")).height == 0
    errors_before_first = r.filter(
        (pl.col("status") == "error") & (pl.col("completion_tokens") == 0)
    )
    assert errors_before_first["first_token_ts"].null_count() == errors_before_first.height
    assert set(r["status"].unique()) <= {"ok", "cancelled", "error"}
    assert (r["true_energy_j"] > 0).all()  # every request did prefill work at least
    # Prefill windows of one replica never overlap (one prefill at a time).
    for (_,), group in r.sort("prefill_start_ts").group_by(["replica"], maintain_order=True):
        done = group["first_token_ts"].fill_null(group["end_ts"])
        starts = group["prefill_start_ts"]
        assert (starts.slice(1) >= done.slice(0, group.height - 1)).all()


def test_injected_faults_are_listed_and_visible() -> None:
    result = small_run(
        9,
        minutes=60,
        telemetry=TelemetryConfig(
            counter_resets_per_gpu_day=40.0,
            missed_scrape_rate=0.05,
            outages_per_node_day=100.0,
            placeholder_rate=0.01,
        ),
    )
    kinds = set(result.telemetry.anomalies["kind"].unique())
    assert kinds == {"counter_reset", "missed_scrape", "outage", "placeholder"}
    values = result.telemetry.samples["value"]
    assert (values == float(DCGM_INT64_BLANK)).any()
    assert (values == DCGM_FP64_BLANK).any()
    # No sample of a node during its outage.
    outages = result.telemetry.anomalies.filter(pl.col("kind") == "outage")
    samples = result.telemetry.samples.join(result.telemetry.series, on="series_id")
    for host, begin, end in outages.select("hostname", "start_ms", "end_ms").iter_rows():
        inside = samples.filter(
            (pl.col("instance") == f"{host}:9400")
            & pl.col("ts_ms").is_between(begin, end, closed="left")
        )
        assert inside.height == 0


def test_scrapes_repeat_the_latest_collection() -> None:
    """dcgm-exporter collects every 30 s; Prometheus scrapes every 15 s."""
    result = small_run(
        2,
        telemetry=TelemetryConfig(placeholder_rate=0, missed_scrape_rate=0, outages_per_node_day=0),
    )
    power = series_with_samples(result, "DCGM_FI_DEV_POWER_USAGE")
    first = power.filter(pl.col("series_id") == power["series_id"][0])["value"].to_numpy()
    pairs = first[: (first.size // 2) * 2].reshape(-1, 2)
    # Either each pair or each shifted pair is a repeat, depending on phases.
    shifted = first[1 : 1 + ((first.size - 1) // 2) * 2].reshape(-1, 2)
    assert (pairs[:, 0] == pairs[:, 1]).all() or (shifted[:, 0] == shifted[:, 1]).all()


def test_labels_follow_dcgm_exporter() -> None:
    result = small_run(1, telemetry=TelemetryConfig(hostname_label="mixed"))
    series = result.telemetry.series
    assert set(series["metric"].unique()) == {
        "DCGM_FI_DEV_SM_CLOCK",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    }
    for label in ("gpu", "UUID", "pci_bus_id", "device", "modelName", "DCGM_FI_DRIVER_VERSION"):
        assert series[label].null_count() == 0
    # "mixed": both spellings of the hostname label, each series has exactly one.
    assert series["Hostname"].null_count() > 0 and series["hostname"].null_count() > 0
    assert (series["Hostname"].is_null() != series["hostname"].is_null()).all()
    assert set(series["modelName"]) == {"NVIDIA H100 80GB HBM3"}  # nodes 0-1 are H100


def test_demo_window_is_a_day_with_over_a_million_requests() -> None:
    """The bench's and demo's premise: a day of the 32-GPU fleet is >= 1 M requests."""
    config = SimulationConfig(start=START - timedelta(hours=6), duration_s=86400, seed=0)
    result = simulate(default_fleet(4, 8, 8, 0), config)
    assert result.requests.height >= 1_000_000
    assert set(result.gpu_truth["gpu_type"]) == {"H100", "A100"}
    assert {r.tp for r in result.fleet.replicas} >= {1, 2, 4}
    by_tenant = result.requests.group_by("tenant").len().sort("len", descending=True)
    shares = by_tenant["len"].to_numpy() / result.requests.height
    assert shares[0] > 0.25 and shares[-1] < 0.07  # a few large tenants, a long tail
