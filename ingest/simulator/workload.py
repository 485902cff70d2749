"""Requests: who sends what, when — synthetic, or replayed from a real trace.

Synthetic arrivals are a non-homogeneous Poisson process per tenant: the fleet-wide
mean rate is split by tenant weight and shaped by a daily cycle (peak at the tenant's
`peak_hour_utc`, trough at half the mean) and a weekly one (weekends at 75 %).
Lengths are log-normal around the tenant's medians; a share of requests (the tenant's
cache hit rate) reuse a cached prefix of 40-95 % of the prompt.

Every request is then routed to a replica of its model, round-robin in arrival order
(a plain load balancer), and given an outcome: most complete; some are cancelled by the
client part-way through decoding; a few fail, half of them before the first token.
The tokens reported are the tokens actually processed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl

from ingest.simulator.fleet import Fleet, FleetSpec
from ingest.simulator.trace import TraceRequests
from models.errors import InputError

#: Longest prompt and completion the simulator draws (tokens).
MAX_PROMPT_TOKENS = 32_768
MAX_COMPLETION_TOKENS = 4_096
#: Prefix caches work in blocks (vLLM's default block is 16 tokens).
CACHE_BLOCK_TOKENS = 16

STATUS_OK, STATUS_CANCELLED, STATUS_ERROR = 0, 1, 2
STATUS_NAMES = ("ok", "cancelled", "error")


@dataclass(frozen=True)
class WorkloadConfig:
    rate_per_s: float
    error_rate: float = 0.003
    cancel_rate: float = 0.01
    daily_amplitude: float = 0.5
    weekend_factor: float = 0.75


def synthetic_arrivals(
    spec: FleetSpec,
    start: datetime,
    duration_s: float,
    config: WorkloadConfig,
    rng: np.random.Generator,
) -> pl.DataFrame:
    """Arrival times (s from `start`) and tenant index of each synthetic request."""
    bin_s = 60.0
    n_bins = int(np.ceil(duration_s / bin_s))
    edges = np.arange(n_bins, dtype=np.float64) * bin_s
    bin_len = np.minimum(bin_s, duration_s - edges)
    weights = np.array([t.weight for t in spec.tenants])
    weights = weights / weights.sum()
    epoch_s = start.timestamp()
    mid = epoch_s + edges + bin_len / 2
    hour = (mid % 86400.0) / 3600.0
    weekday = ((mid // 86400.0).astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    weekly = np.where(weekday >= 5, config.weekend_factor, 1.0)
    times: list[np.ndarray] = []
    tenants: list[np.ndarray] = []
    for k, tenant in enumerate(spec.tenants):
        daily = 1.0 + config.daily_amplitude * np.cos(
            2 * np.pi * (hour - tenant.peak_hour_utc) / 24
        )
        expected = config.rate_per_s * weights[k] * daily * weekly * bin_len
        counts = rng.poisson(expected)
        starts = np.repeat(edges, counts)
        lens = np.repeat(bin_len, counts)
        times.append(starts + rng.random(starts.size) * lens)
        tenants.append(np.full(starts.size, k, dtype=np.int32))
    arrival = np.concatenate(times)
    tenant_idx = np.concatenate(tenants)
    order = np.argsort(arrival, kind="stable")
    return pl.DataFrame({"arrival_s": arrival[order], "tenant_idx": tenant_idx[order]})


def trace_arrivals(
    trace: TraceRequests, spec: FleetSpec, duration_s: float, rng: np.random.Generator
) -> pl.DataFrame:
    """Arrivals, lengths (and tenants, when the trace names them) from a real trace.

    A trace shorter than the window is tiled, each copy starting one mean inter-arrival
    gap after the previous copy's span, unless `trace.repeat` is off. Requests without a
    tenant are assigned by a seeded draw with the fleet's tenant weights.
    """
    offsets = trace.arrival_s - trace.arrival_s.min()
    span = float(offsets.max())
    gap = span / max(len(offsets) - 1, 1)
    period = span + gap
    copies = int(np.ceil(duration_s / period)) if trace.repeat and period > 0 else 1
    index = np.tile(np.arange(len(offsets)), copies)
    arrival = np.concatenate([offsets + c * period for c in range(copies)])
    keep = arrival < duration_s
    index, arrival = index[keep], arrival[keep]
    if trace.tenants is not None:
        ids = {t.id: i for i, t in enumerate(spec.tenants)}
        missing = sorted(set(trace.tenants.tolist()) - set(ids))
        if missing:
            raise InputError(
                f"trace {trace.path}: tenant column names tenants not in the fleet: "
                f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}"
            )
        tenant = np.array([ids[t] for t in trace.tenants], dtype=np.int32)[index]
    else:
        weights = np.array([t.weight for t in spec.tenants])
        tenant = rng.choice(len(weights), size=index.size, p=weights / weights.sum())
    frame = pl.DataFrame(
        {
            "arrival_s": arrival,
            "tenant_idx": tenant.astype(np.int32),
            "prompt_tokens": trace.prompt_tokens[index],
            "completion_tokens": trace.completion_tokens[index],
            "cached_tokens": trace.cached_tokens[index]
            if trace.cached_tokens is not None
            else np.zeros(index.size, dtype=np.int64),
        }
    )
    if trace.models is not None:
        frame = frame.with_columns(pl.Series("model", trace.models[index]))
    return frame.sort("arrival_s", maintain_order=True)


def complete_requests(
    arrivals: pl.DataFrame, fleet: Fleet, config: WorkloadConfig, rng: np.random.Generator
) -> pl.DataFrame:
    """Add model, lengths (where absent), ids, replica and outcome to arrivals."""
    spec = fleet.spec
    n = arrivals.height
    tenant_idx = arrivals["tenant_idx"].to_numpy()
    served = fleet.served_models
    if "model" in arrivals.columns:
        model = arrivals["model"].to_numpy().astype(object)
        unknown = sorted(set(model.tolist()) - set(served))
        if unknown:
            raise InputError(
                f"trace: model column names models the fleet does not serve: {', '.join(unknown)}"
            )
        model_idx = np.searchsorted(np.array(served), model.astype(str))
    else:
        model_idx = np.empty(n, dtype=np.int64)
        for k, tenant in enumerate(spec.tenants):
            rows = np.flatnonzero(tenant_idx == k)
            mix = np.array([tenant.model_mix.get(m, 0.0) for m in served])
            if mix.sum() <= 0:
                mix = np.ones(len(served))
            model_idx[rows] = rng.choice(len(served), size=rows.size, p=mix / mix.sum())

    if "prompt_tokens" in arrivals.columns:
        prompt = arrivals["prompt_tokens"].to_numpy().astype(np.int64)
        completion = arrivals["completion_tokens"].to_numpy().astype(np.int64)
        cached = arrivals["cached_tokens"].to_numpy().astype(np.int64)
    else:
        prompt_median = np.array([t.prompt_median for t in spec.tenants])[tenant_idx]
        completion_median = np.array([t.completion_median for t in spec.tenants])[tenant_idx]
        prompt = np.clip(
            np.rint(prompt_median * rng.lognormal(0.0, 0.9, n)), 8, MAX_PROMPT_TOKENS
        ).astype(np.int64)
        completion = np.clip(
            np.rint(completion_median * rng.lognormal(0.0, 0.8, n)), 1, MAX_COMPLETION_TOKENS
        ).astype(np.int64)
        hit_rate = np.array([t.cache_hit_rate for t in spec.tenants])[tenant_idx]
        hit = rng.random(n) < hit_rate
        share = rng.uniform(0.4, 0.95, n)
        cached = np.where(hit, (prompt * share // CACHE_BLOCK_TOKENS) * CACHE_BLOCK_TOKENS, 0)
    # At least the last prompt token is always computed, cache or not.
    cached = np.clip(cached, 0, np.maximum(prompt - 1, 0)).astype(np.int64)

    # Outcome: cancelled part-way through decoding; errors, half before the first token.
    draw = rng.random(n)
    status = np.full(n, STATUS_OK, dtype=np.int8)
    status[draw < config.cancel_rate + config.error_rate] = STATUS_CANCELLED
    status[draw < config.error_rate] = STATUS_ERROR
    fraction = rng.uniform(0.05, 0.95, n)
    partial = np.floor(completion * fraction).astype(np.int64)
    before_first = rng.random(n) < 0.5
    completion = np.where(status == STATUS_CANCELLED, partial, completion)
    completion = np.where(
        status == STATUS_ERROR, np.where(before_first, 0, partial), completion
    ).astype(np.int64)

    # Round-robin over the model's replicas, in arrival order.
    replica = np.empty(n, dtype=np.int32)
    for m_idx, model_name in enumerate(served):
        rows = np.flatnonzero(model_idx == m_idx)
        pool = np.array([r.index for r in fleet.replicas_of(model_name)], dtype=np.int32)
        replica[rows] = pool[np.arange(rows.size) % pool.size]

    return arrivals.select("arrival_s", "tenant_idx").with_columns(
        pl.Series("request_id", request_ids(rng, n)),
        pl.Series("model", np.array(served)[model_idx]),
        pl.Series("replica", replica),
        pl.Series("prompt_tokens", prompt),
        pl.Series("completion_tokens", completion),
        pl.Series("cached_tokens", cached),
        pl.Series("status_code", status),
    )


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def request_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` seeded, RFC 4122 version-4-shaped UUID strings, built without a Python loop."""
    raw = np.frombuffer(rng.bytes(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    digits = np.empty((n, 32), dtype=np.uint8)
    digits[:, 0::2] = _HEX[raw >> 4]
    digits[:, 1::2] = _HEX[raw & 0x0F]
    out = np.full((n, 36), ord("-"), dtype=np.uint8)
    for dst, src in ((0, 0), (9, 8), (14, 12), (19, 16), (24, 20)):
        width = {0: 8, 9: 4, 14: 4, 19: 4, 24: 12}[dst]
        out[:, dst : dst + width] = digits[:, src : src + width]
    return out.view("S36").ravel().astype(str)
