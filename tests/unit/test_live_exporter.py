"""The simulator's live mode: the dcgm-exporter endpoint, event playback, registration.

The exporter runs on a real HTTP server on a free port and is fetched with httpx; its
clock is a fake one the test sets, so a five-minute simulation is walked in
milliseconds. The exposition is parsed with a strict regex (no prometheus_client).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest

from ingest.settings import Settings
from ingest.simulator.fleet import default_fleet
from ingest.simulator.live import (
    CONTENT_TYPE,
    LiveEventPlayer,
    LiveExporter,
    live_stream,
    register_with_local_prometheus,
    run_live,
    unregister_from_local_prometheus,
)
from ingest.simulator.run import SimulationConfig, SimulationResult, simulate, stream
from ingest.simulator.telemetry import (
    DCGM_FP64_BLANK,
    DCGM_INT64_BLANK,
    ENERGY_METRIC,
    METRICS,
    TelemetryConfig,
    gpu_labels,
    node_schedule,
    sample_gpu,
)
from ingest.usage_publisher import CONTENT_TYPE_HEADER

START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SEED = 7
#: Metrics sample_gpu computes without noise: equal to sample_gpu whatever the stream.
NOISELESS = (
    "DCGM_FI_DEV_SM_CLOCK",
    ENERGY_METRIC,
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
)

# -- a strict parser for the text exposition format 0.0.4 ---------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
_HELP = re.compile(rf"^# HELP ({_NAME}) (.*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
# name{labels} value — and no timestamp, like dcgm-exporter.
_SAMPLE = re.compile(rf"^({_NAME})\{{((?:{_LABEL})(?:,{_LABEL})*)\}} (\S+)$")
_VALUE = re.compile(r"^-?(?:[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?|NaN|\+Inf|-Inf)$")


@dataclass
class Family:
    name: str
    help: str = ""
    type: str = ""
    samples: list[tuple[dict[str, str], float, str]] = field(default_factory=list)


def parse_exposition(body: str) -> dict[str, Family]:
    """Families by name; fails on any line that is not HELP, TYPE or a sample of the
    family just declared, on a family declared twice and on a missing final newline."""
    assert body.endswith("\n")
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in body[:-1].split("\n"):
        if m := _HELP.match(line):
            assert m[1] not in families, f"family {m[1]} declared twice"
            current = families[m[1]] = Family(m[1], help=m[2])
        elif m := _TYPE.match(line):
            assert current is not None and current.name == m[1] and not current.type, line
            current.type = m[2]
        elif m := _SAMPLE.match(line):
            assert current is not None and current.name == m[1] and current.type, line
            labels = dict(re.findall(_LABEL, m[2]))
            assert len(labels) == m[2].count('="'), f"repeated label in {line}"
            text = m[m.lastindex or 0]
            assert _VALUE.match(text), f"bad value {text!r}"
            current.samples.append((labels, float(text), text))
        else:
            raise AssertionError(f"not an exposition line: {line!r}")
    return families


# -- fixtures -------------------------------------------------------------------------


class ManualClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _simulate(**telemetry: Any) -> SimulationResult:
    spec = default_fleet(nodes=2, gpus_per_node=2, tenants=3)
    config = SimulationConfig(
        start=START, duration_s=300.0, seed=SEED, telemetry=TelemetryConfig(**telemetry)
    )
    return simulate(spec, config)


@pytest.fixture(scope="module")
def result() -> SimulationResult:
    return _simulate(outages_per_node_day=0.0)


@pytest.fixture
def clock(result: SimulationResult) -> ManualClock:
    return ManualClock(result.window_start_ms / 1000.0)


@pytest.fixture
def exporter(result: SimulationResult, clock: ManualClock) -> Iterator[LiveExporter]:
    with LiveExporter(result, port=0, clock=clock) as live:
        yield live


def _phases(result: SimulationResult) -> dict[int, float]:
    """Each node's collection phase, derived here from the scrape stream."""
    schedule = node_schedule(
        result.fleet, result.config.telemetry, stream(result.config.seed, "scrape")
    )
    return {node: collect for node, (collect, _) in schedule.items()}


