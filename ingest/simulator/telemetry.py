"""DCGM-exporter telemetry of the simulated fleet, as Prometheus would have scraped it.

Names, labels and units are dcgm-exporter 4.x's (DESIGN.md): eight default counters;
labels `gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`, `Hostname` (or `hostname`,
as on dcgm-exporter main), `DCGM_FI_DRIVER_VERSION`, plus the `job` and `instance`
labels a Prometheus scrape adds.

Timing follows the exporter: it collects every `collect_interval_s` (default 30 s) and
Prometheus scrapes every `scrape_interval_s` (default 15 s), so a scrape repeats the
last collection until the next one — consecutive scrapes can carry the same sample.

Injected faults, each at a configurable rate and each listed in the anomalies table:
- counter resets: `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` starts again from zero (a
  driver reload); the GPU keeps serving, so the true energy is unaffected;
- missed scrapes (one scrape of one node lost) and outages (a node's exporter down
  for minutes): no sample at all for those timestamps;
- placeholder values: a sample reports DCGM's blank value for an unsupported field
  (int64 9223372036854775792, float 140737488355328.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl

from ingest.simulator.fleet import Fleet, Gpu

#: DCGM's blank values, reported for fields a GPU does not support.
DCGM_INT64_BLANK = 9223372036854775792
DCGM_FP64_BLANK = 140737488355328.0
#: vLLM reserves this share of GPU memory for weights and KV cache at start-up.
VLLM_GPU_MEMORY_UTILIZATION = 0.9
#: Memory the driver reserves and reports as neither used nor free (MiB).
FB_RESERVED_MIB = 531
EXPORTER_PORT = 9400


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Literal["gauge", "counter"]
    help: str
    integer: bool


#: dcgm-exporter's default counters (etc/default-counters.csv) with its help texts.
METRICS: tuple[MetricDef, ...] = (
    MetricDef("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", True),
    MetricDef("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", True),
    MetricDef("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", False),
    MetricDef(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        True,
    ),
    MetricDef("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", True),
    MetricDef("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", True),
    MetricDef("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", True),
    MetricDef(
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "gauge",
        "Ratio of time the graphics engine is active.",
        False,
    ),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
ENERGY_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"

HostnameLabel = Literal["Hostname", "hostname", "mixed"]


@dataclass(frozen=True)
class TelemetryConfig:
    scrape_interval_s: float = 15.0
    collect_interval_s: float = 30.0
    hostname_label: HostnameLabel = "Hostname"
    job: str = "dcgm-exporter"
    counter_resets_per_gpu_day: float = 0.05
    missed_scrape_rate: float = 0.002
    outages_per_node_day: float = 0.25
    outage_s: tuple[float, float] = (120.0, 900.0)
    placeholder_rate: float = 0.0005


@dataclass
class GpuTimeline:
    """One GPU's state on the physics grid (tick cells from the window start)."""

    gpu: Gpu
    tick_s: float
    power_w: np.ndarray  # per cell
    idle_w: np.ndarray  # per cell
    busy: np.ndarray  # per cell, 0..1
    concurrency: np.ndarray  # per cell, decode batch of its replica
    loaded: bool  # a model is resident (vLLM has reserved memory)
    counter_offset_mj: float  # counter value at the window start (since driver load)
    reset_s: np.ndarray = field(default_factory=lambda: np.empty(0))  # sorted reset times
    cumulative_j: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.cumulative_j = np.concatenate(([0.0], np.cumsum(self.power_w * self.tick_s)))

    @property
    def n_cells(self) -> int:
        return int(self.power_w.size)

    def energy_at(self, t_s: np.ndarray) -> np.ndarray:
        """True energy (J) drawn since the window start, at times `t_s`."""
        u = np.clip(np.asarray(t_s, dtype=np.float64) / self.tick_s, 0.0, self.n_cells)
        k = np.minimum(np.floor(u).astype(np.int64), self.n_cells - 1)
        return self.cumulative_j[k] + (u - k) * self.power_w[k] * self.tick_s

    def counter_mj_at(self, t_s: np.ndarray) -> np.ndarray:
        """The energy counter as DCGM reports it: integer mJ, zeroed at each reset."""
        t = np.asarray(t_s, dtype=np.float64)
        energy_mj = self.energy_at(t) * 1000.0
        if self.reset_s.size == 0:
            return np.floor(self.counter_offset_mj + energy_mj)
        last = np.searchsorted(self.reset_s, t, side="right") - 1
        at_reset = self.energy_at(self.reset_s) * 1000.0
        base = np.where(last >= 0, at_reset[np.maximum(last, 0)], -self.counter_offset_mj)
        return np.floor(energy_mj - base)


