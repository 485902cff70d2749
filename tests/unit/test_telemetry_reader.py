"""The telemetry reader without a real Prometheus: labels, placeholders, flags,
coverage, parsing, and retries / errors against a tiny in-process HTTP server that
speaks just enough of Prometheus' query API."""

from __future__ import annotations

import http.server
import itertools
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from ingest.lake import Lake
from ingest.settings import Settings
from ingest.stack.process import find_free_port
from ingest.telemetry import (
    DCGM_FP64_BLANKS,
    DCGM_INT32_BLANKS,
    DCGM_INT64_BLANKS,
    ENERGY_METRIC,
    METRICS,
    TELEMETRY_SCHEMA,
    normalize_labels,
    placeholder_mask,
    pull_telemetry,
    telemetry_coverage,
    wide_hour_table,
)
from ingest.telemetry.parsing import _parse_matrix_fast, _parse_matrix_slow
from models.errors import InputError, ServiceError

SettingsFactory = Callable[..., Settings]

H = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
H_MS = int(H.timestamp() * 1000)
POWER = "DCGM_FI_DEV_POWER_USAGE"
UTIL = "DCGM_FI_DEV_GPU_UTIL"
UUID_A = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
UUID_B = "GPU-bbbbbbbb-0000-0000-0000-000000000002"


# -- labels -----------------------------------------------------------------------------


def _dcgm_labels(**extra: str) -> dict[str, str]:
    labels = {
        "__name__": POWER,
        "gpu": "3",
        "UUID": UUID_A,
        "pci_bus_id": "00000000:1B:00.0",
        "device": "nvidia3",
        "modelName": "NVIDIA H100 80GB HBM3",
        "DCGM_FI_DRIVER_VERSION": "550.90.07",
        "instance": "node-7:9400",
        "job": "dcgm-exporter",
    }
    labels.update(extra)
    return labels


@pytest.mark.parametrize("label", ["Hostname", "hostname", "HOSTNAME"])
def test_hostname_label_is_matched_whatever_its_case(label: str) -> None:
    norm = normalize_labels(_dcgm_labels(**{label: "gpu-node-07"}))
    assert norm["hostname"] == "gpu-node-07"
    assert norm["gpu_key"] == f"gpu-node-07/{UUID_A}"


def test_all_identity_columns() -> None:
    norm = normalize_labels(_dcgm_labels(Hostname="gpu-node-07"))
    assert norm == {
        "metric": POWER,
        "gpu_key": f"gpu-node-07/{UUID_A}",
        "hostname": "gpu-node-07",
        "gpu_uuid": UUID_A,
        "gpu_index": 3,
        "mig_instance_id": None,
        "mig_profile": None,
        "model_name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:1B:00.0",
        "driver_version": "550.90.07",
        "instance": "node-7:9400",
        "job": "dcgm-exporter",
    }


@pytest.mark.parametrize(
    ("instance", "host"),
    [
        ("node-7:9400", "node-7"),
        ("10.0.0.7:9400", "10.0.0.7"),
        ("[fd00::7]:9400", "fd00::7"),
        ("node-7", "node-7"),
        ("http://node-7:9400/metrics", "node-7"),
    ],
)
def test_missing_host_label_falls_back_to_the_instance_host(instance: str, host: str) -> None:
    norm = normalize_labels(_dcgm_labels(instance=instance))
    assert norm["hostname"] == host
    assert norm["gpu_key"] == f"{host}/{UUID_A}"


def test_empty_host_label_counts_as_missing() -> None:
    assert normalize_labels(_dcgm_labels(Hostname=""))["hostname"] == "node-7"


def test_mig_instance_adds_its_id_to_the_key() -> None:
    norm = normalize_labels(
        _dcgm_labels(Hostname="gpu-node-07", GPU_I_ID="5", GPU_I_PROFILE="1g.10gb")
    )
    assert norm["gpu_key"] == f"gpu-node-07/{UUID_A}/5"
    assert norm["mig_instance_id"] == 5
    assert norm["mig_profile"] == "1g.10gb"
    whole = normalize_labels(_dcgm_labels(Hostname="gpu-node-07"))
    assert whole["gpu_key"] != norm["gpu_key"]


