"""One simulation: fleet + workload -> timing -> energy -> telemetry, all consistent.

Seeded: each stage draws from its own random stream derived from the seed and the
stage's name, so the same seed (and window, fleet and options) gives the same events
and telemetry, and changing one stage's options does not reshuffle the others.

The window bounds arrivals. Requests still running at its end finish normally, and
telemetry continues until the last of them has ended (plus one collection interval),
so every request's energy is metered.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import polars as pl

from ingest.simulator.calibration import MODELS, PREFILL_POWER_FRACTION, DecodeCurve
from ingest.simulator.fleet import Fleet, FleetSpec
from ingest.simulator.physics import PhysicsConfig, replica_energy, time_replica
from ingest.simulator.telemetry import GpuTimeline, Telemetry, TelemetryConfig, scrape_telemetry
from ingest.simulator.trace import TraceRequests
from ingest.simulator.workload import (
    STATUS_NAMES,
    WorkloadConfig,
    complete_requests,
    synthetic_arrivals,
    trace_arrivals,
)
from models.errors import InputError

#: Default load: mean requests per second per GPU of the fleet. With the built-in
#: fleet of 32 GPUs this is about 1.1 M requests a day.
DEFAULT_RATE_PER_GPU_S = 0.5
#: Counter value at the window start: energy since the driver loaded, 1-30 days of it.
_COUNTER_AGE_DAYS = (1.0, 30.0)

StepCallback = Callable[[str], None]


@dataclass(frozen=True)
class SimulationConfig:
    start: datetime
    duration_s: float
    seed: int = 0
    rate_per_s: float | None = None
    workload: WorkloadConfig | None = None
    physics: PhysicsConfig = field(default_factory=PhysicsConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    trace: TraceRequests | None = None

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise InputError("simulation: start must carry a time zone (UTC)")
        if not 0 < self.duration_s <= 31 * 86400:
            raise InputError("simulation: duration must be more than 0 and at most 31 days")
        if self.telemetry.collect_interval_s < 1 or self.telemetry.scrape_interval_s < 1:
            raise InputError("simulation: scrape and collect intervals must be at least 1 s")


@dataclass
class SimulationResult:
    config: SimulationConfig
    fleet: Fleet
    window_start_ms: int
    horizon_s: float
    requests: pl.DataFrame
    gpu_truth: pl.DataFrame
    telemetry: Telemetry
    timelines: list[GpuTimeline]

    @property
    def window_end_ms(self) -> int:
        return self.window_start_ms + round(self.config.duration_s * 1000)

    @property
    def horizon_end_ms(self) -> int:
        return self.window_start_ms + round(self.horizon_s * 1000)


def stream(seed: int, stage: str) -> np.random.Generator:
    """The random stream of one stage of one seeded simulation."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(stage.encode())]))


