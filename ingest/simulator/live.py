"""Live mode: play a precomputed simulation in real time, as a fleet would emit it.

A simulation whose window starts now (`SimulationConfig(start=now, ...)`) is played
against the wall clock:

- `LiveExporter` serves dcgm-exporter's Prometheus text exposition (format 0.0.4)
  over HTTP: `/node/<hostname>/metrics` for one node's GPUs (one scrape target per
  node, as with one exporter per node in a real fleet), `/metrics` for every node,
  `/healthz`. It emits dcgm-exporter's labels only; `instance` and `job` are added by
  the Prometheus that scrapes it.
- `LiveEventPlayer` publishes each request's usage event to Kafka once its end time
  has passed.
- `register_with_local_prometheus` adds one target per node to the local stack's
  `dcgm-exporter` job, with `instance="<host>:9400"` as in the backfilled history.
- `run_live` runs all three until the simulation's horizon, then stops them cleanly.

Values follow the exporter's collection cycle: at wall-clock time `now` a node serves
its latest collection at or before `now` (every `collect_interval_s`, with the node's
phase from `telemetry.node_schedule`), so repeated scrapes between collections return
identical bodies. A collection the batch telemetry scraped (`result.telemetry`) is
served with exactly the batch values, injected placeholders included, so a live
scrape at time t sees what the batch says a scrape at t saw. A collection the batch
never scraped (its scrapes were lost, or the scrape interval exceeds the collect
interval) is sampled here with `sample_gpu` from a stream of its own, and blanked at
`placeholder_rate`. Counter resets come from the timelines. During an injected
outage the node's path answers 503 (Prometheus records `up=0` and no samples);
before the window starts and after the horizon every metrics path answers 503.
Missed single scrapes are a property of the scraper, so live mode does not inject them.

Every time-dependent part takes a `clock` (seconds since the epoch, like
`time.time`), so tests can drive it with a fake clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

import numpy as np
from kafka import KafkaProducer
from kafka.errors import KafkaError

from ingest.endpoints import is_local_stack_prometheus, kafka_client_options
from ingest.settings import Settings
from ingest.simulator.delivery import event_payloads
from ingest.simulator.run import SimulationResult, stream
from ingest.simulator.telemetry import (
    DCGM_FP64_BLANK,
    DCGM_INT64_BLANK,
    EXPORTER_PORT,
    METRICS,
    gpu_labels,
    node_schedule,
    sample_gpu,
)
from ingest.stack import LocalStack
from ingest.stack.prometheus import DCGM_JOB, unregister_scrape_target
from ingest.usage_publisher import CONTENT_TYPE_HEADER, ensure_topic
from models.errors import ServiceError

Clock = Callable[[], float]

#: Prometheus text exposition format 0.0.4, as dcgm-exporter serves it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Labels a scrape adds; the exporter itself never emits them.
_SCRAPE_LABELS = ("instance", "job")
#: A float at or above this is DCGM's int64 blank (2**63 - 16 rounds to 2**63 in float64).
_INT_BLANK_FLOAT = float(DCGM_INT64_BLANK)
_NODE_PATH = re.compile(r"^/node/(?P<host>[^/]+)/metrics/?$")
_METRIC_NAMES = tuple(m.name for m in METRICS)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float, integer: bool) -> str:
    if integer:
        if value >= _INT_BLANK_FLOAT:
            return str(DCGM_INT64_BLANK)
        return str(int(value))
    # Shortest text that parses back to the same float64: Prometheus stores exactly
    # the value the batch telemetry holds.
    return repr(float(value))


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class UnavailableError(Exception):
    """A metrics path cannot answer now: HTTP 503 with `message`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class _NodeCycle:
    hostname: str
    collect_phase_s: float
    n_collections: int
    gpu_indices: tuple[int, ...]  # fleet-wide GPU indices, in local order
    outages_ms: tuple[tuple[int, int], ...]  # [start, end) relative to the window start