def test_odd_labels_do_not_crash() -> None:
    norm = normalize_labels({"gpu": "x", "GPU_I_ID": "?"})
    assert norm["gpu_index"] is None
    assert norm["mig_instance_id"] is None
    assert norm["hostname"] is None
    assert norm["gpu_key"] == "//?"


# -- placeholders -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "blank",
    [*(float(v) for v in DCGM_INT64_BLANKS), 9223372036854775792.0, *DCGM_FP64_BLANKS],
)
def test_int64_and_fp64_blanks_are_placeholders_for_every_metric(blank: float) -> None:
    for metric, _ in METRICS:
        assert placeholder_mask([blank], metric).tolist() == [True], (metric, blank)


@pytest.mark.parametrize("blank", [float(v) for v in DCGM_INT32_BLANKS])
def test_int32_blanks_are_placeholders_except_for_the_energy_counter(blank: float) -> None:
    assert placeholder_mask([blank], UTIL).tolist() == [True]
    assert placeholder_mask([blank]).tolist() == [True]
    # An int64 mJ counter passes 2^31 in normal operation.
    assert placeholder_mask([blank], ENERGY_METRIC).tolist() == [False]


def test_values_near_the_blanks_are_real() -> None:
    near = [0.0, 2147483631.0, 2147483636.0, 140737488355327.0, 140737488355332.0, 9.2e18, 1e19]
    assert not placeholder_mask(near, UTIL).any()
    assert not placeholder_mask(np.array([np.nan, np.inf]), POWER).any()


# -- the hour table: flags --------------------------------------------------------------


def _long(rows: list[tuple[str, str, int, float]], host_label: str = "Hostname") -> pl.DataFrame:
    """(uuid, metric, offset seconds from H, value) -> long samples with DCGM labels."""
    return pl.DataFrame(
        {
            "__name__": [r[1] for r in rows],
            "UUID": [r[0] for r in rows],
            "gpu": ["0" if r[0] == UUID_A else "1" for r in rows],
            host_label: ["node-1" for _ in rows],
            "instance": ["node-1:9400" for _ in rows],
            "job": ["dcgm-exporter" for _ in rows],
            "ts_ms": [H_MS + r[2] * 1000 for r in rows],
            "value": [r[3] for r in rows],
        }
    )


def _gpu_series(uuid: str, seconds: list[int], energy: list[float], power: list[float]) -> list:
    rows = []
    for s, e, p in zip(seconds, energy, power, strict=True):
        if e is not None:
            rows.append((uuid, ENERGY_METRIC, s, e))
        if p is not None:
            rows.append((uuid, POWER, s, p))
    return rows


def _table(rows: list, **kwargs: Any) -> pl.DataFrame:
    table = wide_hour_table(_long(rows, **kwargs), H, scrape_interval_s=15.0)
    assert table.schema == TELEMETRY_SCHEMA
    return pl.from_arrow(table)  # type: ignore[return-value]


def test_rows_are_the_hours_scrapes_with_predecessors_used_not_output() -> None:
    seconds = [-30, -15, 0, 15, 3585, 3600]
    frame = _table(_gpu_series(UUID_A, seconds, [1e6, 2e6, 3e6, 4e6, 5e6, 6e6], [1, 2, 3, 4, 5, 6]))
    offsets = [(t - H).total_seconds() for t in frame["ts"].to_list()]
    assert offsets == [0, 15, 3585]  # before H: predecessors only; H + 1 h: next hour
    assert frame["gap_before_s"].to_list() == [15.0, 15.0, 3570.0]
    assert frame["gap"].to_list() == [False, False, True]
    assert frame["hour_start"].unique().to_list() == [H]
    assert frame["power_w"].to_list() == [3, 4, 5]
    assert frame["gpu_key"].unique().to_list() == [f"node-1/{UUID_A}"]


def test_first_seen_has_no_gap() -> None:
    frame = _table(_gpu_series(UUID_A, [10, 25], [1e6, 2e6], [1, 2]))
    assert frame["gap_before_s"].to_list() == [None, 15.0]
    assert frame["gap"].to_list() == [False, False]
    assert frame["counter_reset"].to_list() == [False, False]


def test_gap_limit_is_three_scrape_intervals() -> None:
    frame = _table(_gpu_series(UUID_A, [0, 45, 91], [1e6, 2e6, 3e6], [1, 2, 3]))
    assert frame["gap_before_s"].to_list() == [None, 45.0, 46.0]
    assert frame["gap"].to_list() == [False, False, True]