def simulate(
    spec: FleetSpec, config: SimulationConfig, on_step: StepCallback | None = None
) -> SimulationResult:
    step = on_step or (lambda _name: None)
    fleet = Fleet(spec, config.seed)
    start = config.start.astimezone(UTC)
    window_start_ms = round(start.timestamp() * 1000)
    rate = config.rate_per_s
    if rate is None:
        rate = DEFAULT_RATE_PER_GPU_S * len(fleet.gpus)
    workload = config.workload or WorkloadConfig(rate_per_s=rate)
    if workload.rate_per_s != rate:
        workload = WorkloadConfig(
            rate_per_s=rate,
            error_rate=workload.error_rate,
            cancel_rate=workload.cancel_rate,
            daily_amplitude=workload.daily_amplitude,
            weekend_factor=workload.weekend_factor,
        )

    step("arrivals")
    if config.trace is not None:
        arrivals = trace_arrivals(
            config.trace, spec, config.duration_s, stream(config.seed, "trace")
        )
    else:
        arrivals = synthetic_arrivals(
            spec, start, config.duration_s, workload, stream(config.seed, "arrivals")
        )
    requests = complete_requests(arrivals, fleet, workload, stream(config.seed, "requests"))

    step("timing")
    physics = config.physics
    dt = physics.tick_s
    idle_rng = stream(config.seed, "idle")
    idle_base = np.array(
        [
            idle_rng.uniform(*g.gpu_type.idle_loaded_w)
            if g.replica is not None
            else g.gpu_type.idle_no_process_w * idle_rng.uniform(0.95, 1.05)
            for g in fleet.gpus
        ]
    )
    idle_phase = idle_rng.uniform(0, 2 * np.pi, len(fleet.gpus))
    replica_rows = requests["replica"].to_numpy()
    prompt_all = requests["prompt_tokens"].to_numpy().astype(np.float64)
    cached_all = requests["cached_tokens"].to_numpy().astype(np.float64)
    completion_all = requests["completion_tokens"].to_numpy().astype(np.float64)
    arrival_all = requests["arrival_s"].to_numpy()
    order = np.argsort(replica_rows, kind="stable")  # arrival order kept within a replica
    bounds = np.searchsorted(replica_rows[order], np.arange(len(fleet.replicas) + 1))
    curves: list[DecodeCurve] = []
    timed = []
    for replica in fleet.replicas:
        rows = order[bounds[replica.index] : bounds[replica.index + 1]]
        model = MODELS[replica.model]
        idle_total = float(idle_base[list(replica.gpu_indices)].sum())
        curve = DecodeCurve.build(model, replica.gpu_type, replica.tp, idle_total)
        curves.append(curve)
        timed.append(
            (
                rows,
                time_replica(
                    curve,
                    arrival_all[rows],
                    prompt_all[rows],
                    cached_all[rows],
                    completion_all[rows],
                    model.prefill_ms_per_token(replica.tp, replica.gpu_type),
                    model.attention_tokens,
                    physics,
                ),
            )
        )
    last_end = max((float(t.end_s.max(initial=0.0)) for _, t in timed), default=0.0)
    horizon_s = max(config.duration_s, last_end) + config.telemetry.collect_interval_s
    horizon_s = float(np.ceil(horizon_s / dt) * dt)
    n_cells = round(horizon_s / dt)

    step("energy")
    n = requests.height
    columns = {
        name: np.full(n, np.nan)
        for name in (
            "prefill_start_s",
            "first_token_s",
            "end_s",
            "true_energy_j",
            "true_prefill_energy_j",
            "true_decode_energy_j",
            "true_gpu_seconds",
        )
    }
    cell_t = np.arange(n_cells) * dt
    share_rng = stream(config.seed, "tp-share")
    gpu_dynamic = [np.zeros(n_cells) for _ in fleet.gpus]
    gpu_busy = [np.zeros(n_cells) for _ in fleet.gpus]
    gpu_concurrency = [np.zeros(n_cells) for _ in fleet.gpus]
    for replica, curve, (rows, t) in zip(fleet.replicas, curves, timed, strict=True):
        model = MODELS[replica.model]
        idle_total = float(idle_base[list(replica.gpu_indices)].sum())
        prefill_w = (
            PREFILL_POWER_FRACTION * replica.gpu_type.power_limit_w * replica.tp - idle_total
        )
        energy = replica_energy(
            curve,
            t,
            prompt_all[rows],
            cached_all[rows],
            model.attention_tokens,
            prefill_w,
            replica.tp,
            n_cells,
            physics,
        )
        columns["prefill_start_s"][rows] = t.prefill_start_s
        columns["first_token_s"][rows] = t.first_token_s
        columns["end_s"][rows] = t.end_s
        columns["true_energy_j"][rows] = energy.energy_j
        columns["true_prefill_energy_j"][rows] = energy.prefill_energy_j
        columns["true_decode_energy_j"][rows] = energy.decode_energy_j
        columns["true_gpu_seconds"][rows] = energy.gpu_seconds
        weights = np.clip(1.0 + share_rng.normal(0.0, physics.tp_imbalance, replica.tp), 0.5, 1.5)
        shares = weights / weights.sum()
        for share, gpu_index in zip(shares, replica.gpu_indices, strict=True):
            gpu_dynamic[gpu_index] = energy.dynamic_w * share
            gpu_busy[gpu_index] = energy.busy
            gpu_concurrency[gpu_index] = energy.concurrency

    step("telemetry")
    counter_rng = stream(config.seed, "counters")
    timelines: list[GpuTimeline] = []
    truth_rows = []
    hour_index = ((window_start_ms // 1000 + cell_t) // 3600).astype(np.int64)
    first_hour = int(hour_index[0])
    hour_slot = hour_index - first_hour
    for g in fleet.gpus:
        idle_w = idle_base[g.index] + physics.idle_drift_w * np.sin(
            2 * np.pi * cell_t / physics.idle_drift_period_s + idle_phase[g.index]
        )
        power_w = idle_w + gpu_dynamic[g.index]
        age_s = counter_rng.uniform(*_COUNTER_AGE_DAYS) * 86400.0
        n_resets = counter_rng.poisson(
            config.telemetry.counter_resets_per_gpu_day * horizon_s / 86400.0
        )
        resets = np.sort(counter_rng.uniform(0.0, horizon_s, n_resets))
        timelines.append(
            GpuTimeline(
                gpu=g,
                tick_s=dt,
                power_w=power_w,
                idle_w=idle_w,
                busy=gpu_busy[g.index],
                concurrency=gpu_concurrency[g.index],
                loaded=g.replica is not None,
                counter_offset_mj=float(np.floor(age_s * idle_base[g.index] * 1000.0)),
                reset_s=resets,
            )
        )
        slots = int(hour_slot[-1]) + 1
        idle_j = np.bincount(hour_slot, weights=idle_w * dt, minlength=slots)
        dynamic_j = np.bincount(hour_slot, weights=gpu_dynamic[g.index] * dt, minlength=slots)
        busy_s = np.bincount(hour_slot, weights=gpu_busy[g.index] * dt, minlength=slots)
        covered_s = np.bincount(hour_slot, weights=np.full(n_cells, dt), minlength=slots)
        truth_rows.append(
            pl.DataFrame(
                {
                    "gpu_uuid": g.uuid,
                    "hostname": g.hostname,
                    "gpu_index": g.local_index,
                    "gpu_type": g.gpu_type.key,
                    "replica": g.replica,
                    "hour_start": (np.arange(slots) + first_hour) * 3600 * 1_000_000,
                    "covered_s": covered_s,
                    "energy_j": idle_j + dynamic_j,
                    "idle_j": idle_j,
                    "dynamic_j": dynamic_j,
                    "busy_s": busy_s,
                },
                schema_overrides={"replica": pl.Int32},
            )
        )
    gpu_truth = pl.concat(truth_rows).with_columns(
        pl.col("hour_start").cast(pl.Datetime("us", "UTC"))
    )
    telemetry = scrape_telemetry(
        fleet,
        timelines,
        window_start_ms,
        horizon_s,
        config.telemetry,
        stream(config.seed, "scrape"),
    )

    step("ground truth")
    requests = _request_table(requests, fleet, spec, columns, window_start_ms)
    return SimulationResult(
        config=config,
        fleet=fleet,
        window_start_ms=window_start_ms,
        horizon_s=horizon_s,
        requests=requests,
        gpu_truth=gpu_truth,
        telemetry=telemetry,
        timelines=timelines,
    )


def _request_table(
    requests: pl.DataFrame,
    fleet: Fleet,
    spec: FleetSpec,
    columns: dict[str, np.ndarray],
    window_start_ms: int,
) -> pl.DataFrame:
    start_us = window_start_ms * 1000

    def stamp(seconds: np.ndarray) -> pl.Series:
        # Microseconds since the epoch stay exact in float64 (below 2**53); NaN -> null.
        return pl.Series(np.rint(seconds * 1e6) + start_us).fill_nan(None).cast(pl.Int64)

    replicas = pl.DataFrame(
        {
            "replica": [r.index for r in fleet.replicas],
            "hostname": [r.hostname for r in fleet.replicas],
            "gpu_type": [r.gpu_type.key for r in fleet.replicas],
            "tp": [r.tp for r in fleet.replicas],
            "gpu_uuids": [[fleet.gpus[i].uuid for i in r.gpu_indices] for r in fleet.replicas],
        },
        schema_overrides={"replica": pl.Int32, "tp": pl.Int32},
    )
    tenant_ids = pl.Series([t.id for t in spec.tenants])
    table = requests.with_columns(
        tenant=tenant_ids.gather(requests["tenant_idx"]),
        status=pl.Series(np.array(STATUS_NAMES)[requests["status_code"].to_numpy()]),
        arrival_ts=stamp(requests["arrival_s"].to_numpy()),
        prefill_start_ts=stamp(columns["prefill_start_s"]),
        first_token_ts=stamp(columns["first_token_s"]),
        end_ts=stamp(columns["end_s"]),
        true_energy_j=pl.Series(columns["true_energy_j"]),
        true_prefill_energy_j=pl.Series(columns["true_prefill_energy_j"]),
        true_decode_energy_j=pl.Series(columns["true_decode_energy_j"]),
        true_gpu_seconds=pl.Series(columns["true_gpu_seconds"]),
    ).join(replicas, on="replica", how="left", maintain_order="left")
    ts = pl.Datetime("us", "UTC")
    return table.select(
        "request_id",
        "tenant",
        "model",
        "replica",
        "hostname",
        "gpu_type",
        "tp",
        "gpu_uuids",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "status",
        pl.col("arrival_ts").cast(ts),
        pl.col("prefill_start_ts").cast(ts),
        pl.col("first_token_ts").cast(ts),
        pl.col("end_ts").cast(ts),
        "true_energy_j",
        "true_prefill_energy_j",
        "true_decode_energy_j",
        "true_gpu_seconds",
    )