class LiveExporter:
    """dcgm-exporter-compatible HTTP endpoint replaying `result`'s telemetry in real time.

    `start()` binds and serves from a background thread; `port` is the bound port
    (pick a free one with `port=0`). Use as a context manager or call `stop()`.
    """

    def __init__(
        self,
        result: SimulationResult,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.time,
    ) -> None:
        self.result = result
        self.host = host
        self._requested_port = port
        self.clock = clock
        self.window_start_s = result.window_start_ms / 1000.0
        self.horizon_s = result.horizon_s
        config = result.config.telemetry
        self.collect_interval_s = float(config.collect_interval_s)
        fleet = result.fleet
        # The scrape stream's first draws are the node schedule (scrape_telemetry).
        schedule = node_schedule(fleet, config, stream(result.config.seed, "scrape"))
        self._schedule = schedule
        outages = result.telemetry.anomalies.filter(kind="outage")
        self.nodes: list[_NodeCycle] = []
        for node_index, node in enumerate(fleet.spec.nodes):
            phase = schedule[node_index][0]
            n_collections = int(np.arange(phase, self.horizon_s, self.collect_interval_s).size)
            windows = outages.filter(hostname=node.hostname)
            self.nodes.append(
                _NodeCycle(
                    hostname=node.hostname,
                    collect_phase_s=phase,
                    n_collections=n_collections,
                    gpu_indices=tuple(g.index for g in fleet.gpus if g.node_index == node_index),
                    outages_ms=tuple(
                        (int(s) - result.window_start_ms, int(e) - result.window_start_ms)
                        for s, e in zip(windows["start_ms"], windows["end_ms"], strict=True)
                    ),
                )
            )
        self._node_by_host = {n.hostname: i for i, n in enumerate(self.nodes)}
        self._labels = [
            {k: v for k, v in gpu_labels(g, config).items() if k not in _SCRAPE_LABELS}
            for g in fleet.gpus
        ]
        self._label_text = [
            ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) for labels in self._labels
        ]
        #: Per GPU: collections x metrics (in METRICS order).
        self._values: list[np.ndarray] = []
        #: Per GPU: which collections were taken from the batch telemetry.
        self._from_batch: list[np.ndarray] = []
        self._build_values()
        self._cache: dict[int, tuple[int, list[list[str]]]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.scrapes = 0
        self.unavailable = 0

    # -- values -------------------------------------------------------------------

    def _build_values(self) -> None:
        result = self.result
        config = result.config.telemetry
        fleet = result.fleet
        metric_col = {name: i for i, name in enumerate(_METRIC_NAMES)}
        values = []
        filled = []
        for g in fleet.gpus:
            n = self.nodes[g.node_index].n_collections
            values.append(np.full((n, len(METRICS)), np.nan))
            filled.append(np.zeros((n, len(METRICS)), dtype=bool))
        series = result.telemetry.series
        samples = result.telemetry.samples
        series_ids = samples["series_id"].to_numpy()
        ts_ms = samples["ts_ms"].to_numpy()
        sample_values = samples["value"].to_numpy()
        bounds = np.searchsorted(series_ids, np.arange(series.height + 1))
        inconsistent: set[int] = set()
        grids: dict[int, np.ndarray] = {}
        for sid, metric, gpu_index in zip(
            series["series_id"].to_list(),
            series["metric"].to_list(),
            series["gpu_index"].to_list(),
            strict=True,
        ):
            gpu = fleet.gpus[gpu_index]
            collect_phase, scrape_phase = self._schedule[gpu.node_index]
            grid = grids.get(gpu.node_index)
            if grid is None:
                grid = np.arange(scrape_phase, self.horizon_s, config.scrape_interval_s)
                grids[gpu.node_index] = grid
            ts = ts_ms[bounds[sid] : bounds[sid + 1]]
            if ts.size == 0:
                continue
            # Recover each scrape's exact time on the node's scrape grid, then its
            # collection, with the batch's own arithmetic.
            rel_s = (ts - result.window_start_ms) / 1000.0
            j = np.rint((rel_s - scrape_phase) / config.scrape_interval_s).astype(np.int64)
            ok = (j >= 0) & (j < grid.size)
            scrape_t = grid[np.clip(j, 0, grid.size - 1)]
            ok &= result.window_start_ms + np.rint(scrape_t * 1000.0).astype(np.int64) == ts
            k = np.floor((scrape_t - collect_phase) / self.collect_interval_s).astype(np.int64)
            n = values[gpu_index].shape[0]
            ok &= (k >= 0) & (k < n)
            if not ok.all():
                inconsistent.add(gpu_index)
                continue
            col = metric_col[metric]
            values[gpu_index][k, col] = sample_values[bounds[sid] : bounds[sid + 1]]
            filled[gpu_index][k, col] = True
        if inconsistent:
            warnings.warn(
                f"live exporter: batch telemetry of {len(inconsistent)} GPU(s) does not follow "
                "the node schedule; their values are sampled live instead",
                RuntimeWarning,
                stacklevel=3,
            )
        for g, timeline in zip(fleet.gpus, result.timelines, strict=True):
            got: np.ndarray = np.asarray(filled[g.index].all(axis=1))
            if g.index in inconsistent:
                got[:] = False
            missing = np.flatnonzero(~got)
            if missing.size:
                node = self.nodes[g.node_index]
                rng = live_stream(result.config.seed, g.index)
                t = node.collect_phase_s + missing * self.collect_interval_s
                sampled = sample_gpu(timeline, t, rng)
                for col, metric in enumerate(METRICS):
                    v = sampled[metric.name].astype(np.float64)
                    blank = rng.random(missing.size) < config.placeholder_rate
                    blank_value = float(DCGM_INT64_BLANK) if metric.integer else DCGM_FP64_BLANK
                    values[g.index][missing, col] = np.where(blank, blank_value, v)
            self._values.append(values[g.index])
            self._from_batch.append(got)

    def collection_index(self, node_index: int, now: float | None = None) -> int:
        """Index of the node's latest collection at wall-clock `now` (-1: none yet)."""
        t = (self.clock() if now is None else now) - self.window_start_s
        node = self.nodes[node_index]
        k = int(np.floor((t - node.collect_phase_s) / self.collect_interval_s))
        return min(max(k, -1), node.n_collections - 1)

    def collection_time_s(self, node_index: int, k: int) -> float:
        """Seconds from the window start of the node's collection `k`."""
        return self.nodes[node_index].collect_phase_s + k * self.collect_interval_s

    def collection_values(self, gpu_index: int, k: int) -> dict[str, float]:
        """The eight metrics of one GPU's collection `k`, blanks included."""
        row = self._values[gpu_index][k]
        return {name: float(v) for name, v in zip(_METRIC_NAMES, row, strict=True)}

    def from_batch(self, gpu_index: int, k: int) -> bool:
        """True when collection `k` of this GPU is served with the batch telemetry's values."""
        return bool(self._from_batch[gpu_index][k])

    def labels(self, gpu_index: int) -> dict[str, str]:
        """The labels this exporter emits for a GPU (dcgm-exporter's, no instance/job)."""
        return dict(self._labels[gpu_index])

    def in_outage(self, node_index: int, now: float | None = None) -> bool:
        t_ms = ((self.clock() if now is None else now) - self.window_start_s) * 1000.0
        return any(s <= t_ms < e for s, e in self.nodes[node_index].outages_ms)

    # -- exposition ---------------------------------------------------------------

    def _check_window(self, now: float) -> None:
        t = now - self.window_start_s
        if t < 0:
            raise UnavailableError(
                f"simulation not started: its window starts at {_iso(self.window_start_s)}"
            )
        if t >= self.horizon_s:
            raise UnavailableError(
                "simulation over: its telemetry ended at "
                f"{_iso(self.window_start_s + self.horizon_s)}"
                f" (horizon {self.horizon_s:g} s); start a new simulation"
            )

    def _node_lines(self, node_index: int, now: float) -> list[list[str]]:
        """Per metric family, the node's sample lines at `now` (empty before its first
        collection)."""
        k = self.collection_index(node_index, now)
        with self._lock:
            cached = self._cache.get(node_index)
            if cached is not None and cached[0] == k:
                return cached[1]
        families: list[list[str]] = [[] for _ in METRICS]
        if k >= 0:
            for g in self.nodes[node_index].gpu_indices:
                row = self._values[g][k]
                labels = self._label_text[g]
                for col, metric in enumerate(METRICS):
                    value = _format_value(float(row[col]), metric.integer)
                    families[col].append(f"{metric.name}{{{labels}}} {value}\n")
        with self._lock:
            self._cache[node_index] = (k, families)
        return families

    def render(self, hostname: str | None = None, now: float | None = None) -> str:
        """The exposition body for one node (or all, with `hostname=None`) at `now`.

        Raises `UnavailableError` outside the simulation's window or during the node's
        outage, and KeyError for an unknown hostname.
        """
        now = self.clock() if now is None else now
        self._check_window(now)
        if hostname is not None:
            node_index = self._node_by_host[hostname]
            if self.in_outage(node_index, now):
                raise UnavailableError(f"exporter on {hostname} is down (simulated outage)")
            node_indices = [node_index]
        else:
            node_indices = [i for i in range(len(self.nodes)) if not self.in_outage(i, now)]
        per_node = [self._node_lines(i, now) for i in node_indices]
        parts: list[str] = []
        for col, metric in enumerate(METRICS):
            parts.append(
                f"# HELP {metric.name} {metric.help}\n# TYPE {metric.name} {metric.kind}\n"
            )
            for families in per_node:
                parts.extend(families[col])
        return "".join(parts)

    # -- server -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the live exporter is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    def node_path(self, hostname: str) -> str:
        return f"/node/{hostname}/metrics"

    def start(self) -> LiveExporter:
        if self._server is not None:
            return self
        try:
            server = ThreadingHTTPServer((self.host, self._requested_port), _handler_for(self))
        except OSError as exc:
            raise ServiceError(
                f"live exporter: cannot listen on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}"
            ) from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="gpuledger-live-exporter",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> LiveExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, path: str) -> tuple[int, str, str]:
        """(status, content type, body) for a GET of `path`."""
        if path in ("/healthz", "/health"):
            return 200, "text/plain; charset=utf-8", "ok\n"
        match = _NODE_PATH.match(path)
        if match is None and path.rstrip("/") != "/metrics":
            hosts = ", ".join(n.hostname for n in self.nodes)
            served = f"/metrics, /node/<hostname>/metrics ({hosts}), /healthz"
            return 404, "text/plain; charset=utf-8", f"not found: {path}; served: {served}\n"
        hostname = unquote(match["host"]) if match is not None else None
        if hostname is not None and hostname not in self._node_by_host:
            return 404, "text/plain; charset=utf-8", f"unknown node {hostname!r}\n"
        try:
            body = self.render(hostname)
        except UnavailableError as exc:
            with self._lock:
                self.unavailable += 1
            return 503, "text/plain; charset=utf-8", exc.message + "\n"
        with self._lock:
            self.scrapes += 1
        return 200, CONTENT_TYPE, body