def sample_gpu(
    timeline: GpuTimeline, t_s: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Values of the eight metrics at collection times `t_s` (s from the window start)."""
    gpu_type = timeline.gpu.gpu_type
    cell = np.clip(np.floor(t_s / timeline.tick_s - 0.5).astype(np.int64), 0, timeline.n_cells - 1)
    power = timeline.power_w[cell] * (1.0 + rng.normal(0.0, 0.004, t_s.size))
    busy = timeline.busy[cell]
    batch = timeline.concurrency[cell]
    window = 120.0
    recent_w = (timeline.energy_at(t_s) - timeline.energy_at(t_s - window)) / np.minimum(
        window, np.maximum(t_s, timeline.tick_s)
    )
    temp = 29.0 + 47.0 * recent_w / gpu_type.power_limit_w + rng.normal(0.0, 0.3, t_s.size)
    clock_span = gpu_type.sm_clock_max_mhz - gpu_type.sm_clock_idle_mhz
    clock = gpu_type.sm_clock_idle_mhz + clock_span * np.minimum(1.0, 3.0 * busy)
    if timeline.loaded:
        reserved = VLLM_GPU_MEMORY_UTILIZATION * gpu_type.fb_total_mib
        used = reserved + 40.0 * np.minimum(batch, 64.0) / 64.0 + rng.normal(0, 2.0, t_s.size)
    else:
        used = np.zeros(t_s.size)
    used = np.rint(used)
    return {
        "DCGM_FI_DEV_SM_CLOCK": np.rint(clock / 15.0) * 15.0,
        "DCGM_FI_DEV_GPU_TEMP": np.rint(temp),
        "DCGM_FI_DEV_POWER_USAGE": np.round(power, 3),
        ENERGY_METRIC: timeline.counter_mj_at(t_s),
        "DCGM_FI_DEV_GPU_UTIL": np.rint(100.0 * busy),
        "DCGM_FI_DEV_FB_FREE": gpu_type.fb_total_mib - FB_RESERVED_MIB - used,
        "DCGM_FI_DEV_FB_USED": used,
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE": np.round(busy * (0.55 + 0.4 * batch / (batch + 16.0)), 6),
    }


def gpu_labels(gpu: Gpu, config: TelemetryConfig) -> dict[str, str]:
    """dcgm-exporter's labels for a GPU, in its order, then the scrape's job/instance."""
    host_key = config.hostname_label
    if host_key == "mixed":
        host_key = "Hostname" if gpu.node_index % 2 == 0 else "hostname"
    return {
        "gpu": str(gpu.local_index),
        "UUID": gpu.uuid,
        "pci_bus_id": gpu.pci_bus_id,
        "device": f"nvidia{gpu.local_index}",
        "modelName": gpu.gpu_type.model_name,
        host_key: gpu.hostname,
        "DCGM_FI_DRIVER_VERSION": gpu.driver_version,
        "instance": f"{gpu.hostname}:{EXPORTER_PORT}",
        "job": config.job,
    }


@dataclass(frozen=True)
class Telemetry:
    """Scraped samples: `series` (one row per series, labels as columns) and `samples`."""

    series: pl.DataFrame  # series_id, metric, gpu_index, label columns…
    samples: pl.DataFrame  # series_id, ts_ms, value — sorted by series_id then ts_ms
    anomalies: pl.DataFrame  # kind, hostname, gpu_uuid, metric, start_ms, end_ms
    #: Per node: phase (s from the window start) of the exporter's collections and of
    #: Prometheus' scrapes — what a reader needs to know when each sample was taken.
    phases: pl.DataFrame = field(default_factory=pl.DataFrame)

    @property
    def label_names(self) -> list[str]:
        return [c for c in self.series.columns if c not in ("series_id", "metric", "gpu_index")]


def node_schedule(
    fleet: Fleet, config: TelemetryConfig, rng: np.random.Generator
) -> dict[int, tuple[float, float]]:
    """Per node: phase of its exporter's collection and of Prometheus' scrape (s)."""
    return {
        i: (
            float(rng.uniform(0, config.collect_interval_s)),
            float(rng.uniform(0, config.scrape_interval_s)),
        )
        for i in range(len(fleet.spec.nodes))
    }


def scrape_telemetry(
    fleet: Fleet,
    timelines: list[GpuTimeline],
    window_start_ms: int,
    horizon_s: float,
    config: TelemetryConfig,
    rng: np.random.Generator,
) -> Telemetry:
    """What Prometheus holds after scraping every node over [0, horizon_s)."""
    schedule = node_schedule(fleet, config, rng)
    anomalies: list[dict[str, object]] = []
    # Which scrapes of each node were lost (single misses and outages).
    node_scrapes: dict[int, np.ndarray] = {}
    for node_index, node in enumerate(fleet.spec.nodes):
        collect_phase, scrape_phase = schedule[node_index]
        scrape_t = np.arange(scrape_phase, horizon_s, config.scrape_interval_s)
        scrape_t = scrape_t[scrape_t >= collect_phase]  # nothing collected before
        keep = rng.random(scrape_t.size) >= config.missed_scrape_rate
        for t in scrape_t[~keep]:
            anomalies.append(
                _anomaly("missed_scrape", node.hostname, None, None, window_start_ms, t, t)
            )
        n_outages = rng.poisson(config.outages_per_node_day * horizon_s / 86400.0)
        for _ in range(n_outages):
            begin = rng.uniform(0, horizon_s)
            end = begin + rng.uniform(*config.outage_s)
            keep &= ~((scrape_t >= begin) & (scrape_t < end))
            anomalies.append(
                _anomaly("outage", node.hostname, None, None, window_start_ms, begin, end)
            )
        node_scrapes[node_index] = scrape_t[keep]

    series_rows: list[dict[str, object]] = []
    sample_ids: list[np.ndarray] = []
    sample_ts: list[np.ndarray] = []
    sample_values: list[np.ndarray] = []
    per_metric: dict[str, list[tuple[dict[str, object], np.ndarray, np.ndarray]]] = {
        m: [] for m in METRIC_NAMES
    }
    for timeline in timelines:
        gpu = timeline.gpu
        for reset in timeline.reset_s:
            anomalies.append(
                _anomaly(
                    "counter_reset",
                    gpu.hostname,
                    gpu.uuid,
                    ENERGY_METRIC,
                    window_start_ms,
                    reset,
                    reset,
                )
            )
        collect_phase, _ = schedule[gpu.node_index]
        scrape_t = node_scrapes[gpu.node_index]
        # Each scrape reports the exporter's latest collection.
        collection = np.floor((scrape_t - collect_phase) / config.collect_interval_s).astype(
            np.int64
        )
        # Sample each collection once; its scrapes repeat it exactly, noise included.
        unique, repeat = np.unique(collection, return_inverse=True)
        collected = sample_gpu(timeline, collect_phase + unique * config.collect_interval_s, rng)
        values = {name: series[repeat] for name, series in collected.items()}
        labels = gpu_labels(gpu, config)
        ts_ms = window_start_ms + np.rint(scrape_t * 1000.0).astype(np.int64)
        for metric in METRICS:
            v = values[metric.name].astype(np.float64)
            # A blank is a property of a collection: every scrape of it repeats it.
            blank = (rng.random(unique.size) < config.placeholder_rate)[repeat]
            if blank.any():
                v = np.where(
                    blank, float(DCGM_INT64_BLANK) if metric.integer else DCGM_FP64_BLANK, v
                )
                for t in scrape_t[blank]:
                    anomalies.append(
                        _anomaly(
                            "placeholder",
                            gpu.hostname,
                            gpu.uuid,
                            metric.name,
                            window_start_ms,
                            t,
                            t,
                        )
                    )
            per_metric[metric.name].append(({"gpu_index": gpu.index, **labels}, ts_ms, v))
    # Series ids run family by family so that sorting by id groups each family.
    for metric_name in METRIC_NAMES:
        for labels, ts_ms, v in per_metric[metric_name]:
            series_id = len(series_rows)
            series_rows.append({"series_id": series_id, "metric": metric_name, **labels})
            sample_ids.append(np.full(ts_ms.size, series_id, dtype=np.uint32))
            sample_ts.append(ts_ms)
            sample_values.append(v)
    series = pl.DataFrame(series_rows).with_columns(pl.col("series_id").cast(pl.UInt32))
    label_cols = [c for c in series.columns if c not in ("series_id", "metric", "gpu_index")]
    series = series.with_columns([pl.col(c).cast(pl.String) for c in label_cols])
    samples = pl.DataFrame(
        {
            "series_id": np.concatenate(sample_ids) if sample_ids else np.empty(0, np.uint32),
            "ts_ms": np.concatenate(sample_ts) if sample_ts else np.empty(0, np.int64),
            "value": np.concatenate(sample_values) if sample_values else np.empty(0),
        }
    )
    anomaly_frame = pl.DataFrame(
        anomalies,
        schema={
            "kind": pl.String,
            "hostname": pl.String,
            "gpu_uuid": pl.String,
            "metric": pl.String,
            "start_ms": pl.Int64,
            "end_ms": pl.Int64,
        },
    ).sort("start_ms", "kind", "hostname", "gpu_uuid", "metric", nulls_last=True)
    phases = pl.DataFrame(
        {
            "hostname": [node.hostname for node in fleet.spec.nodes],
            "collect_phase_s": [schedule[i][0] for i in range(len(fleet.spec.nodes))],
            "scrape_phase_s": [schedule[i][1] for i in range(len(fleet.spec.nodes))],
        }
    )
    return Telemetry(series=series, samples=samples, anomalies=anomaly_frame, phases=phases)


def _anomaly(
    kind: str,
    hostname: str,
    gpu_uuid: str | None,
    metric: str | None,
    window_start_ms: int,
    begin_s: float,
    end_s: float,
) -> dict[str, object]:
    return {
        "kind": kind,
        "hostname": hostname,
        "gpu_uuid": gpu_uuid,
        "metric": metric,
        "start_ms": window_start_ms + round(float(begin_s) * 1000.0),
        "end_ms": window_start_ms + round(float(end_s) * 1000.0),
    }
