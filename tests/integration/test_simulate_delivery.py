"""A simulation delivered to a real Tansu broker and a real Prometheus, read back exactly.

The module has its own local stack (it restarts Prometheus to load backfilled blocks,
which the shared session stack must not see).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import polars as pl
import pytest

from ingest.kafka_readback import read_topic
from ingest.settings import Settings
from ingest.simulator import SimulationConfig, TelemetryConfig, default_fleet, simulate
from ingest.simulator.delivery import DeliveryReport, deliver, event_payloads
from ingest.simulator.run import SimulationResult
from ingest.stack import LocalStack
from models.usage_event import parse_usage_event
from pipelines.cli import main
from tests.conftest import running_stack

pytestmark = pytest.mark.integration

# A past window (queried as history), on whole minutes.
START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_stack(
        tmp_path_factory.mktemp("delivery") / "state",
        kafka={"topic": "gpuledger.usage.v1", "topic_partitions": 4},
    ) as settings:
        yield settings


@pytest.fixture(scope="module")
def delivered(
    own_stack: Settings, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SimulationResult, DeliveryReport]:
    config = SimulationConfig(
        start=START,
        duration_s=45 * 60,
        seed=21,
        rate_per_s=4.0,
        telemetry=TelemetryConfig(
            counter_resets_per_gpu_day=20,
            missed_scrape_rate=0.01,
            outages_per_node_day=0,
            placeholder_rate=0.002,
            hostname_label="mixed",
        ),
    )
    result = simulate(default_fleet(nodes=2, gpus_per_node=4, tenants=3, seed=21), config)
    report = deliver(result, own_stack, tmp_path_factory.mktemp("run"))
    return result, report


def instant(settings: Settings, query: str, at_s: float) -> list[dict[str, object]]:
    url = LocalStack(settings).prometheus_url()
    response = httpx.get(f"{url}/api/v1/query", params={"query": query, "time": at_s}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_every_event_is_on_the_topic_byte_for_byte(
    own_stack: Settings, delivered: tuple[SimulationResult, DeliveryReport]
) -> None:
    result, report = delivered
    assert report.published is not None
    assert report.published.published == result.requests.height
    expected = dict(
        zip(
            event_payloads(result)["key"].to_list(),
            event_payloads(result)["value"].to_list(),
            strict=True,
        )
    )
    records = list(read_topic(own_stack))
    assert len(records) == len(expected)
    got = {r.key: r.value for r in records}
    assert got == expected
    assert len({r.partition for r in records}) == 4  # keyed by id: spread over partitions
    for value in list(got.values())[:500]:
        parse_usage_event(value)


def test_range_vectors_return_what_the_simulator_wrote_label_for_label(
    own_stack: Settings, delivered: tuple[SimulationResult, DeliveryReport]
) -> None:
    result, _ = delivered
    telemetry = result.telemetry
    end_s = result.horizon_end_ms / 1000
    span_s = math.ceil((result.horizon_end_ms - result.window_start_ms) / 1000) + 60
    instances = "|".join(f"{n.hostname}:9400" for n in result.fleet.spec.nodes)
    written = telemetry.samples.join(telemetry.series, on="series_id")
    label_names = telemetry.label_names
    checked = 0
    for metric in telemetry.series["metric"].unique().sort():
        answer = instant(own_stack, f'{metric}{{instance=~"{instances}"}}[{span_s}s]', end_s)
        assert len(answer) == telemetry.series.filter(pl.col("metric") == metric).height
        for series in answer:
            labels = dict(series["metric"])  # type: ignore[call-overload]
            assert labels.pop("__name__") == metric
            mine = written.filter(pl.col("metric") == metric)
            for name in label_names:
                value = labels.get(name)
                mine = mine.filter(
                    pl.col(name).is_null() if value is None else pl.col(name) == value
                )
            # Exactly our labels: nothing added, nothing lost.
            assert set(labels) == {n for n in label_names if mine[n].null_count() == 0}
            expected = mine.sort("ts_ms").select("ts_ms", "value").rows()
            got = [(round(float(t) * 1000), float(v)) for t, v in series["values"]]  # type: ignore[index]
            assert got == expected, (metric, labels.get("UUID"))
            checked += len(got)
    assert checked == telemetry.samples.height


def test_stepped_range_query_answers_the_latest_sample(
    own_stack: Settings, delivered: tuple[SimulationResult, DeliveryReport]
) -> None:
    """query_range fills each step with the latest sample within the lookback delta."""
    result, _ = delivered
    series = result.telemetry.series.filter(pl.col("metric") == "DCGM_FI_DEV_POWER_USAGE").row(
        0, named=True
    )
    samples = result.telemetry.samples.filter(pl.col("series_id") == series["series_id"]).sort(
        "ts_ms"
    )
    url = LocalStack(own_stack).prometheus_url()
    start_s = result.window_start_ms / 1000 + 600
    end_s = start_s + 900
    response = httpx.get(
        f"{url}/api/v1/query_range",
        params={
            "query": f'DCGM_FI_DEV_POWER_USAGE{{UUID="{series["UUID"]}"}}',
            "start": start_s,
            "end": end_s,
            "step": "7s",
        },
        timeout=60,
    )
    response.raise_for_status()
    values = response.json()["data"]["result"][0]["values"]
    ts = samples["ts_ms"].to_numpy()
    for t, v in values:
        latest = int((ts <= float(t) * 1000).nonzero()[0].max())
        assert float(v) == samples["value"][latest]
    assert len(values) == 900 // 7 + 1


def test_counter_resets_and_placeholders_are_visible_in_prometheus(
    own_stack: Settings, delivered: tuple[SimulationResult, DeliveryReport]
) -> None:
    result, _ = delivered
    end_s = result.horizon_end_ms / 1000
    span = f"{math.ceil(result.horizon_s) + 60}s"
    resets = instant(own_stack, f"resets(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[{span}])", end_s)
    seen = sum(int(float(r["value"][1])) for r in resets)  # type: ignore[index]
    injected = result.telemetry.anomalies.filter(pl.col("kind") == "counter_reset").height
    assert injected > 0 and seen >= 1
    # Blank placeholders are stored as reported, so every series that had one shows it.
    blanks = result.telemetry.anomalies.filter(pl.col("kind") == "placeholder")
    assert blanks.height > 0
    expected = set(blanks.select("metric", "gpu_uuid").iter_rows())
    found = set()
    for metric in blanks["metric"].unique():
        for series in instant(own_stack, f"max_over_time({metric}[{span}]) >= 1.4e14", end_s):
            found.add((metric, series["metric"]["UUID"]))  # type: ignore[index]
    assert found == expected


def test_reloading_the_same_window_replaces_it(
    own_stack: Settings,
    delivered: tuple[SimulationResult, DeliveryReport],
    tmp_path: Path,
) -> None:
    result, _ = delivered
    end_s = result.horizon_end_ms / 1000
    span = f"{math.ceil(result.horizon_s) + 60}s"
    query = f"sum(count_over_time(DCGM_FI_DEV_POWER_USAGE[{span}]))"
    before = float(instant(own_stack, query, end_s)[0]["value"][1])  # type: ignore[index]
    deliver(result, own_stack, tmp_path / "again", to_kafka=False)
    after = float(instant(own_stack, query, end_s)[0]["value"][1])  # type: ignore[index]
    assert (
        before
        == after
        == result.telemetry.samples.join(
            result.telemetry.series.filter(pl.col("metric") == "DCGM_FI_DEV_POWER_USAGE"),
            on="series_id",
        ).height
    )


def test_cli_simulate_end_to_end(
    own_stack: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GPULEDGER_STATE_DIR", str(own_stack.state_dir))
    monkeypatch.setenv("GPULEDGER_KAFKA__TOPIC", "cli-e2e.usage.v1")
    monkeypatch.chdir(tmp_path)
    start = (START - timedelta(days=1)).isoformat()
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--start",
            start,
            "--hours",
            "0.2",
            "--nodes",
            "1",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    truth = pl.read_parquet(out / "requests.parquet")
    settings = own_stack.model_copy(
        update={"kafka": own_stack.kafka.model_copy(update={"topic": "cli-e2e.usage.v1"})}
    )
    ids = {r.key.decode() for r in read_topic(settings) if r.key is not None}
    assert ids == set(truth["request_id"].to_list())