def _at(result: SimulationResult, seconds: float) -> float:
    return result.window_start_ms / 1000.0 + seconds


_client: list[httpx.Client] = []


@pytest.fixture(scope="module", autouse=True)
def _http_client() -> Iterator[None]:
    """One client for the module: building one per request costs ~10 ms (TLS context)."""
    with httpx.Client(timeout=5) as client:
        _client.append(client)
        yield
        _client.clear()


def _get(live: LiveExporter, path: str) -> httpx.Response:
    return _client[0].get(live.url + path)


def _expected_labels(result: SimulationResult, gpu_index: int) -> dict[str, str]:
    labels = gpu_labels(result.fleet.gpus[gpu_index], result.config.telemetry)
    del labels["instance"], labels["job"]
    return labels


def _by_uuid(family: Family) -> dict[str, tuple[float, str]]:
    return {labels["UUID"]: (value, text) for labels, value, text in family.samples}


# -- the exposition -------------------------------------------------------------------


def test_metrics_serves_eight_families_with_dcgm_labels_only(
    exporter: LiveExporter, clock: ManualClock, result: SimulationResult
) -> None:
    clock.now = _at(result, 60.0)  # after every node's first collection (phase < 30 s)
    response = _get(exporter, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    families = parse_exposition(response.text)
    assert list(families) == [m.name for m in METRICS]
    for metric in METRICS:
        family = families[metric.name]
        assert family.type == metric.kind
        assert family.help == metric.help
        assert len(family.samples) == len(result.fleet.gpus)
    assert families[ENERGY_METRIC].type == "counter"
    by_uuid = {g.uuid: g.index for g in result.fleet.gpus}
    for labels, _value, _text in families["DCGM_FI_DEV_POWER_USAGE"].samples:
        expected = _expected_labels(result, by_uuid[labels["UUID"]])
        # Exactly dcgm-exporter's labels, in its order; instance/job are the scraper's.
        assert list(labels.items()) == list(expected.items())
        assert "instance" not in labels and "job" not in labels


def test_node_path_serves_that_nodes_gpus_only(
    exporter: LiveExporter, clock: ManualClock, result: SimulationResult
) -> None:
    clock.now = _at(result, 60.0)
    everything = parse_exposition(_get(exporter, "/metrics").text)
    for node in result.fleet.spec.nodes:
        response = _get(exporter, f"/node/{node.hostname}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == CONTENT_TYPE
        families = parse_exposition(response.text)
        assert list(families) == [m.name for m in METRICS]
        uuids = {g.uuid for g in result.fleet.gpus if g.hostname == node.hostname}
        for name, family in families.items():
            assert set(_by_uuid(family)) == uuids
            assert {labels["Hostname"] for labels, _, _ in family.samples} == {node.hostname}
            # The same lines as in /metrics.
            assert _by_uuid(family).items() <= _by_uuid(everything[name]).items()


def test_health_and_unknown_paths(exporter: LiveExporter) -> None:
    assert _get(exporter, "/healthz").status_code == 200
    assert _get(exporter, "/node/no-such-host/metrics").status_code == 404
    assert _get(exporter, "/federate").status_code == 404


def test_a_live_scrape_sees_what_the_batch_scrape_at_that_time_saw(
    exporter: LiveExporter, clock: ManualClock, result: SimulationResult
) -> None:
    """At every batch scrape time, every node's live body carries the batch values."""
    telemetry = result.telemetry
    samples = telemetry.samples.join(
        telemetry.series.select("series_id", "metric", "UUID", "Hostname"), on="series_id"
    )
    compared = 0
    for (hostname, ts_ms), group in samples.group_by("Hostname", "ts_ms"):
        clock.now = int(ts_ms) / 1000.0
        families = parse_exposition(_get(exporter, f"/node/{hostname}/metrics").text)
        for metric, uuid, value in group.select("metric", "UUID", "value").iter_rows():
            live_value, _text = _by_uuid(families[metric])[uuid]
            assert live_value == value, (metric, uuid, ts_ms)
            compared += 1
    assert compared == telemetry.samples.height > 0


def test_values_are_sample_gpu_at_the_latest_collection(
    exporter: LiveExporter, clock: ManualClock, result: SimulationResult
) -> None:
    phases = _phases(result)
    interval = result.config.telemetry.collect_interval_s
    for offset in (31.0, 95.5, 179.9, 250.0, result.horizon_s - 0.01):
        clock.now = _at(result, offset)
        families = parse_exposition(_get(exporter, "/metrics").text)
        for gpu, timeline in zip(result.fleet.gpus, result.timelines, strict=True):
            phase = phases[gpu.node_index]
            k = math.floor((offset - phase) / interval)
            assert k >= 0
            t_k = np.array([phase + k * interval])
            assert t_k[0] <= offset < t_k[0] + interval
            expected = sample_gpu(timeline, t_k, np.random.default_rng(0))
            for name in NOISELESS:
                live_value, _ = _by_uuid(families[name])[gpu.uuid]
                if live_value not in (float(DCGM_INT64_BLANK), DCGM_FP64_BLANK):
                    assert live_value == expected[name][0], (name, gpu.uuid, offset)
            # Noisy metrics: sample_gpu's value up to its noise.
            power, _ = _by_uuid(families["DCGM_FI_DEV_POWER_USAGE"])[gpu.uuid]
            if power != DCGM_FP64_BLANK:
                assert power == pytest.approx(expected["DCGM_FI_DEV_POWER_USAGE"][0], rel=0.03)


def test_collections_the_batch_never_scraped_are_sampled_live(clock: ManualClock) -> None:
    # Scrapes every 60 s, collections every 30 s: the batch skips every other collection.
    result = _simulate(scrape_interval_s=60.0, outages_per_node_day=0.0, placeholder_rate=0.0)
    clock.now = result.window_start_ms / 1000.0
    phases = _phases(result)
    interval = result.config.telemetry.collect_interval_s
    with LiveExporter(result, clock=clock) as live:
        unscraped = 0
        for gpu, timeline in zip(result.fleet.gpus, result.timelines, strict=True):
            phase = phases[gpu.node_index]
            ks = np.arange(phase, result.horizon_s, interval).size
            missing = [k for k in range(ks) if not live.from_batch(gpu.index, k)]
            assert missing, "expected collections with no batch scrape"
            unscraped += len(missing)
            t = phase + np.array(missing) * interval
            # The documented stream: sample_gpu over the unscraped collections at once.
            expected = sample_gpu(timeline, t, live_stream(result.config.seed, gpu.index))
            for i, k in enumerate(missing):
                clock.now = _at(result, float(t[i]) + 0.5)
                families = parse_exposition(_get(live, f"/node/{gpu.hostname}/metrics").text)
                for metric in METRICS:
                    live_value, _ = _by_uuid(families[metric.name])[gpu.uuid]
                    assert live_value == expected[metric.name][i], (metric.name, k)
        assert unscraped > 0


def test_scrapes_within_one_collection_return_identical_bodies(
    exporter: LiveExporter, clock: ManualClock, result: SimulationResult
) -> None:
    phases = _phases(result)
    interval = result.config.telemetry.collect_interval_s
    node = result.fleet.spec.nodes[1]
    phase = phases[1]
    path = f"/node/{node.hostname}/metrics"
    bodies = []
    for k in (2, 3, 4):
        start = phase + k * interval
        clock.now = _at(result, start + 0.001)  # just after the collection
        first = _get(exporter, path).text
        for dt in (0.002, interval / 3, interval / 2, interval - 0.01):
            clock.now = _at(result, start + dt)
            assert _get(exporter, path).text == first, (k, dt)
        bodies.append(first)
    # The counter moves at every collection, so consecutive bodies differ.
    assert len(set(bodies)) == len(bodies)


def test_energy_counter_never_decreases_except_at_a_reset(clock: ManualClock) -> None:
    # About eight resets per GPU over the window, so the exception is exercised.
    result = _simulate(
        counter_resets_per_gpu_day=2000.0, outages_per_node_day=0.0, placeholder_rate=0.0
    )
    phases = _phases(result)
    interval = result.config.telemetry.collect_interval_s
    resets_seen = 0
    with LiveExporter(result, clock=clock) as live:
        for node_index, node in enumerate(result.fleet.spec.nodes):
            phase = phases[node_index]
            previous: dict[str, tuple[float, float]] = {}
            for t in np.arange(phase, result.horizon_s, interval):
                clock.now = _at(result, float(t) + 1.0)
                families = parse_exposition(_get(live, f"/node/{node.hostname}/metrics").text)
                for uuid, (value, text) in _by_uuid(families[ENERGY_METRIC]).items():
                    assert re.fullmatch(r"[0-9]+", text), "integer mJ"
                    if uuid in previous:
                        before_t, before = previous[uuid]
                        timeline = next(tl for tl in result.timelines if tl.gpu.uuid == uuid)
                        reset = bool(
                            ((timeline.reset_s > before_t) & (timeline.reset_s <= t)).any()
                        )
                        if reset:
                            resets_seen += value < before
                        else:
                            assert value >= before, (uuid, t)
                    previous[uuid] = (float(t), value)
    assert resets_seen > 0


def test_outage_answers_503_and_drops_the_node_from_metrics(clock: ManualClock) -> None:
    result = _simulate(outages_per_node_day=3000.0, outage_s=(20.0, 40.0))
    outages = result.telemetry.anomalies.filter(kind="outage").sort("start_ms")
    assert outages.height > 0
    by_host = {n.hostname: n for n in result.fleet.spec.nodes}
    with LiveExporter(result, clock=clock) as live:
        checked = 0
        for hostname, start_ms, end_ms in outages.select("hostname", "start_ms", "end_ms").rows():
            middle = (start_ms + end_ms) / 2000.0
            if middle - result.window_start_ms / 1000.0 >= result.horizon_s:
                continue
            clock.now = middle
            response = _get(live, f"/node/{hostname}/metrics")
            assert response.status_code == 503
            assert "outage" in response.text
            everything = _get(live, "/metrics")
            assert everything.status_code == 200
            family = parse_exposition(everything.text)["DCGM_FI_DEV_POWER_USAGE"]
            assert hostname not in {labels["Hostname"] for labels, _, _ in family.samples}
            checked += 1
        assert checked > 0
        assert set(by_host) >= set(outages["hostname"])
        # Outside every outage of a node its path answers 200.
        host = outages["hostname"][0]
        windows = outages.filter(hostname=host).select("start_ms", "end_ms").rows()
        for offset in np.arange(1.0, result.horizon_s, 7.0):
            now = _at(result, float(offset))
            if not any(s <= now * 1000 < e for s, e in windows):
                clock.now = now
                assert _get(live, f"/node/{host}/metrics").status_code == 200


def test_before_the_window_and_beyond_the_horizon_answer_503(
    exporter: LiveExporter, clock: ManualClock, result: SimulationResult
) -> None:
    host = result.fleet.spec.nodes[0].hostname
    clock.now = _at(result, -5.0)
    for path in ("/metrics", f"/node/{host}/metrics"):
        response = _get(exporter, path)
        assert response.status_code == 503
        assert "not started" in response.text
    clock.now = _at(result, result.horizon_s)
    for path in ("/metrics", f"/node/{host}/metrics"):
        response = _get(exporter, path)
        assert response.status_code == 503
        assert "simulation over" in response.text
    assert _get(exporter, "/healthz").status_code == 200


def test_before_a_nodes_first_collection_it_serves_no_samples(
    exporter: LiveExporter, clock: ManualClock, result: SimulationResult
) -> None:
    phases = _phases(result)
    node_index = max(phases, key=lambda n: phases[n])
    clock.now = _at(result, phases[node_index] / 2)
    host = result.fleet.spec.nodes[node_index].hostname
    families = parse_exposition(_get(exporter, f"/node/{host}/metrics").text)
    assert list(families) == [m.name for m in METRICS]
    assert all(not f.samples for f in families.values())


def test_placeholders_are_the_batch_ones_in_dcgm_spelling(clock: ManualClock) -> None:
    result = _simulate(placeholder_rate=0.1, outages_per_node_day=0.0)
    anomalies = result.telemetry.anomalies.filter(kind="placeholder")
    assert anomalies.height > 0
    integer = {m.name: m.integer for m in METRICS}
    with LiveExporter(result, clock=clock) as live:
        for hostname, uuid, metric, start_ms in anomalies.select(
            "hostname", "gpu_uuid", "metric", "start_ms"
        ).rows():
            clock.now = start_ms / 1000.0
            families = parse_exposition(_get(live, f"/node/{hostname}/metrics").text)
            _, text = _by_uuid(families[metric])[uuid]
            assert text == (str(DCGM_INT64_BLANK) if integer[metric] else repr(DCGM_FP64_BLANK))


# -- registration ---------------------------------------------------------------------


def test_register_writes_one_group_per_node_and_unregister_removes_it(
    exporter: LiveExporter, result: SimulationResult, tmp_path: Any
) -> None:
    hosts = [n.hostname for n in result.fleet.spec.nodes]
    path = register_with_local_prometheus(exporter, tmp_path, hosts)
    assert path.parent == tmp_path and path.suffix == ".json"
    groups = json.loads(path.read_text())
    assert groups == [
        {
            "targets": [f"127.0.0.1:{exporter.port}"],
            "labels": {"__metrics_path__": f"/node/{host}/metrics", "instance": f"{host}:9400"},
        }
        for host in hosts
    ]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    # Every registered path answers.
    for group in groups:
        assert _get(exporter, group["labels"]["__metrics_path__"]).status_code in (200, 503)
    assert unregister_from_local_prometheus(path)
    assert not path.exists()
    assert not unregister_from_local_prometheus(path)


# -- event playback -------------------------------------------------------------------


class FakeFuture:
    def __init__(self, error: BaseException | None = None) -> None:
        self.exception = error

    def failed(self) -> bool:
        return self.exception is not None


class FakeProducer:
    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.sent: list[tuple[str, bytes, bytes, Any, float]] = []
        self.flushes = 0
        self.closed = False
        self.lock = threading.Lock()

    def send(self, topic: str, *, key: bytes, value: bytes, headers: Any) -> FakeFuture:
        with self.lock:
            self.sent.append((topic, key, value, headers, self.clock()))
        return FakeFuture()

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def _wait_for(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_event_player_publishes_each_event_once_its_end_has_passed(
    result: SimulationResult, tmp_path: Any
) -> None:
    end_s = (result.requests["end_ts"].dt.epoch("us").to_numpy() / 1e6).astype(np.float64)
    ends = np.sort(end_s)
    assert ends.size > 50
    # Start the player a third of the way in: what has already ended goes at once.
    clock = ManualClock(float(ends[ends.size // 3]))
    producer = FakeProducer(clock)
    settings = Settings(state_dir=tmp_path)
    player = LiveEventPlayer(
        result,
        settings,
        topic="usage-test",
        clock=clock,
        batch_interval_s=0.005,
        producer_factory=lambda: producer,
    )
    assert player.pending == player.total == result.requests.height
    already = int((end_s <= clock.now).sum())
    player.start()
    _wait_for(lambda: player.published == already)
    for step in np.linspace(clock.now, float(ends[-1]), 7)[1:]:
        clock.now = float(step)
        due = int((end_s <= clock.now).sum())
        _wait_for(lambda due=due: player.published == due)
        time.sleep(0.02)  # nothing beyond what is due
        assert player.published == len(producer.sent) == due
        assert player.pending == player.total - due
    player.stop()
    assert producer.closed
    assert player.done and player.pending == 0
    ids = [key.decode() for _, key, _, _, _ in producer.sent]
    assert sorted(ids) == sorted(result.requests["request_id"].to_list())
    end_by_id = dict(zip(result.requests["request_id"].to_list(), end_s.tolist(), strict=True))
    for topic, key, value, headers, sent_at in producer.sent:
        assert topic == "usage-test"
        assert headers == [CONTENT_TYPE_HEADER]
        event = json.loads(value)
        assert event["id"] == key.decode()
        assert sent_at >= end_by_id[event["id"]]  # never before the request has ended


def test_event_player_stop_flushes_what_is_due_and_closes(
    result: SimulationResult, tmp_path: Any
) -> None:
    clock = ManualClock(result.window_start_ms / 1000.0)
    producer = FakeProducer(clock)
    player = LiveEventPlayer(
        result,
        Settings(state_dir=tmp_path),
        clock=clock,
        batch_interval_s=10.0,  # the loop sleeps; stop() must still publish what is due
        producer_factory=lambda: producer,
    )
    player.start()
    time.sleep(0.05)
    clock.now = _at(result, 120.0)
    due = int((result.requests["end_ts"].dt.epoch("us").to_numpy() / 1e6 <= clock.now).sum())
    player.stop()
    assert player.published == len(producer.sent) == due > 0
    assert producer.closed


def test_run_live_stops_at_the_horizon_and_shuts_the_server(
    result: SimulationResult, tmp_path: Any
) -> None:
    # A clock 1000x faster than real time, started just before the window.
    began = time.monotonic()
    origin = result.window_start_ms / 1000.0 - 1.0

    def fast() -> float:
        return origin + (time.monotonic() - began) * 1000.0

    ticks = []
    seen: dict[str, int] = {}

    def on_tick(status: Any) -> None:
        ticks.append(status)
        if "code" not in seen and status.sim_s > 40:
            seen["code"] = _client[0].get(status.url + "/metrics").status_code

    report = run_live(
        result,
        Settings(state_dir=tmp_path),
        port=0,
        register=False,
        publish=False,
        on_tick=on_tick,
        clock=fast,
        tick_s=0.01,
    )
    assert report.reason == "horizon"
    assert report.stopped_at >= result.window_start_ms / 1000.0 + result.horizon_s
    assert ticks and ticks[-1].horizon_s == result.horizon_s
    assert seen["code"] == 200 and report.scrapes >= 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{report.port}/healthz", timeout=2)


def test_run_live_until_and_stop_event(result: SimulationResult, tmp_path: Any) -> None:
    clock = ManualClock(_at(result, 10.0))
    report = run_live(
        result,
        Settings(state_dir=tmp_path),
        port=0,
        register=False,
        publish=False,
        until=_at(result, 5.0),
        clock=clock,
        tick_s=0.01,
    )
    assert report.reason == "until"
    stop = threading.Event()
    stop.set()
    report = run_live(
        result,
        Settings(state_dir=tmp_path),
        port=0,
        register=False,
        publish=False,
        clock=clock,
        stop=stop,
        tick_s=0.01,
    )
    assert report.reason == "stopped"


def test_requests_frame_has_every_end_time(result: SimulationResult) -> None:
    # The player schedules by end_ts; a null would be published at the window start.
    assert result.requests["end_ts"].null_count() == 0
    assert result.requests["end_ts"].dtype == pl.Datetime("us", "UTC")


def test_register_sets_a_custom_job(clock: ManualClock, tmp_path: Any) -> None:
    result = _simulate(job="dcgm-custom", outages_per_node_day=0.0)
    with LiveExporter(result, clock=clock) as live:
        path = register_with_local_prometheus(live, tmp_path, name="custom")
        groups = json.loads(path.read_text())
    assert path.name == "custom.json"
    assert [g["labels"]["job"] for g in groups] == ["dcgm-custom"] * len(result.fleet.spec.nodes)
