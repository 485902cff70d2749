"""Live mode against the real Prometheus and the real Tansu broker of `local_stack`.

- Prometheus discovers the live exporter through the file_sd directory and scrapes
  each node's path; the series carry dcgm-exporter's labels, `instance="<host>:9400"`
  and the simulation's values.
- `run_live` publishes every usage event of a short simulation to a fresh topic; a
  kafka-python consumer reads them all back.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest

from ingest.kafka_readback import read_topic
from ingest.settings import Settings
from ingest.simulator.fleet import default_fleet
from ingest.simulator.live import LiveReport, run_live
from ingest.simulator.run import SimulationConfig, SimulationResult, simulate, stream
from ingest.simulator.telemetry import TelemetryConfig, node_schedule
from ingest.stack.prometheus import DCGM_JOB
from ingest.usage_publisher import CONTENT_TYPE_HEADER

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: Labels of a scraped DCGM series: dcgm-exporter's, then the scrape's.
SERIES_LABELS = {
    "__name__",
    "gpu",
    "UUID",
    "pci_bus_id",
    "device",
    "modelName",
    "Hostname",
    "DCGM_FI_DRIVER_VERSION",
    "instance",
    "job",
}


def _query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)


class LiveThread:
    """`run_live` in a background thread, stopped through its stop event."""

    def __init__(self, **kwargs: Any) -> None:
        self.stop = threading.Event()
        self.report: LiveReport | None = None
        self.error: BaseException | None = None
        self.kwargs = kwargs
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.report = run_live(stop=self.stop, **self.kwargs)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> LiveThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def test_prometheus_scrapes_the_live_exporter_per_node(local_stack: Any) -> None:
    telemetry = TelemetryConfig(
        scrape_interval_s=1.0,  # as the test stack's Prometheus
        collect_interval_s=2.0,
        missed_scrape_rate=0.0,
        outages_per_node_day=0.0,
        placeholder_rate=0.0,
    )
    spec = default_fleet(nodes=2, gpus_per_node=2, tenants=3)
    result = simulate(
        spec,
        SimulationConfig(start=datetime.now(UTC), duration_s=120.0, seed=4242, telemetry=telemetry),
    )
    hosts = [n.hostname for n in spec.nodes]
    uuids = {g.uuid: g for g in result.fleet.gpus}
    url = local_stack.prometheus_url
    targets_dir = local_stack.stack.prometheus_targets_dir
    live = LiveThread(
        result=result, settings=local_stack.settings, port=0, publish=False, tick_s=0.1
    )
    with live:

        def scraped() -> bool:
            assert live.error is None, live.error
            up = _query(url, f'up{{job="{DCGM_JOB}", instance=~"gpu-h100-0[01]:9400"}} == 1')
            power = [
                r
                for r in _query(url, "DCGM_FI_DEV_POWER_USAGE")
                if r["metric"].get("UUID") in uuids
            ]
            return {r["metric"]["instance"] for r in up} == {f"{h}:9400" for h in hosts} and (
                len(power) == len(uuids)
            )

        _eventually(scraped, timeout_s=60, what="Prometheus to scrape the live exporter")
        files = list(targets_dir.glob("gpuledger-live-*.json"))
        assert len(files) == 1
        groups = json.loads(files[0].read_text())
        assert {g["labels"]["instance"] for g in groups} == {f"{h}:9400" for h in hosts}
        time.sleep(3)  # a few more scrapes, over more than one collection

        for metric in ("DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"):
            ranged = _query(url, f"{metric}[2m]")
            ours = [r for r in ranged if r["metric"].get("UUID") in uuids]
            assert len(ours) == len(uuids)
            for series in ours:
                labels = series["metric"]
                gpu = uuids[labels["UUID"]]
                assert set(labels) == SERIES_LABELS
                assert labels["instance"] == f"{gpu.hostname}:9400"
                assert labels["job"] == DCGM_JOB
                assert labels["Hostname"] == gpu.hostname
                assert labels["gpu"] == str(gpu.local_index)
                assert labels["device"] == f"nvidia{gpu.local_index}"
                assert labels["pci_bus_id"] == gpu.pci_bus_id
                _check_values(result, metric, gpu.index, gpu.node_index, series["values"])
    assert live.error is None, live.error
    assert live.report is not None and live.report.reason == "stopped"
    assert live.report.scrapes > 0
    assert not list(targets_dir.glob("gpuledger-live-*.json")), "target file left behind"


def _check_values(
    result: SimulationResult,
    metric: str,
    gpu_index: int,
    node_index: int,
    values: list[list[Any]],
) -> None:
    """Each scraped sample is the batch telemetry's value of the collection current at
    its scrape time (or of the next one, if a collection fell between the scrape's
    start and the exporter answering)."""
    telemetry = result.telemetry
    series_id = telemetry.series.filter(metric=metric, gpu_index=gpu_index)["series_id"][0]
    batch = telemetry.samples.filter(series_id=series_id)
    collect_phase = node_schedule(
        result.fleet, result.config.telemetry, stream(result.config.seed, "scrape")
    )[node_index][0]
    interval = result.config.telemetry.collect_interval_s
    start_s = result.window_start_ms / 1000.0

    def collection(t_s: np.ndarray) -> np.ndarray:
        return np.floor((t_s - collect_phase) / interval).astype(np.int64)

    by_collection: dict[int, float] = {}
    for k, value in zip(
        collection(batch["ts_ms"].to_numpy() / 1000.0 - start_s).tolist(),
        batch["value"].to_list(),
        strict=True,
    ):
        assert by_collection.setdefault(k, value) == value
    assert len(values) >= 2
    for ts, text in values:
        k = math.floor((float(ts) - start_s - collect_phase) / interval)
        assert float(text) in (by_collection.get(k), by_collection.get(k + 1)), (metric, ts)


def test_run_live_publishes_every_event_to_kafka(local_stack: Any) -> None:
    topic = f"usage-live-{uuid.uuid4().hex[:10]}"
    settings = local_stack.settings.model_copy(
        update={
            "kafka": local_stack.settings.kafka.model_copy(
                update={"topic": topic, "topic_partitions": 3}
            )
        }
    )
    # 20 s of arrivals at 15/s; the window began 3 s ago, so some events are due at once.
    now = datetime.now(UTC)
    result = simulate(
        default_fleet(nodes=2, gpus_per_node=2, tenants=3),
        SimulationConfig(
            start=now - timedelta(seconds=3),
            duration_s=20.0,
            seed=99,
            rate_per_s=15.0,
            # A short collect interval keeps the horizon (last end + 1 interval) short.
            telemetry=TelemetryConfig(
                collect_interval_s=2.0, scrape_interval_s=1.0, outages_per_node_day=0.0
            ),
        ),
    )
    ids = set(result.requests["request_id"].to_list())
    assert 150 <= len(ids) == result.requests.height
    # Requests still decoding at the window's end finish later: play at 3x real time so
    # the last one (tens of seconds after the window) ends within a few seconds.
    began_real = time.time()
    began_fake = now.timestamp()
    speed = 3.0

    def fast() -> float:
        return began_fake + (time.time() - began_real) * speed

    report = run_live(
        result, settings, port=0, register=False, publish=True, clock=fast, tick_s=0.2
    )
    assert report.reason == "horizon"
    assert report.events == report.published == len(ids)
    assert report.pending == 0

    end_s = dict(
        zip(
            result.requests["request_id"].to_list(),
            (result.requests["end_ts"].dt.epoch("us").to_numpy() / 1e6).tolist(),
            strict=True,
        )
    )
    records = _consume_all(local_stack.settings, topic, expected=len(ids))
    got = [r.key.decode() for r in records]
    assert len(got) == len(ids)  # each once
    assert set(got) == ids
    for record in records:
        assert (CONTENT_TYPE_HEADER[0], CONTENT_TYPE_HEADER[1]) in [
            (k, v) for k, v in record.headers
        ]
        event = json.loads(record.value)
        assert event["id"] == record.key.decode()
        # Sent no earlier than the request's end on the player's clock (the record's
        # timestamp is the producer's real send time, in ms).
        sent_fake = began_fake + (record.timestamp_ms / 1000.0 - began_real) * speed
        assert sent_fake >= end_s[event["id"]] - 0.01 * speed


def _consume_all(settings: Settings, topic: str, *, expected: int) -> list[Any]:
    """Every record of `topic`. Not by end offsets: Tansu 0.6.0 under-reports them."""
    topic_settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"topic": topic})}
    )
    records = list(read_topic(topic_settings))
    assert len(records) == expected
    return records
