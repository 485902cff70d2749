"""The activity-driven DCGM simulator: power follows in-flight requests, energy integrates
power, collections behave like dcgm-exporter's."""

from __future__ import annotations

import re

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.simulator.activity_exporter import ActivityExporter, ActivityGpu, MeanConcurrency
from ingest.simulator.telemetry import METRICS
from models.errors import InputError

GPU_A = ActivityGpu(hostname="node-a", uuid="GPU-aaaaaaaa-0000-0000-0000-000000000001")
GPU_B = ActivityGpu(
    hostname="node-b",
    uuid="GPU-bbbbbbbb-0000-0000-0000-000000000002",
    local_index=1,
    gpu_type="A100",
)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _exporter(activity: dict[str, float], clock: FakeClock, **kwargs: object) -> ActivityExporter:
    return ActivityExporter([GPU_A, GPU_B], lambda: activity, clock=clock, **kwargs)  # type: ignore[arg-type]


def _sample(body: str, metric: str, uuid: str) -> float:
    match = re.search(rf'^{metric}{{[^}}]*UUID="{uuid}"[^}}]*}} (\S+)$', body, re.MULTILINE)
    assert match, f"{metric} for {uuid} missing in:\n{body}"
    return float(match.group(1))


def test_energy_counter_integrates_power_over_time() -> None:
    activity: dict[str, float] = {}
    clock = FakeClock()
    exporter = _exporter(activity, clock)
    exporter.tick()
    start_mj = exporter.energy_mj(GPU_A.uuid)
    idle_w = exporter.power_w(GPU_A.uuid, 0.0)
    for _ in range(100):  # 10 s idle
        clock.now += 0.1
        exporter.tick()
    idle_mj = exporter.energy_mj(GPU_A.uuid) - start_mj
    assert idle_mj == pytest.approx(idle_w * 10.0 * 1000.0, rel=1e-9)
    activity[GPU_A.uuid] = 8.0
    busy_w = exporter.power_w(GPU_A.uuid, 8.0)
    before = exporter.energy_mj(GPU_A.uuid)
    for _ in range(100):  # 10 s at a batch of 8
        clock.now += 0.1
        exporter.tick()
    busy_mj = exporter.energy_mj(GPU_A.uuid) - before
    # The first tick ramps from idle to busy power (trapezoid), the rest are flat.
    expected = ((idle_w + busy_w) / 2 * 0.1 + busy_w * 9.9) * 1000.0
    assert busy_mj == pytest.approx(expected, rel=1e-9)
    assert busy_w > idle_w + 100  # ML.ENERGY: an 8B model at batch 8 draws ~490 W on an H100


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 512), st.floats(0, 512))
def test_power_grows_with_concurrency_and_stays_within_the_limit(a: float, b: float) -> None:
    exporter = _exporter({}, FakeClock())
    low, high = sorted((a, b))
    for gpu, limit_w in ((GPU_A, 700.0), (GPU_B, 400.0)):
        p_low, p_high = exporter.power_w(gpu.uuid, low), exporter.power_w(gpu.uuid, high)
        assert p_low <= p_high + 1e-9
        assert p_high <= limit_w + 1e-9
        assert p_low >= exporter.power_w(gpu.uuid, 0.0) - 1e-9


