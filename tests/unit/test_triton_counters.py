"""Triton counter samples -> requests per window: baselines, resets, edges, labels;
and the scrape targets `register_triton_targets` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ingest.settings import TritonServerSettings
from ingest.stack.prometheus import TRITON_TARGETS_DIR, render_config
from ingest.triton_counters import (
    SERVER_LABEL,
    counter_increase,
    counts_from_series,
    register_triton_targets,
    triton_counts_query,
    triton_target_file_name,
)
from models.errors import InputError, ServiceError
from tests.conftest import build_settings

START, END = 3_600_000, 7_200_000
S = 15_000  # scrape interval


def test_increase_from_the_baseline_before_the_window() -> None:
    result = counter_increase([START - S, START + S, END - S], [100, 130, 160], START, END)
    assert result.increase == 60
    assert result.had_baseline and result.resets == 0 and result.samples == 2


def test_a_series_that_begins_in_the_window_counts_from_zero() -> None:
    result = counter_increase([START + S, START + 2 * S], [7, 10], START, END)
    assert result.increase == 10
    assert not result.had_baseline


def test_a_drop_is_a_reset_and_the_new_value_counts() -> None:
    # 100 -> 140 (+40), restart, 5 (+5), 25 (+20)
    result = counter_increase(
        [START - S, START + S, START + 2 * S, START + 3 * S], [100, 140, 5, 25], START, END
    )
    assert result.increase == 65
    assert result.resets == 1


def test_samples_at_or_after_the_end_belong_to_the_next_window() -> None:
    result = counter_increase([START - S, END - 1, END, END + S], [0, 10, 50, 60], START, END)
    assert result.increase == 10


def test_only_the_last_sample_before_the_window_is_the_baseline() -> None:
    """Guards against counting increases before the window (in the lookback)."""
    result = counter_increase([START - 3 * S, START - S, START], [0, 90, 100], START, END)
    assert result.increase == 10


def test_a_sample_exactly_at_the_start_is_inside_the_window() -> None:
    result = counter_increase([START], [4], START, END)
    assert result.increase == 4 and not result.had_baseline


def test_out_of_order_samples_are_an_input_error() -> None:
    with pytest.raises(InputError, match="out of order"):
        counter_increase([START + S, START], [1, 2], START, END)


@given(
    st.lists(st.integers(0, 500), min_size=1, max_size=40),
    st.integers(-5, 40),
    st.integers(0, 240),
)
def test_increases_over_adjacent_windows_add_up(values: list[int], first: int, cut: int) -> None:
    """Splitting a window never loses or double-counts a request, resets included."""
    ts = [START + (first + i) * S for i in range(len(values))]
    middle = START + cut * S // 4
    end = START + 60 * S
    whole = counter_increase(ts, values, START, end)
    left = counter_increase(ts, values, START, middle)
    right = counter_increase(ts, values, middle, end)
    assert left.increase + right.increase == whole.increase
    assert left.resets + right.resets == whole.resets
    if not whole.resets and whole.had_baseline and ts[-1] < end:
        assert (
            whole.increase
            == values[-1] - [v for t, v in zip(ts, values, strict=True) if t < START][-1]
        )


def test_series_sum_per_server_and_model_over_versions_reasons_and_metrics() -> None:
    labels = [
        {"__name__": "nv_inference_request_success", "model": "llama", "version": "1",
         SERVER_LABEL: "a:8001", "instance": "a:8002"},
        {"__name__": "nv_inference_request_success", "model": "llama", "version": "2",
         SERVER_LABEL: "a:8001", "instance": "a:8002"},
        {"__name__": "nv_inference_request_failure", "model": "llama", "version": "1",
         "reason": "REJECTED", SERVER_LABEL: "a:8001", "instance": "a:8002"},
        {"__name__": "nv_inference_request_success", "model": "llama", "version": "1",
         SERVER_LABEL: "b:8001", "instance": "b:8002"},
        {"__name__": "nv_inference_request_success", "model": "gone", "version": "1",
         SERVER_LABEL: "b:8001", "instance": "b:8002"},
    ]  # fmt: skip
    samples = [
        ([START - S, END - S], [10.0, 30.0]),
        ([START + S], [5.0]),
        ([START - S, END - S], [1.0, 2.0]),
        ([START - S, START + S, END - S], [50.0, 2.0, 3.0]),
        ([START - 2 * S], [9.0]),  # baseline only: seen, nothing in the window
    ]
    counts, warnings = counts_from_series(labels, samples, START, END)
    assert warnings == []
    assert counts.rows(named=True) == [
        {"server": "a:8001", "model": "llama", "triton_requests": 26, "series": 3,
         "series_started": 1, "resets": 0},
        {"server": "b:8001", "model": "gone", "triton_requests": 0, "series": 1,
         "series_started": 0, "resets": 0},
        {"server": "b:8001", "model": "llama", "triton_requests": 3, "series": 1,
         "series_started": 0, "resets": 1},
    ]  # fmt: skip


def test_a_series_without_a_server_label_falls_back_to_its_instance() -> None:
    counts, warnings = counts_from_series(
        [{"model": "llama", "instance": "h:8002"}], [([START + S], [4.0])], START, END
    )
    assert counts["server"].to_list() == ["h:8002"]
    assert "without a triton_server label" in warnings[0] and "h:8002" in warnings[0]


def test_the_query_is_a_range_vector_of_the_job() -> None:
    assert (
        triton_counts_query("nv_inference_request_success", "triton", 4_500_000)
        == 'nv_inference_request_success{job="triton"}[4500000ms]'
    )


def server(**overrides: object) -> TritonServerSettings:
    values: dict[str, object] = {
        "grpc_url": "127.0.0.1:8001",
        "metrics_url": "http://127.0.0.1:8002/metrics",
        "hostname": "node-0",
        "gpu_uuids": ["GPU-0"],
        "models": ["llama"],
    }
    values.update(overrides)
    return TritonServerSettings.model_validate(values)


def test_targets_are_registered_in_the_triton_job_directory(tmp_path: Path) -> None:
    settings = build_settings(tmp_path / "state")
    paths = register_triton_targets(
        settings,
        [server(), server(grpc_url="10.0.0.2:8001", metrics_url="https://10.0.0.2:9443/m/x")],
    )
    assert [p.name for p in paths] == [
        "triton-127.0.0.1_8001.json",
        "triton-10.0.0.2_8001.json",
    ]
    assert paths[0].parent.name == TRITON_TARGETS_DIR
    assert json.loads(paths[1].read_text()) == [
        {
            "targets": ["10.0.0.2:9443"],
            "labels": {
                SERVER_LABEL: "10.0.0.2:8001",
                "__metrics_path__": "/m/x",
                "__scheme__": "https",
            },
        }
    ]
    assert triton_target_file_name("a:1") == "triton-a_1"


def test_a_server_without_a_metrics_url_is_an_input_error(tmp_path: Path) -> None:
    settings = build_settings(tmp_path / "state")
    with pytest.raises(InputError, match=r"'127\.0\.0\.1:8001' has no metrics_url"):
        register_triton_targets(settings, [server(metrics_url=None)])


def test_the_rendered_config_has_the_triton_job() -> None:
    config = yaml.safe_load(render_config(port=9090, scrape_interval_s=15, triton_job="tr"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["tr"]["file_sd_configs"][0]["files"] == [f"{TRITON_TARGETS_DIR}/*.json"]
    assert jobs["tr"]["metrics_path"] == "/metrics"
    assert {"prometheus", "dcgm-exporter"} <= set(jobs)


def test_a_triton_job_named_like_another_job_is_refused() -> None:
    with pytest.raises(ServiceError, match="'dcgm-exporter' is the name of another scrape job"):
        render_config(port=9090, scrape_interval_s=15, triton_job="dcgm-exporter")