def live_stream(seed: int, gpu_index: int) -> np.random.Generator:
    """The random stream of the collections the batch never scraped, per GPU."""
    return stream(seed, f"live-collections/{gpu_index}")


def _handler_for(exporter: LiveExporter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "gpuledger-live-dcgm/1"
        # HTTP/1.0: one request per connection, so no keep-alive connection outlives
        # stop() (handler threads are daemons that shutdown() does not wait for).
        protocol_version = "HTTP/1.0"
        timeout = 30

        def do_GET(self) -> None:
            try:
                status, content_type, body = exporter._answer(urlsplit(self.path).path)
            except Exception as exc:  # an internal error must not kill the server
                status = 500
                content_type = "text/plain; charset=utf-8"
                body = f"internal error: {type(exc).__name__}: {exc}\n"
            data = body.encode("utf-8")
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every second would flood the terminal

    return Handler


# -- Prometheus registration ------------------------------------------------------


def register_with_local_prometheus(
    exporter: LiveExporter,
    targets_dir: Path,
    hostnames: Sequence[str] | None = None,
    *,
    name: str | None = None,
) -> Path:
    """One file_sd target group per node, all pointing at the exporter.

    Each group has `__metrics_path__` `/node/<host>/metrics` and `instance`
    `<host>:9400`, so the live series carry the same `instance` as the backfilled
    history. A job other than `dcgm-exporter` in the simulation's telemetry config is
    set as a `job` label. Written atomically (temp file + rename); returns the path,
    which `unregister_from_local_prometheus` deletes.
    """
    hosts = list(hostnames) if hostnames is not None else [n.hostname for n in exporter.nodes]
    address = f"127.0.0.1:{exporter.port}"
    job = exporter.result.config.telemetry.job
    groups = []
    for host in hosts:
        labels = {
            "__metrics_path__": exporter.node_path(host),
            "instance": f"{host}:{EXPORTER_PORT}",
        }
        if job != DCGM_JOB:
            labels["job"] = job
        groups.append({"targets": [address], "labels": labels})
    targets_dir.mkdir(parents=True, exist_ok=True)
    stem = name or f"gpuledger-live-{exporter.port}"
    path = targets_dir / f"{stem}.json"
    tmp = targets_dir / f".{stem}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(groups, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def unregister_from_local_prometheus(path: Path) -> bool:
    """Delete a target file written by `register_with_local_prometheus`; True if it existed."""
    return unregister_scrape_target(path.parent, path.name.removesuffix(".json"))


# -- event playback ---------------------------------------------------------------


class _Future(Protocol):
    def failed(self) -> bool: ...

    @property
    def exception(self) -> BaseException | None: ...


class ProducerLike(Protocol):
    """What the player needs of a kafka-python `KafkaProducer`."""

    def send(self, topic: str, *, key: bytes, value: bytes, headers: Any) -> Any: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class LiveEventPlayer:
    """Publishes each request's usage event when its `end_ts` passes on `clock`.

    A background thread sends what has come due every `batch_interval_s` (keyed by
    event id, CloudEvents structured content-type header) and waits for the broker's
    acknowledgement; events already due at `start()` go at once. `published` counts
    acknowledged events, `pending` the rest. `stop()` publishes what is due, flushes
    and closes the producer, and raises a ServiceError if publishing failed.

    `producer_factory` replaces the KafkaProducer (and the topic check) in tests.
    """

    def __init__(
        self,
        result: SimulationResult,
        settings: Settings,
        *,
        topic: str | None = None,
        clock: Clock = time.time,
        batch_interval_s: float = 0.2,
        producer_factory: Callable[[], ProducerLike] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.kafka.topic
        self.clock = clock
        self.batch_interval_s = batch_interval_s
        self._producer_factory = producer_factory
        events = event_payloads(result)
        due_us = events["end_ts"].dt.epoch("us").fill_null(result.window_start_ms * 1000)
        order = np.argsort(due_us.to_numpy(), kind="stable")
        self._due_s = due_us.to_numpy()[order] / 1e6
        keys = events["key"].to_list()
        values = events["value"].to_list()
        self._keys: list[bytes] = [keys[i] for i in order]
        self._values: list[bytes] = [values[i] for i in order]
        self.total = len(self._keys)
        self.published = 0
        self.bytes = 0
        self._sent = 0  # handed to the producer (published or in flight)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: ProducerLike | None = None
        self.error: BaseException | None = None
        self._where = ""

    @property
    def pending(self) -> int:
        return self.total - self.published

    @property
    def done(self) -> bool:
        return self.published == self.total

    @property
    def last_due_s(self) -> float | None:
        """Epoch seconds at which the last event comes due (None with no events)."""
        return float(self._due_s[-1]) if self.total else None

    def start(self) -> LiveEventPlayer:
        if self._thread is not None:
            return self
        self._producer = self._make_producer()
        self._thread = threading.Thread(target=self._run, name="gpuledger-live-events", daemon=True)
        self._thread.start()
        return self

    def _make_producer(self) -> ProducerLike:
        if self._producer_factory is not None:
            return self._producer_factory()
        ensure_topic(self.settings, self.topic)
        options = kafka_client_options(self.settings)
        self._where = f"Kafka at {options['bootstrap_servers']}"
        try:
            producer: ProducerLike = KafkaProducer(
                **options, acks="all", linger_ms=20, retries=10, max_request_size=16 << 20
            )
        except KafkaError as exc:
            raise ServiceError(
                f"{self._where} is unreachable: {type(exc).__name__}: {exc}"
            ) from None
        return producer

    def _run(self) -> None:
        producer = self._producer
        assert producer is not None
        try:
            while True:
                self.publish_due()
                if self.done or self._stop.wait(self.batch_interval_s):
                    break
            if not self.done:
                self.publish_due()  # what came due while stopping
        except BaseException as exc:
            self.error = exc
        finally:
            try:
                producer.flush(timeout=30)
            except Exception as exc:
                self.error = self.error or exc
            with contextlib.suppress(Exception):
                producer.close(timeout=10)

    def publish_due(self) -> int:
        """Send every event due by now and wait for its acknowledgement; the count sent."""
        producer = self._producer
        assert producer is not None
        due = int(np.searchsorted(self._due_s, self.clock(), side="right"))
        sent = 0
        headers = [CONTENT_TYPE_HEADER]
        chunk = 20_000
        while self._sent < due:
            end = min(due, self._sent + chunk)
            futures = [
                producer.send(self.topic, key=self._keys[i], value=self._values[i], headers=headers)
                for i in range(self._sent, end)
            ]
            producer.flush(timeout=60)
            failed = [f for f in futures if f.failed()]
            if failed:
                raise ServiceError(
                    f"{self._where or 'Kafka'}: {len(failed)} of {len(futures)} events were not "
                    f"acknowledged on {self.topic!r}: {failed[0].exception}"
                )
            self.bytes += sum(len(self._values[i]) for i in range(self._sent, end))
            sent += end - self._sent
            self._sent = end
            self.published = end
        return sent

    def stop(self, timeout_s: float = 60.0) -> None:
        """Publish what is due, flush, close; raise a ServiceError if publishing failed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
        error = self.error
        if error is not None:
            self.error = None
            if isinstance(error, ServiceError):
                raise error
            raise ServiceError(
                f"{self._where or 'Kafka'}: publishing failed: {type(error).__name__}: {error}"
            ) from None

    def __enter__(self) -> LiveEventPlayer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the whole live run -----------------------------------------------------------


@dataclass(frozen=True)
class LiveStatus:
    """Passed to `on_tick` about once a `tick_s`."""

    now: float  # clock time, epoch seconds
    sim_s: float  # seconds since the window start
    horizon_s: float
    url: str
    scrapes: int
    published: int
    pending: int


@dataclass(frozen=True)
class LiveReport:
    url: str
    port: int
    started_at: float
    stopped_at: float
    reason: Literal["horizon", "until", "stopped", "interrupted"]
    scrapes: int
    events: int
    published: int
    pending: int
    targets_file: Path | None


def run_live(
    result: SimulationResult,
    settings: Settings,
    *,
    port: int,
    host: str = "127.0.0.1",
    register: bool = True,
    publish: bool = True,
    until: float | datetime | None = None,
    on_tick: Callable[[LiveStatus], None] | None = None,
    clock: Clock = time.time,
    tick_s: float = 1.0,
    stop: threading.Event | None = None,
) -> LiveReport:
    """Serve the exporter, publish events and register with the local Prometheus until
    the simulation's horizon passes (or `until`, or `stop` is set, or Ctrl-C), then
    stop everything cleanly: target file removed, producer flushed and closed, server
    shut down. `until` is a datetime or epoch seconds on `clock`.
    """
    end = result.window_start_ms / 1000.0 + result.horizon_s
    reason: Literal["horizon", "until", "stopped", "interrupted"] = "horizon"
    if until is not None:
        until_s = until.timestamp() if isinstance(until, datetime) else float(until)
        if until_s < end:
            end, reason = until_s, "until"
    targets_dir: Path | None = None
    if register:
        targets_dir = _local_targets_dir(settings)
    exporter = LiveExporter(result, host=host, port=port, clock=clock)
    player = LiveEventPlayer(result, settings, clock=clock) if publish else None
    targets_file: Path | None = None
    started_at = clock()
    with contextlib.ExitStack() as cleanup:
        exporter.start()
        cleanup.callback(exporter.stop)
        bound_port, url = exporter.port, exporter.url
        if player is not None:
            player.start()
            cleanup.callback(player.stop)
        if targets_dir is not None:
            targets_file = register_with_local_prometheus(exporter, targets_dir)
            cleanup.callback(unregister_from_local_prometheus, targets_file)
        try:
            while True:
                now = clock()
                if now >= end:
                    break
                if stop is not None and stop.is_set():
                    reason = "stopped"
                    break
                if player is not None and player.error is not None:
                    player.stop()  # raises the publishing error
                if on_tick is not None:
                    on_tick(_status(exporter, player, now))
                if stop is not None:
                    stop.wait(tick_s)
                else:
                    time.sleep(tick_s)
        except KeyboardInterrupt:
            reason = "interrupted"
        # Leave in reverse: target file, then the producer (flush), then the server.
    stopped_at = clock()
    return LiveReport(
        url=url,
        port=bound_port,
        started_at=started_at,
        stopped_at=stopped_at,
        reason=reason,
        scrapes=exporter.scrapes,
        events=player.total if player is not None else 0,
        published=player.published if player is not None else 0,
        pending=player.pending if player is not None else 0,
        targets_file=targets_file,
    )


def _status(exporter: LiveExporter, player: LiveEventPlayer | None, now: float) -> LiveStatus:
    return LiveStatus(
        now=now,
        sim_s=now - exporter.window_start_s,
        horizon_s=exporter.horizon_s,
        url=exporter.url,
        scrapes=exporter.scrapes,
        published=player.published if player is not None else 0,
        pending=player.pending if player is not None else 0,
    )


def _local_targets_dir(settings: Settings) -> Path:
    """The local stack's file_sd directory, or a ServiceError saying why it is no use."""
    stack = LocalStack(settings)
    if not is_local_stack_prometheus(settings):
        raise ServiceError(
            f"Prometheus at {settings.prometheus.url} is not the local stack's: add the live "
            "exporter's /node/<hostname>/metrics paths to its scrape config, or do not register"
        )
    if stack.prometheus_url() is None:
        raise ServiceError(
            "the local Prometheus is not running: run `gpuledger stack up`, or do not register"
        )
    return stack.prometheus_targets_dir
