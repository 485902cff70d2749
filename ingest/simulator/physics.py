"""The simulator's own physical model of a replica under continuous batching.

This is the "truth" the allocation is measured against (ALLOCATION.md §8), so it
deliberately differs from the allocation's assumptions:

- Time runs on a fine grid (`tick_s`, default 1 s) — far finer than the 15-30 s
  telemetry the allocation sees.
- Prefill runs on the replica one request at a time (a FIFO prefill queue), at close to
  the power limit; its time and cost per uncached prompt token grow with the position
  of the token (attention over the prefix, cached tokens included). The allocation
  spreads prefill over the whole time to first token, queueing included.
- Decode runs all started requests as one batch. The iteration time grows linearly with
  the batch and the replica's power grows sublinearly with it (both from the ML.ENERGY
  curves, `calibration.DecodeCurve`). A request's tokens come faster when the batch is
  small, not uniformly over its decode time; and a token costs more the longer the
  request's context (KV-cache reads): weight `1 + context / decode_context_tokens`.
- A tick's dynamic energy is split between the prefill in flight and the decode batch
  by time, then within each by those weights. Idle power is the GPU's own (it differs
  per GPU and drifts slowly); a tensor-parallel group's GPUs do not draw equal power.

Every joule of dynamic energy in a tick is assigned to a request running in that tick,
so per GPU: metered energy = idle energy + the sum of its requests' true energy.

The fixed point between decode time and batch size is solved by a few passes: decode
time from the batch each request saw, then the batch from those decode times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.simulator.calibration import DecodeCurve

FloatArray = np.ndarray


@dataclass(frozen=True)
class PhysicsConfig:
    tick_s: float = 1.0
    #: Decode cost per token = 1 + context / this. Deliberately mild: physically, KV-cache
    #: reads overtake a token's share of the weight reads at a few thousand tokens of
    #: context at large batch. The allocation method (ALLOCATION.md §3) has no context
    #: term, so this sets how far a long-context tenant's true energy drifts from what
    #: any per-token method can give it; at 32,768 the demo's long-context tenants
    #: differ by about 4 % (see the fidelity notes in README).
    decode_context_tokens: float = 131_072.0
    #: Scheduler and tokenisation time before each prefill (s).
    scheduling_overhead_s: float = 0.002
    #: Standard deviation of each GPU's share of its tensor-parallel group's power.
    tp_imbalance: float = 0.03
    #: Amplitude (W) and period (s) of the slow, thermal drift of idle power.
    idle_drift_w: float = 3.0
    idle_drift_period_s: float = 5_400.0
    fixed_point_passes: int = 3


@dataclass(frozen=True)
class TimedRequests:
    prefill_start_s: FloatArray
    prefill_end_s: FloatArray
    first_token_s: FloatArray  # NaN where no token was produced
    end_s: FloatArray
    decode_tokens: FloatArray  # tokens after the first


@dataclass(frozen=True)
class ReplicaEnergy:
    energy_j: FloatArray  # per request: true dynamic energy over all GPUs of the replica
    prefill_energy_j: FloatArray
    decode_energy_j: FloatArray
    gpu_seconds: FloatArray  # per request: occupied GPU-seconds (all GPUs of the group)
    dynamic_w: FloatArray  # per tick: replica dynamic power
    busy: FloatArray  # per tick: fraction of the tick with any work
    concurrency: FloatArray  # per tick: time-averaged decode batch


def prefill_seconds(
    prompt: FloatArray,
    cached: FloatArray,
    ms_per_token: float,
    attention_tokens: float,
    overhead_s: float,
) -> FloatArray:
    """Time to prefill the uncached part of each prompt."""
    uncached = prompt - cached
    return overhead_s + ms_per_token * 1e-3 * uncached * (
        1.0 + (cached + prompt) / attention_tokens
    )


def time_replica(
    curve: DecodeCurve,
    arrival_s: FloatArray,
    prompt: FloatArray,
    cached: FloatArray,
    completion: FloatArray,
    ms_per_token: float,
    attention_tokens: float,
    config: PhysicsConfig,
) -> TimedRequests:
    """Prefill queue and decode times of one replica's requests (sorted by arrival)."""
    service = prefill_seconds(
        prompt, cached, ms_per_token, attention_tokens, config.scheduling_overhead_s
    )
    # FIFO single server (Lindley): done_i = S_i + max_{j<=i}(a_j - S_{j-1}).
    total = np.cumsum(service)
    done = total + np.maximum.accumulate(arrival_s - (total - service))
    start = done - service
    decode_tokens = np.maximum(completion - 1.0, 0.0)
    first = np.where(completion > 0, done, np.nan)
    has_decode = decode_tokens > 0
    batch = np.ones_like(arrival_s)
    end = done.copy()
    n_cells = int(np.ceil(done.max(initial=0.0) / config.tick_s)) + 2
    for _ in range(config.fixed_point_passes):
        end = np.where(has_decode, done + decode_tokens * curve.iteration_s(batch), done)
        n_cells = max(n_cells, int(np.ceil(end.max(initial=0.0) / config.tick_s)) + 2)
        u0, u1 = done / config.tick_s, end / config.tick_s
        concurrency = cell_coverage(u0[has_decode], u1[has_decode], n_cells)
        batch = np.where(has_decode, window_mean(concurrency, u0, u1), 1.0)
    return TimedRequests(start, done, first, end, decode_tokens)