def test_counter_reset_against_the_previous_valid_energy() -> None:
    blank = float(DCGM_INT64_BLANKS[0])
    energy = [5e9, 5.1e9, 1e6, 2e6, blank, 1.5e6, 3e6]
    frame = _table(_gpu_series(UUID_A, [-15, 0, 15, 30, 45, 60, 75], energy, [1] * 7))
    # 1e6 < 5.1e9: a reset; the placeholder is skipped, so 1.5e6 < 2e6 is one too.
    assert frame["counter_reset"].to_list() == [False, True, False, False, True, False]
    assert frame["energy_mj"].to_list() == [5.1e9, 1e6, 2e6, None, 1.5e6, 3e6]
    assert frame["placeholder_metrics"].to_list()[3] == [ENERGY_METRIC]


def test_reset_at_the_hours_first_sample_is_seen_through_the_lookback() -> None:
    frame = _table(_gpu_series(UUID_A, [-15, 0], [9e9, 10.0], [1, 1]))
    assert frame["counter_reset"].to_list() == [True]


def test_repeated_means_every_metric_equal_to_the_previous_scrape() -> None:
    rows = _gpu_series(UUID_A, [0, 15, 30, 45, 60], [1e6, 1e6, 1e6, 2e6, 2e6], [7, 7, 8, 8, 8])
    rows.append((UUID_A, UTIL, 60, 50.0))  # a metric only at the last scrape
    frame = _table(rows)
    assert frame["repeated"].to_list() == [False, True, False, False, False]


def test_placeholders_are_listed_and_their_values_null() -> None:
    rows = [
        (UUID_A, POWER, 0, DCGM_FP64_BLANKS[0]),
        (UUID_A, UTIL, 0, float(DCGM_INT32_BLANKS[2])),
        (UUID_A, ENERGY_METRIC, 0, 1e6),
        (UUID_A, POWER, 15, 250.5),
        (UUID_A, UTIL, 15, 40.0),
        (UUID_A, ENERGY_METRIC, 15, float(DCGM_INT32_BLANKS[0])),  # a real mJ count
    ]
    frame = _table(rows)
    assert frame["placeholder_metrics"].to_list() == [[POWER, UTIL], []]
    assert frame["power_w"].to_list() == [None, 250.5]
    assert frame["gpu_util_pct"].to_list() == [None, 40.0]
    assert frame["energy_mj"].to_list() == [1e6, float(DCGM_INT32_BLANKS[0])]
    # A column of a metric the GPU never reported is null throughout.
    assert frame["sm_clock_mhz"].null_count() == 2


def test_gpus_do_not_see_each_others_samples() -> None:
    rows = _gpu_series(UUID_B, [-15, 0, 15], [1e6, 2e6, 3e6], [1, 2, 3])
    rows += _gpu_series(UUID_A, [5, 20], [9e9, 9.1e9], [1, 2])
    frame = _table(rows)
    assert frame["gpu_key"].to_list() == [f"node-1/{UUID_A}"] * 2 + [f"node-1/{UUID_B}"] * 2
    assert frame["gap_before_s"].to_list() == [None, 15.0, 15.0, 15.0]
    assert frame["counter_reset"].to_list() == [False] * 4
    assert frame["gpu_index"].to_list() == [0, 0, 1, 1]


def test_mig_instances_are_separate_gpus() -> None:
    frame_in = pl.DataFrame(
        {
            "__name__": [POWER] * 4,
            "UUID": [UUID_A] * 4,
            "GPU_I_ID": ["1", "1", "2", "2"],
            "GPU_I_PROFILE": ["3g.40gb"] * 4,
            "hostname": ["node-1"] * 4,
            "ts_ms": [H_MS, H_MS + 15_000] * 2,
            "value": [300.0, 301.0, 300.0, 301.0],
        }
    )
    frame = pl.from_arrow(wide_hour_table(frame_in, H))
    assert frame["gpu_key"].to_list() == [f"node-1/{UUID_A}/1"] * 2 + [f"node-1/{UUID_A}/2"] * 2
    assert frame["mig_instance_id"].to_list() == [1, 1, 2, 2]
    assert frame["mig_profile"].unique().to_list() == ["3g.40gb"]


