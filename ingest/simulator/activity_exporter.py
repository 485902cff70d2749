"""A live DCGM simulator whose GPUs draw power as the requests they really serve.

The batch simulator and `live.LiveExporter` replay a precomputed fleet. Behind a real
Triton server there is nothing to precompute: what a GPU does is what the metering
gateway has in flight on it now. `ActivityExporter` polls an activity source (GPU UUID
→ concurrent requests, a tensor-parallel request counting 1/k on each of its k GPUs)
every `tick_s` (live: `MeanConcurrency`, the mean over the tick, so a request shorter
than a tick still counts), turns it into power with the same calibrated curve the simulator uses
(`calibration.DecodeCurve`: loaded-idle power plus dynamic power that grows with the
decode batch, from ML.ENERGY's measured H100 curve), and integrates that power into
the energy counter. Every `collect_interval_s` it takes a collection, as
dcgm-exporter does, and serves the latest one in dcgm-exporter's text format, metric
names, labels and units (`telemetry.METRICS`), so Prometheus and gpuledger's reader
cannot tell it from a real exporter.

Paths: `/metrics` (every GPU), `/node/<hostname>/metrics` (one node), `/healthz`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from ingest.simulator.calibration import GPU_TYPES, MODELS, DecodeCurve, GpuType
from ingest.simulator.telemetry import EXPORTER_PORT, METRICS
from models.errors import InputError, ServiceError

Clock = Callable[[], float]
ActivitySource = Callable[[], Mapping[str, float]]


class MeanConcurrency:
    """An `ActivitySource` that answers each GPU's mean concurrency since its previous
    call, from a source of cumulative request-seconds in flight (the gateway's
    `Activity.busy_seconds_by_gpu`): the exporter integrates power once per tick, and
    a request shorter than a tick, which the concurrency at the tick would miss, still
    raises the power over that tick by its share."""

    def __init__(
        self, busy_seconds: Callable[[], Mapping[str, float]], clock: Clock = time.monotonic
    ) -> None:
        self._busy_seconds = busy_seconds
        self._clock = clock
        self._last_busy = dict(busy_seconds())
        self._last_t = clock()

    def __call__(self) -> dict[str, float]:
        busy, now = dict(self._busy_seconds()), self._clock()
        elapsed = now - self._last_t
        mean = {}
        if elapsed > 0:
            for gpu, seconds in busy.items():
                mean[gpu] = max(0.0, seconds - self._last_busy.get(gpu, 0.0)) / elapsed
        self._last_busy, self._last_t = busy, now
        return mean


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Driver version label of the simulated GPUs (dcgm-exporter's DCGM_FI_DRIVER_VERSION).
DRIVER_VERSION = "560.35.03"
#: Memory a loaded 8B model with its KV cache takes on an 80 GB GPU (vLLM's default
#: gpu_memory_utilization 0.9 reserves about 90% of the frame buffer up front).
FB_USED_FRACTION = 0.9


@dataclass(frozen=True)
class ActivityGpu:
    """One simulated GPU behind a real server."""

    hostname: str
    uuid: str
    local_index: int = 0
    gpu_type: str = "H100"
    #: The served model's measured power curve (calibration.MODELS).
    model_profile: str = "llama-3.1-8b"

    def check(self) -> None:
        if self.gpu_type not in GPU_TYPES:
            raise InputError(
                f"activity exporter: GPU {self.uuid}: gpu_type {self.gpu_type!r} unknown; "
                f"expected one of {sorted(GPU_TYPES)}"
            )
        if self.model_profile not in MODELS:
            raise InputError(
                f"activity exporter: GPU {self.uuid}: model_profile {self.model_profile!r} "
                f"unknown; expected one of {sorted(MODELS)}"
            )


@dataclass
class _GpuState:
    gpu: ActivityGpu
    gpu_type: GpuType
    curve: DecodeCurve
    idle_w: float
    energy_mj: float
    power_w: float
    busy_s: float = 0.0  # since the last collection
    window_s: float = 0.0
    collected: dict[str, float] = field(default_factory=dict)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ActivityExporter:
    """dcgm-exporter-compatible endpoint for GPUs whose load is read live from `activity`."""

    def __init__(
        self,
        gpus: Sequence[ActivityGpu],
        activity: ActivitySource,
        *,
        collect_interval_s: float = 1.0,
        tick_s: float = 0.05,
        clock: Clock = time.time,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not gpus:
            raise InputError("activity exporter: no GPUs given")
        if collect_interval_s <= 0 or tick_s <= 0:
            raise InputError("activity exporter: collect_interval_s and tick_s must be > 0")
        uuids = [g.uuid for g in gpus]
        if len(set(uuids)) != len(uuids):
            raise InputError("activity exporter: a GPU UUID appears twice")
        rng = np.random.default_rng(seed)
        self.activity = activity
        self.collect_interval_s = collect_interval_s
        self.tick_s = tick_s
        self.clock = clock
        self.host = host
        self._requested_port = port
        self._lock = threading.Lock()
        self._states: list[_GpuState] = []
        for gpu in gpus:
            gpu.check()
            gpu_type = GPU_TYPES[gpu.gpu_type]
            low, high = gpu_type.idle_loaded_w
            idle_w = float(rng.uniform(low, high))
            curve = DecodeCurve.build(MODELS[gpu.model_profile], gpu_type, 1, idle_w)
            # The counter counts since driver load: start it somewhere in the past days.
            energy_mj = float(rng.uniform(1e9, 5e10))
            self._states.append(_GpuState(gpu, gpu_type, curve, idle_w, energy_mj, idle_w))
        self.hostnames = tuple(dict.fromkeys(g.hostname for g in gpus))
        self._last_tick: float | None = None
        self._next_collection: float | None = None
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.collections = 0
        self.scrapes = 0

    # -- physics ----------------------------------------------------------------

    def power_w(self, gpu_uuid: str, concurrency: float) -> float:
        state = self._state(gpu_uuid)
        return state.idle_w + float(state.curve.dynamic_power_w(np.array([concurrency]))[0])

    def _state(self, gpu_uuid: str) -> _GpuState:
        for state in self._states:
            if state.gpu.uuid == gpu_uuid:
                return state
        raise KeyError(gpu_uuid)

    def tick(self, now: float | None = None) -> None:
        """Integrate power since the last tick with the activity now; collect when due."""
        now = self.clock() if now is None else now
        activity = self.activity()
        with self._lock:
            last = self._last_tick
            self._last_tick = now
            if self._next_collection is None:
                self._next_collection = now
            dt = 0.0 if last is None else max(0.0, now - last)
            for state in self._states:
                concurrency = max(0.0, float(activity.get(state.gpu.uuid, 0.0)))
                power = state.idle_w + float(
                    state.curve.dynamic_power_w(np.array([concurrency]))[0]
                )
                # Trapezoid between the previous and the new power over the tick.
                state.energy_mj += (state.power_w + power) / 2.0 * dt * 1000.0
                state.power_w = power
                state.window_s += dt
                if concurrency > 0:
                    state.busy_s += dt
            while now >= self._next_collection:
                self._collect()
                self._next_collection += self.collect_interval_s

    def _collect(self) -> None:
        for state in self._states:
            active = state.busy_s / state.window_s if state.window_s > 0 else 0.0
            gpu_type = state.gpu_type
            load = (state.power_w - state.idle_w) / max(gpu_type.power_limit_w - state.idle_w, 1.0)
            clock_mhz = gpu_type.sm_clock_idle_mhz + (
                gpu_type.sm_clock_max_mhz - gpu_type.sm_clock_idle_mhz
            ) * min(1.0, active * 4.0)
            fb_used = int(gpu_type.fb_total_mib * FB_USED_FRACTION)
            state.collected = {
                "DCGM_FI_DEV_SM_CLOCK": round(clock_mhz),
                "DCGM_FI_DEV_GPU_TEMP": round(32 + 45 * min(1.0, max(0.0, load))),
                "DCGM_FI_DEV_POWER_USAGE": round(state.power_w, 3),
                "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": int(state.energy_mj),
                "DCGM_FI_DEV_GPU_UTIL": round(100 * active),
                "DCGM_FI_DEV_FB_FREE": gpu_type.fb_total_mib - fb_used,
                "DCGM_FI_DEV_FB_USED": fb_used,
                "DCGM_FI_PROF_GR_ENGINE_ACTIVE": round(active, 6),
            }
            state.busy_s = 0.0
            state.window_s = 0.0
        self.collections += 1

    def energy_mj(self, gpu_uuid: str) -> float:
        with self._lock:
            return self._state(gpu_uuid).energy_mj

    # -- exposition ---------------------------------------------------------------

    def render(self, hostname: str | None = None) -> str:
        """The latest collection, for one node or all; empty families before the first."""
        with self._lock:
            states = [s for s in self._states if hostname in (None, s.gpu.hostname)]
            rows = [(s.gpu, s.gpu_type, dict(s.collected)) for s in states]
        parts: list[str] = []
        for metric in METRICS:
            parts.append(
                f"# HELP {metric.name} {metric.help}\n# TYPE {metric.name} {metric.kind}\n"
            )
            for gpu, gpu_type, values in rows:
                if metric.name not in values:
                    continue
                labels = {
                    "gpu": str(gpu.local_index),
                    "UUID": gpu.uuid,
                    "pci_bus_id": f"00000000:{0x18 + gpu.local_index:02X}:00.0",
                    "device": f"nvidia{gpu.local_index}",
                    "modelName": gpu_type.model_name,
                    "Hostname": gpu.hostname,
                    "DCGM_FI_DRIVER_VERSION": DRIVER_VERSION,
                }
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                value = values[metric.name]
                shown = str(int(value)) if metric.integer else repr(float(value))
                parts.append(f"{metric.name}{{{text}}} {shown}\n")
        return "".join(parts)

    def _answer(self, path: str) -> tuple[int, str]:
        if path in ("/healthz", "/health"):
            return 200, "ok\n"
        if path.rstrip("/") == "/metrics":
            return 200, self.render()
        prefix, suffix = "/node/", "/metrics"
        if path.startswith(prefix) and path.rstrip("/").endswith(suffix):
            host = unquote(path[len(prefix) : len(path.rstrip("/")) - len(suffix)])
            if host in self.hostnames:
                return 200, self.render(host)
            return 404, f"unknown node {host!r}; nodes: {', '.join(self.hostnames)}\n"
        return 404, f"not found: {path}; served: /metrics, /node/<hostname>/metrics, /healthz\n"

    # -- lifecycle ----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the activity exporter is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ActivityExporter:
        if self._server is not None:
            return self
        try:
            server = ThreadingHTTPServer((self.host, self._requested_port), _handler_for(self))
        except OSError as exc:
            raise ServiceError(
                f"activity exporter: cannot listen on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}"
            ) from None
        server.daemon_threads = True
        self._server = server
        self._stopping.clear()
        self.tick()
        serve = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="gpuledger-activity-exporter",
            daemon=True,
        )
        sampler = threading.Thread(target=self._sample, name="gpuledger-activity-sampler")
        sampler.daemon = True
        self._threads = [serve, sampler]
        for thread in self._threads:
            thread.start()
        return self

    def _sample(self) -> None:
        while not self._stopping.wait(self.tick_s):
            self.tick()

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._server = None
        self._threads = []

    def __enter__(self) -> ActivityExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def register_with_local_prometheus(self, targets_dir: Path, *, name: str | None = None) -> Path:
        """One file_sd target group per node, `instance="<host>:9400"` as a real node's
        exporter; written atomically."""
        groups = [
            {
                "targets": [f"127.0.0.1:{self.port}"],
                "labels": {
                    "__metrics_path__": f"/node/{host}/metrics",
                    "instance": f"{host}:{EXPORTER_PORT}",
                },
            }
            for host in self.hostnames
        ]
        targets_dir.mkdir(parents=True, exist_ok=True)
        stem = name or f"gpuledger-activity-{self.port}"
        path = targets_dir / f"{stem}.json"
        tmp = targets_dir / f".{stem}.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(groups, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def _handler_for(exporter: ActivityExporter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "gpuledger-activity-dcgm/1"
        protocol_version = "HTTP/1.0"
        timeout = 30

        def do_GET(self) -> None:
            try:
                status, body = exporter._answer(urlsplit(self.path).path)
            except Exception as exc:  # an internal error must not kill the server
                status, body = 500, f"internal error: {type(exc).__name__}: {exc}\n"
            if status == 200 and body != "ok\n":
                exporter.scrapes += 1
            data = body.encode("utf-8")
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", CONTENT_TYPE if status == 200 else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape would flood the terminal

    return Handler