def replica_energy(
    curve: DecodeCurve,
    timed: TimedRequests,
    prompt: FloatArray,
    cached: FloatArray,
    attention_tokens: float,
    prefill_dynamic_w: float,
    tp: int,
    n_cells: int,
    config: PhysicsConfig,
) -> ReplicaEnergy:
    """Split the replica's dynamic energy, tick by tick, over the requests it served."""
    dt = config.tick_s
    n = prompt.size
    # Prefill pairs (request, tick).
    p_req, p_cell, p_ov = expand_pairs(timed.prefill_start_s / dt, timed.prefill_end_s / dt)
    p_len = (timed.prefill_end_s - timed.prefill_start_s)[p_req] / dt
    uncached = (prompt - cached)[p_req]
    p_tokens = uncached * p_ov / np.maximum(p_len, 1e-12)
    p_weight = p_tokens * (1.0 + (cached + prompt)[p_req] / attention_tokens)
    prefill_frac = np.minimum(np.bincount(p_cell, weights=p_ov, minlength=n_cells), 1.0)

    # Decode pairs.
    has_decode = timed.decode_tokens > 0
    u0 = np.where(has_decode, timed.prefill_end_s / dt, 0.0)
    u1 = np.where(has_decode, timed.end_s / dt, 0.0)
    d_req, d_cell, d_ov = expand_pairs(u0, u1)
    concurrency = np.bincount(d_cell, weights=d_ov, minlength=n_cells)
    rate = d_ov / curve.iteration_s(concurrency[d_cell])
    rate_total = np.bincount(d_req, weights=rate, minlength=n)
    d_tokens = timed.decode_tokens[d_req] * rate / np.maximum(rate_total[d_req], 1e-300)
    emitted_before = _exclusive_group_cumsum(d_tokens, d_req)
    context = prompt[d_req] + 1.0 + emitted_before + d_tokens / 2.0
    d_weight = d_tokens * (1.0 + context / config.decode_context_tokens)

    decode_w = curve.dynamic_power_w(concurrency)
    prefill_pool_j = prefill_frac * prefill_dynamic_w * dt
    decode_pool_j = (1.0 - prefill_frac) * decode_w * dt
    prefill_weight_total = np.bincount(p_cell, weights=p_weight, minlength=n_cells)
    decode_weight_total = np.bincount(d_cell, weights=d_weight, minlength=n_cells)
    # A pool with nobody to pay for it cannot exist physically; zero it so energy closes.
    prefill_pool_j = np.where(prefill_weight_total > 0, prefill_pool_j, 0.0)
    decode_pool_j = np.where(decode_weight_total > 0, decode_pool_j, 0.0)

    p_share = p_weight / np.where(prefill_weight_total > 0, prefill_weight_total, 1.0)[p_cell]
    d_share = d_weight / np.where(decode_weight_total > 0, decode_weight_total, 1.0)[d_cell]
    prefill_j = np.bincount(p_req, weights=p_share * prefill_pool_j[p_cell], minlength=n)
    decode_j = np.bincount(d_req, weights=d_share * decode_pool_j[d_cell], minlength=n)

    prefill_time = prefill_frac * dt
    decode_time = (1.0 - prefill_frac) * np.minimum(concurrency, 1.0) * dt
    gpu_s = tp * (
        np.bincount(p_req, weights=p_share * prefill_time[p_cell], minlength=n)
        + np.bincount(d_req, weights=d_share * decode_time[d_cell], minlength=n)
    )
    busy = np.minimum(
        np.where(prefill_weight_total > 0, prefill_frac, 0.0)
        + np.where(decode_weight_total > 0, decode_time / dt, 0.0),
        1.0,
    )
    dynamic_w = (prefill_pool_j + decode_pool_j) / dt
    return ReplicaEnergy(
        energy_j=prefill_j + decode_j,
        prefill_energy_j=prefill_j,
        decode_energy_j=decode_j,
        gpu_seconds=gpu_s,
        dynamic_w=dynamic_w,
        busy=busy,
        concurrency=concurrency,
    )


