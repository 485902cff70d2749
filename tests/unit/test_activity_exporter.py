"""The activity-driven DCGM simulator: power follows in-flight requests, energy integrates
power, collections behave like dcgm-exporter's."""

from __future__ import annotations

import re

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.simulator.activity_exporter import ActivityExporter, ActivityGpu
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