def test_collections_follow_the_interval_and_report_the_busy_share() -> None:
    activity: dict[str, float] = {}
    clock = FakeClock()
    exporter = _exporter(activity, clock, collect_interval_s=1.0)
    exporter.tick()
    assert exporter.collections == 1
    body = exporter.render()
    first_energy = _sample(body, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", GPU_A.uuid)
    # Busy for half of the next second, on GPU A only (steps of 1/8 s: exact in binary).
    activity[GPU_A.uuid] = 1.0
    for _ in range(4):
        clock.now += 0.125
        exporter.tick()
    activity[GPU_A.uuid] = 0.0
    for _ in range(3):
        clock.now += 0.125
        exporter.tick()
    # Between collections, scrapes repeat the same values (dcgm-exporter's cycle).
    assert exporter.render() == body
    clock.now += 0.125
    exporter.tick()
    assert exporter.collections == 2
    body = exporter.render()
    assert _sample(body, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", GPU_A.uuid) == pytest.approx(0.5)
    assert _sample(body, "DCGM_FI_DEV_GPU_UTIL", GPU_A.uuid) == 50
    assert _sample(body, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", GPU_B.uuid) == 0.0
    assert _sample(body, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", GPU_A.uuid) > first_energy


def test_exposition_has_dcgm_exporter_names_labels_and_node_paths() -> None:
    clock = FakeClock()
    exporter = _exporter({GPU_B.uuid: 3.0}, clock, port=0)
    with exporter:
        all_body = httpx.get(f"{exporter.url}/metrics", timeout=5).text
        node = httpx.get(f"{exporter.url}/node/node-b/metrics", timeout=5)
        missing = httpx.get(f"{exporter.url}/node/nope/metrics", timeout=5)
    for metric in METRICS:
        assert f"# TYPE {metric.name} {metric.kind}" in all_body
    assert 'modelName="NVIDIA A100-SXM4-80GB"' in all_body
    assert 'Hostname="node-a"' in all_body
    assert node.status_code == 200
    assert GPU_A.uuid not in node.text and GPU_B.uuid in node.text
    assert missing.status_code == 404 and "node-a" in missing.text


def test_registration_points_prometheus_at_each_node(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    with _exporter({}, FakeClock()) as exporter:
        path = exporter.register_with_local_prometheus(tmp_path, name="live")
        groups = json.loads(path.read_text())
    assert [g["labels"]["instance"] for g in groups] == ["node-a:9400", "node-b:9400"]
    assert groups[0]["labels"]["__metrics_path__"] == "/node/node-a/metrics"


@pytest.mark.parametrize(
    ("gpu", "field"),
    [
        (ActivityGpu(hostname="h", uuid="GPU-1", gpu_type="V100"), "gpu_type"),
        (ActivityGpu(hostname="h", uuid="GPU-1", model_profile="gpt-9"), "model_profile"),
    ],
)
def test_unknown_gpu_type_or_model_is_an_input_error(gpu: ActivityGpu, field: str) -> None:
    with pytest.raises(InputError, match=field):
        ActivityExporter([gpu], dict)


def test_a_request_shorter_than_a_tick_still_draws_power() -> None:
    """Guards against power that only sees the requests in flight at each tick: at a
    fast pace, a tenant's 10 ms requests fell between 50 ms ticks, the simulated GPU
    stayed at idle, and the tenant was allocated no energy (a flaky integration test)."""
    from ingest.gateway.app import Activity

    clock = FakeClock()
    activity = Activity(clock)
    source = MeanConcurrency(activity.busy_seconds_by_gpu, clock)
    exporter = ActivityExporter([GPU_A], source, clock=clock, tick_s=0.05)
    exporter.tick()
    start_mj = exporter.energy_mj(GPU_A.uuid)
    idle_w = exporter.power_w(GPU_A.uuid, 0.0)
    for _ in range(20):  # 1 s: each 50 ms tick holds one 10 ms request between ticks
        clock.now += 0.02
        token = activity.begin([GPU_A.uuid])
        clock.now += 0.01
        activity.end(token)
        clock.now += 0.02
        exporter.tick()
    assert activity.inflight_by_gpu() == {}  # nothing in flight at any tick
    dynamic_mj = exporter.energy_mj(GPU_A.uuid) - start_mj - idle_w * 1.0 * 1000.0
    # A fifth of the time at concurrency 1, give or take the first tick's ramp.
    expected_mj = (exporter.power_w(GPU_A.uuid, 0.2) - idle_w) * 1.0 * 1000.0
    assert dynamic_mj == pytest.approx(expected_mj, rel=0.06)


def test_mean_concurrency_is_request_seconds_over_elapsed_time() -> None:
    clock = FakeClock()
    busy = {GPU_A.uuid: 0.0}
    mean = MeanConcurrency(lambda: busy, clock)
    clock.now += 2.0
    busy[GPU_A.uuid] = 3.0  # three requests in flight for 1 s each, over 2 s
    busy[GPU_B.uuid] = 0.5  # a GPU seen for the first time
    assert mean() == {GPU_A.uuid: 1.5, GPU_B.uuid: 0.25}
    clock.now += 1.0
    assert mean() == {GPU_A.uuid: 0.0, GPU_B.uuid: 0.0}