def expand_pairs(u0: FloatArray, u1: FloatArray) -> tuple[np.ndarray, np.ndarray, FloatArray]:
    """(interval, cell, overlap) for every grid cell each interval [u0, u1) touches.

    Times are in cell units. Zero-length intervals touch nothing. Pairs come out grouped
    by interval, cells ascending.
    """
    length = u1 - u0
    k0 = np.floor(u0).astype(np.int64)
    k1 = np.ceil(u1).astype(np.int64) - 1
    count = np.where(length > 0, k1 - k0 + 1, 0)
    req = np.repeat(np.arange(u0.size), count)
    first = np.cumsum(count) - count
    cell = k0[req] + (np.arange(req.size) - first[req])
    overlap = np.minimum(cell + 1.0, u1[req]) - np.maximum(cell.astype(np.float64), u0[req])
    return req, cell, np.maximum(overlap, 0.0)


def cell_coverage(u0: FloatArray, u1: FloatArray, n_cells: int) -> FloatArray:
    """Sum over intervals of each cell's covered length (time-averaged concurrency)."""
    _, cell, overlap = expand_pairs(u0, u1)
    return np.bincount(cell, weights=overlap, minlength=n_cells)[:n_cells]


def window_mean(values: FloatArray, u0: FloatArray, u1: FloatArray) -> FloatArray:
    """Mean of a per-cell step function over each [u0, u1); the cell's value if empty."""
    cumulative = np.concatenate(([0.0], np.cumsum(values)))
    last = values.size - 1

    def integral(u: FloatArray) -> FloatArray:
        k = np.clip(np.floor(u).astype(np.int64), 0, last)
        return cumulative[k] + (u - k) * values[k]

    length = u1 - u0
    k0 = np.clip(np.floor(u0).astype(np.int64), 0, last)
    return np.where(
        length > 1e-12,
        (integral(u1) - integral(u0)) / np.where(length > 1e-12, length, 1.0),
        values[k0],
    )


def _exclusive_group_cumsum(values: FloatArray, group: np.ndarray) -> FloatArray:
    """Running total before each element within its (contiguous) group."""
    if values.size == 0:
        return values
    running = np.cumsum(values) - values
    starts = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
    base = np.repeat(running[starts], np.diff(np.concatenate((starts, [values.size]))))
    return running - base