def test_an_empty_hour_has_the_full_schema() -> None:
    empty = _long([])
    table = wide_hour_table(empty, H)
    assert table.num_rows == 0
    assert table.schema == TELEMETRY_SCHEMA


# -- coverage -----------------------------------------------------------------------------


def test_coverage_per_gpu_and_hour() -> None:
    seconds = [s for s in range(0, 3600, 15) if not 600 <= s < 900]  # a 5-minute outage
    n = len(seconds)
    energy = [1e6 + s for s in seconds]
    energy[100] = float(DCGM_INT64_BLANKS[1])
    energy[150] = 5.0  # a reset
    rows = _gpu_series(UUID_A, seconds, energy, [100.0] * n)
    rows += _gpu_series(UUID_B, list(range(0, 1800, 15)), [1e6] * 120, [80.0] * 120)
    coverage = telemetry_coverage(_table(rows), scrape_interval_s=15.0)
    assert coverage.columns == [
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
    ]
    a, b = coverage.rows(named=True)
    assert a["gpu_key"] == f"node-1/{UUID_A}"
    assert (a["rows"], a["scrapes"], a["expected_scrapes"]) == (n, n, 240.0)
    assert a["coverage"] == pytest.approx(n / 240)
    assert (a["placeholder_samples"], a["resets"], a["gaps"], a["max_gap_s"]) == (1, 1, 1, 315.0)
    assert (b["scrapes"], b["coverage"], b["resets"], b["gaps"]) == (120, 0.5, 0, 0)


def test_coverage_rejects_a_zero_interval() -> None:
    with pytest.raises(InputError):
        telemetry_coverage(_table([]), scrape_interval_s=0)


# -- parsing ------------------------------------------------------------------------------


def _matrix_body(series: list[tuple[dict[str, str], list[tuple[float, str]]]]) -> bytes:
    return json.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "matrix",
                "result": [
                    {"metric": labels, "values": [[t, v] for t, v in values]}
                    for labels, values in series
                ],
            },
        },
        separators=(",", ":"),
    ).encode()


def test_fast_parser_agrees_with_the_full_parse() -> None:
    series = [
        ({"__name__": POWER, "UUID": UUID_A, "odd": 'x"values":[[1,"2"]]'}, [(1.5, "1")]),
        ({"__name__": POWER, "UUID": UUID_B}, [(1700000000.123, "NaN"), (1700000015, "+Inf")]),
        ({"__name__": POWER, "UUID": "GPU-c"}, []),
        ({"__name__": POWER, "UUID": "GPU-d"}, [(1700000000.001, "9223372036854775808")]),
    ]
    compact = _matrix_body(series)
    spaced = json.dumps(json.loads(compact), indent=1).encode()
    for body in (compact, spaced):
        fast = _parse_matrix_fast(body)
        slow = _parse_matrix_slow(body)
        assert fast.labels == slow.labels
        assert fast.counts.tolist() == slow.counts.tolist() == [1, 2, 0, 1]
        assert fast.ts_ms.tolist() == slow.ts_ms.tolist()
        assert fast.ts_ms.tolist() == [1500, 1700000000123, 1700000015000, 1700000000001]
        np.testing.assert_array_equal(fast.values, slow.values)


# -- a fake Prometheus -------------------------------------------------------------------


@dataclass
class FakePrometheus:
    """Answers /api/v1/query: the GPU discovery query with a vector, a range-vector
    selector with the matching samples of `series`; `script` answers first."""

    series: list[tuple[dict[str, str], list[tuple[int, float]]]]
    script: list[tuple[int, bytes]] = field(default_factory=list)
    requests: list[tuple[float, str]] = field(default_factory=list)
    repeat_last_script: bool = False

    def answer(self, query: str, at_s: float) -> tuple[int, bytes]:
        self.requests.append((time.monotonic(), query))
        if self.script:
            if self.repeat_last_script and len(self.script) == 1:
                return self.script[0]
            return self.script.pop(0)
        if query.startswith("group by"):
            job = re.search(r'job="([^"]*)"', query)
            result = [
                {
                    "metric": {k: v for k, v in labels.items() if k != "__name__"},
                    "value": [at_s, "1"],
                }
                for labels, _ in self.series
                if labels["__name__"] == POWER and (job is None or labels["job"] == job.group(1))
            ]
            body = {"status": "success", "data": {"resultType": "vector", "result": result}}
            return 200, json.dumps(body).encode()
        match = re.fullmatch(r"(\w+)\{(.*)\}\[(\d+)ms\]", query)
        assert match, query
        metric, matchers, range_ms = match.group(1), match.group(2), int(match.group(3))
        uuids = re.search(r'UUID=~"([^"]*)"', matchers)
        wanted = set(uuids.group(1).replace("\\", "").split("|")) if uuids else None
        end_ms = round(at_s * 1000)
        out = []
        for labels, samples in self.series:
            if labels["__name__"] != metric or (wanted and labels["UUID"] not in wanted):
                continue
            values = [[t / 1000, repr(v)] for t, v in samples if end_ms - range_ms <= t <= end_ms]
            if values:
                out.append((labels, values))
        return 200, _matrix_body(out)


@pytest.fixture
def fake_prometheus() -> Iterator[tuple[FakePrometheus, str]]:
    fake = FakePrometheus(series=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            status, body = fake.answer(form["query"][0], float(form["time"][0]))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _one_gpu_hour(fake: FakePrometheus) -> None:
    """One GPU scraped every 15 s from 10 min before H to the end of the hour."""
    times = list(range(H_MS - 600_000, H_MS + 3_600_000, 15_000))
    base = {"UUID": UUID_A, "gpu": "0", "Hostname": "node-1", "instance": "node-1:9400"}
    for metric, _ in METRICS:
        labels = {"__name__": metric, **base, "job": "dcgm-exporter"}
        fake.series.append((labels, [(t, float(i)) for i, t in enumerate(times)]))


def _settings(factory: SettingsFactory, url: str, **telemetry: Any) -> Settings:
    return factory(
        prometheus={"url": url, "timeout_s": 5},
        telemetry={"retries": 3, "backoff_s": 0.02, **telemetry},
    )


def _service_error(text: str = "", status: int = 503) -> tuple[int, bytes]:
    body = {"status": "error", "errorType": "unavailable", "error": text or "overloaded"}
    return status, json.dumps(body).encode()


def test_a_clean_pull_writes_the_hour(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    _one_gpu_hour(fake)
    settings = _settings(settings_factory, url)
    seen = []
    report = pull_telemetry(settings, H, H + timedelta(minutes=30), on_hour=seen.append)
    assert [h.hour_start for h in report.hours] == [H]
    assert seen == list(report.hours)
    hour = report.hours[0]
    assert (hour.gpus, hour.rows, hour.samples) == (1, 240, 240 * len(METRICS))
    assert hour.queries == 1 + len(METRICS)
    path = Lake(settings.lake_path).telemetry_hour_dir(H) / "samples.parquet"
    assert hour.path == path
    table = pq.read_table(path)
    assert table.schema == TELEMETRY_SCHEMA
    manifest = json.loads((path.parent / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 240
    assert manifest["prometheus"]["url"] == url
    assert manifest["window"] == {
        "start": H.isoformat(),
        "end": (H + timedelta(hours=1)).isoformat(),
    }
    frame = pl.from_arrow(table)
    assert frame["gap_before_s"].to_list() == [15.0] * 240  # the lookback gave a predecessor


def test_small_batches_and_windows_give_the_same_file(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    _one_gpu_hour(fake)
    times = list(range(H_MS, H_MS + 3_600_000, 15_000))
    for metric, _ in METRICS:
        labels = {"__name__": metric, "UUID": UUID_B, "hostname": "node-2", "job": "dcgm-exporter"}
        fake.series.append((labels, [(t + 7, 1.0) for t in times]))
    whole = pull_telemetry(
        _settings(settings_factory, url, series_per_query=8), H, H + timedelta(seconds=1)
    )
    first = pq.read_table(whole.hours[0].path)
    settings = _settings(settings_factory, url, series_per_query=1, query_window_s=700)
    chunked = pull_telemetry(settings, H, H + timedelta(seconds=1))
    # discovery + 6 windows x 8 metrics x 2 batches + 9 history steps for B (new in H)
    assert chunked.hours[0].queries == 1 + len(METRICS) * 2 * 6 + len(METRICS) * 9
    assert pq.read_table(chunked.hours[0].path).equals(first)
    assert first.num_rows == 480


def test_503_is_retried_with_backoff(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    _one_gpu_hour(fake)
    fake.script = [_service_error(), _service_error(status=429), _service_error(status=502)]
    report = pull_telemetry(_settings(settings_factory, url), H, H + timedelta(hours=1))
    assert report.hours[0].rows == 240
    stamps = [t for t, _ in fake.requests[:4]]
    waits = [b - a for a, b in itertools.pairwise(stamps)]
    assert waits[0] >= 0.02 and waits[1] >= 0.04 and waits[2] >= 0.08  # exponential


def test_persistent_503_is_a_one_line_error_and_the_old_file_stays(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    _one_gpu_hour(fake)
    settings = _settings(settings_factory, url)
    report = pull_telemetry(settings, H, H + timedelta(hours=1))
    path = report.hours[0].path
    before = path.read_bytes()
    fake.script = [_service_error("query queue full")]
    fake.repeat_last_script = True
    fake.requests.clear()
    with pytest.raises(ServiceError) as caught:
        pull_telemetry(settings, H, H + timedelta(hours=1))
    message = caught.value.message
    assert "\n" not in message
    assert url in message and "HTTP 503" in message and "query queue full" in message
    assert "after 4 attempts" in message
    assert len(fake.requests) == 4
    assert path.read_bytes() == before


def test_a_failure_mid_hour_leaves_the_old_file(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    _one_gpu_hour(fake)
    settings = _settings(settings_factory, url, retries=0)
    path = pull_telemetry(settings, H, H + timedelta(hours=1)).hours[0].path
    before = path.read_bytes()
    original = fake.answer

    def flaky(query: str, at_s: float) -> tuple[int, bytes]:
        if query.startswith("DCGM_FI_DEV_GPU_TEMP"):
            return _service_error()
        return original(query, at_s)

    fake.answer = flaky  # type: ignore[method-assign]
    with pytest.raises(ServiceError, match="is failing: HTTP 503"):
        pull_telemetry(settings, H, H + timedelta(hours=1))
    assert path.read_bytes() == before


def test_bad_query_is_not_retried(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    fake.script = [_service_error('parse error: unexpected "}"', status=400)]
    with pytest.raises(ServiceError) as caught:
        pull_telemetry(_settings(settings_factory, url), H, H + timedelta(hours=1))
    assert len(fake.requests) == 1
    assert caught.value.message == (
        f"Prometheus at {url} rejected the GPU discovery query for "
        f'{H.isoformat(timespec="milliseconds")}: HTTP 400: parse error: unexpected "}}"'
    )


def test_refused_credentials(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    fake.script = [(401, b"unauthorized")]
    with pytest.raises(ServiceError, match=r"refused the credentials \(HTTP 401\)"):
        pull_telemetry(_settings(settings_factory, url), H, H + timedelta(hours=1))


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>gateway</html>", "not JSON"),
        (b'{"status":"success","data":{}}', "no data.result list"),
        (b'{"status":"error","error":"boom"}', "status 'error': boom"),
    ],
)
def test_malformed_discovery_answer_names_the_query(
    fake_prometheus: tuple[FakePrometheus, str],
    settings_factory: SettingsFactory,
    body: bytes,
    why: str,
) -> None:
    fake, url = fake_prometheus
    fake.script = [(200, body)]
    with pytest.raises(ServiceError) as caught:
        pull_telemetry(_settings(settings_factory, url), H, H + timedelta(hours=1))
    assert caught.value.message.startswith(
        f"Prometheus at {url} answered the GPU discovery query for"
    )
    assert caught.value.message.endswith(f"with a malformed response: {why}")


def test_non_numeric_samples_name_the_range_query(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    _one_gpu_hour(fake)
    original = fake.answer

    def garbage(query: str, at_s: float) -> tuple[int, bytes]:
        if query.startswith(POWER):
            labels = {"__name__": POWER, "UUID": UUID_A}
            return 200, _matrix_body([(labels, [(at_s, "12"), (at_s, "twelve")])])
        return original(query, at_s)

    fake.answer = garbage  # type: ignore[method-assign]
    with pytest.raises(ServiceError) as caught:
        pull_telemetry(_settings(settings_factory, url), H, H + timedelta(hours=1))
    message = caught.value.message
    assert "\n" not in message
    assert f"answered query {POWER}{{" in message
    assert message.endswith("malformed response: values not numeric [time, value] pairs")


def test_closed_port_is_unreachable_after_the_retries(settings_factory: SettingsFactory) -> None:
    url = f"http://127.0.0.1:{find_free_port()}"
    settings = _settings(settings_factory, url, retries=2)
    began = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        pull_telemetry(settings, H, H + timedelta(hours=1))
    assert caught.value.message == (
        f"Prometheus at {url} is unreachable: connection refused (after 3 attempts)"
    )
    assert time.monotonic() - began >= 0.02 + 0.04


def test_credentials_never_appear_in_messages(settings_factory: SettingsFactory) -> None:
    port = find_free_port()
    settings = _settings(settings_factory, f"http://ledger:s3cret@127.0.0.1:{port}", retries=0)
    with pytest.raises(ServiceError) as caught:
        pull_telemetry(settings, H, H + timedelta(hours=1))
    assert "s3cret" not in caught.value.message
    assert f"http://127.0.0.1:{port}" in caught.value.message


def test_a_job_matching_nothing_writes_empty_hours_and_says_so(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    _one_gpu_hour(fake)
    settings = _settings(settings_factory, url, job="dcgm")
    report = pull_telemetry(settings, H, H + timedelta(hours=2))
    assert [h.rows for h in report.hours] == [0, 0]
    assert len(report.empty_hours) == 2
    assert "job='dcgm'" in report.warnings[0] and "telemetry.job" in report.warnings[0]
    for hour in report.hours:
        table = pq.read_table(hour.path)
        assert table.num_rows == 0 and table.schema == TELEMETRY_SCHEMA
    assert all(q.startswith("group by") for _, q in fake.requests)


def test_repulling_replaces_the_file(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    fake, url = fake_prometheus
    _one_gpu_hour(fake)
    settings = _settings(settings_factory, url)
    first = pull_telemetry(settings, H, H + timedelta(hours=1)).hours[0]
    again = pull_telemetry(settings, H, H + timedelta(hours=1)).hours[0]
    assert pq.read_table(first.path).equals(pq.read_table(again.path))
    assert sorted(p.name for p in again.path.parent.iterdir()) == [
        "_manifest.json",
        "samples.parquet",
    ]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (datetime(2026, 11, 20, 9), datetime(2026, 11, 20, 10, tzinfo=UTC)),  # noqa: DTZ001
        (H, datetime(2026, 11, 20, 10)),  # noqa: DTZ001
        (H, H),
        (H + timedelta(hours=1), H),
    ],
)
def test_window_must_be_aware_and_non_empty(
    settings_factory: SettingsFactory, start: datetime, end: datetime
) -> None:
    settings = _settings(settings_factory, "http://127.0.0.1:1")
    with pytest.raises(InputError):
        pull_telemetry(settings, start, end)


def test_hours_overlapping_the_window_are_pulled(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory
) -> None:
    _, url = fake_prometheus
    start = H + timedelta(minutes=20)
    report = pull_telemetry(_settings(settings_factory, url), start, start + timedelta(hours=1))
    assert [h.hour_start for h in report.hours] == [H, H + timedelta(hours=1)]
    assert (report.start, report.end) == (H, H + timedelta(hours=2))


def test_hours_written_before_a_failure_stay(
    fake_prometheus: tuple[FakePrometheus, str], settings_factory: SettingsFactory, tmp_path: Path
) -> None:
    fake, url = fake_prometheus
    _one_gpu_hour(fake)
    original = fake.answer
    second_hour_s = (H_MS + 2 * 3_600_000 - 1) / 1000

    def second_hour_fails(query: str, at_s: float) -> tuple[int, bytes]:
        if abs(at_s - second_hour_s) < 1e-3:
            return 200, b"garbage"
        return original(query, at_s)

    fake.answer = second_hour_fails  # type: ignore[method-assign]
    settings = _settings(settings_factory, url)
    written = []
    with pytest.raises(ServiceError, match="malformed"):
        pull_telemetry(settings, H, H + timedelta(hours=3), on_hour=written.append)
    assert [h.hour_start for h in written] == [H]
    lake = Lake(settings.lake_path)
    assert (lake.telemetry_hour_dir(H) / "samples.parquet").exists()
    assert not lake.telemetry_hour_dir(H + timedelta(hours=1)).exists()
