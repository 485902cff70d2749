"""What an allocation run produced, in the figures people ask for first.

- `tenant_usage`: per tenant, requests, tokens, occupied GPU-hours and energy (kWh),
  from `marts.fct_request_allocation`.
- `model_efficiency`: per model and GPU type, J per output token — metered energy of the
  GPUs serving the model over its completion tokens, as ML.ENERGY measures it (all GPU
  energy of the replica while it serves) — with the decode batch it ran at, beside the
  ML.ENERGY figure for that model at that batch (`mlenergy_j_per_token`).
- `fidelity`: per tenant, allocated dynamic energy against a ground truth per request
  (the simulator's), with each tenant's share of the load.

All read the warehouse through one DuckDB connection given by the caller.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from datetime import datetime

import duckdb
import polars as pl

from ingest.simulator.calibration import MODELS

#: ML.ENERGY measures H100 SXM replicas only (calibration.py names the rows).
MLENERGY_GPU = "NVIDIA H100 80GB HBM3"
#: A figure within this factor of ML.ENERGY's at the same batch counts as plausible. Our
#: requests carry prompts 2-25x longer than ML.ENERGY's chat runs (~150 tokens), whose
#: prefill energy is charged per output token here too, so only the upper side is wide.
PLAUSIBLE_RANGE = (0.7, 2.5)


@dataclass(frozen=True)
class Reference:
    """ML.ENERGY's J per output token for a model at a batch size."""

    j_per_token: float
    measured_batches: tuple[float, float]
    note: str


def mlenergy_j_per_token(model: str, batch: float) -> Reference | None:
    """ML.ENERGY's J/output-token for `model` at `batch` (replica energy, H100 SXM).

    Interpolated log-log between measured batch sizes. Below the smallest measured batch
    (8), extrapolated as J/token = P * ITL / batch with power and inter-token latency
    held at batch 8: at small batches a decode step costs about the same whatever the
    batch, so a token costs 1 / batch of it — anchored on the measured batch-8 figure,
    so the curve is continuous. None for a model ML.ENERGY did not measure.
    """
    profile = MODELS.get(model)
    if profile is None or batch <= 0:
        return None
    batches, figures = profile.batch, profile.j_per_token
    span = (batches[0], batches[-1])
    if batch < batches[0]:
        return Reference(figures[0] * batches[0] / batch, span, "extrapolated below batch 8")
    if batch >= batches[-1]:
        return Reference(figures[-1], span, "largest measured batch")
    i = bisect.bisect_right(batches, batch) - 1
    x0, x1 = math.log(batches[i]), math.log(batches[i + 1])
    y0, y1 = math.log(figures[i]), math.log(figures[i + 1])
    y = y0 + (y1 - y0) * (math.log(batch) - x0) / (x1 - x0)
    return Reference(math.exp(y), span, "interpolated")


def tenant_usage(con: duckdb.DuckDBPyConnection, start: datetime, end: datetime) -> pl.DataFrame:
    """Per tenant over the event hours [start, end): tokens, GPU-hours, kWh."""
    return con.sql(
        """
        select tenant,
               sum(requests)::bigint as requests,
               sum(prompt_tokens)::bigint as prompt_tokens,
               sum(completion_tokens)::bigint as completion_tokens,
               sum(occupied_gpu_s) / 3600 as gpu_hours,
               sum(energy_j) / 3.6e6 as energy_kwh,
               sum(orphan_requests)::bigint as orphans
        from marts.fct_tenant_usage_hourly
        where event_hour >= $start and event_hour < $end
        group by tenant
        order by energy_kwh desc
        """,
        params={"start": start, "end": end},
    ).pl()


def model_efficiency(
    con: duckdb.DuckDBPyConnection, start: datetime, end: datetime
) -> pl.DataFrame:
    """Per model and GPU type over the GPU-hours [start, end).

    `batch` is the mean number of requests decoding on a replica while it serves:
    decode GPU-seconds of the requests over the GPUs' occupied seconds. `j_per_token` is
    the metered energy of the model's GPUs (idle included, as ML.ENERGY measures) per
    completion token; `dynamic_j_per_token` counts only the energy allocated to requests.
    A GPU is counted for the model whose requests used most of its time.
    """
    rows = con.sql(
        """
        with per_gpu_model as (
            select gpu_key, hour_start, model, sum(occupied_s) as occupied_s,
                   max(gpu_count) as tp
            from intermediate.int_request_gpu_hour_allocation
            where hour_start >= $start and hour_start < $end
            group by all
        ),
        gpu_model as (
            select gpu_key, arg_max(model, occupied_s) as model, max(tp) as tp
            from per_gpu_model group by gpu_key
        ),
        decode as (
            select f.model, f.gpu_type,
                   sum(greatest(epoch(e.end_ts - coalesce(e.first_token_ts, e.end_ts)), 0)
                       * e.gpu_count) as decode_gpu_s,
                   sum(f.completion_tokens)::bigint as completion_tokens,
                   sum(f.dynamic_energy_j) as dynamic_j
            from marts.fct_request_allocation as f
            join staging.stg_usage__events as e using (request_id)
            where f.event_hour >= $start and f.event_hour < $end and not f.is_orphan
            group by all
        ),
        metered as (
            select m.model, g.gpu_model as gpu_type, max(m.tp) as tp,
                   sum(g.metered_j) as metered_j, sum(g.occupied_s) as occupied_s,
                   count(distinct g.gpu_key) as gpus
            from marts.fct_gpu_hourly as g
            join gpu_model as m using (gpu_key)
            where g.hour_start >= $start and g.hour_start < $end
            group by all
        )
        select d.model, d.gpu_type, m.tp, m.gpus, d.completion_tokens,
               d.decode_gpu_s / m.occupied_s as batch,
               m.metered_j / d.completion_tokens as j_per_token,
               d.dynamic_j / d.completion_tokens as dynamic_j_per_token
        from decode as d
        join metered as m using (model, gpu_type)
        order by d.model, d.gpu_type
        """,
        params={"start": start, "end": end},
    ).pl()
    references = [
        mlenergy_j_per_token(row["model"], row["batch"]) for row in rows.iter_rows(named=True)
    ]
    return rows.with_columns(
        pl.Series(
            "mlenergy_j_per_token",
            [r.j_per_token if r else None for r in references],
            dtype=pl.Float64,
        ),
        pl.Series("mlenergy_note", [r.note if r else "not measured" for r in references]),
    ).with_columns(ratio=pl.col("j_per_token") / pl.col("mlenergy_j_per_token"))


def plausible(ratio: float | None) -> bool | None:
    if ratio is None or math.isnan(ratio):
        return None
    return PLAUSIBLE_RANGE[0] <= ratio <= PLAUSIBLE_RANGE[1]


def fidelity(
    con: duckdb.DuckDBPyConnection,
    truth: pl.DataFrame,
    start: datetime,
    end: datetime,
) -> pl.DataFrame:
    """Per tenant: allocated dynamic energy vs `truth` (request_id, true_energy_j).

    Requests that arrived before `start` are left out (their energy before the window
    was not allocated in it). `share` is the tenant's part of the true energy; `error`
    is allocated / true - 1.
    """
    allocated = con.sql(
        """
        select request_id, tenant, dynamic_energy_j
        from marts.fct_request_allocation
        where event_hour >= $start and event_hour < $end and arrival_ts >= $start
        """,
        params={"start": start, "end": end},
    ).pl()
    joined = allocated.join(truth.select("request_id", "true_energy_j"), on="request_id")
    return (
        joined.group_by("tenant")
        .agg(
            pl.len().alias("requests"),
            (pl.col("dynamic_energy_j").sum() / 3.6e6).alias("allocated_kwh"),
            (pl.col("true_energy_j").sum() / 3.6e6).alias("true_kwh"),
        )
        .with_columns(
            share=pl.col("true_kwh") / pl.col("true_kwh").sum(),
            error=pl.col("allocated_kwh") / pl.col("true_kwh") - 1.0,
        )
        .sort("true_kwh", descending=True)
    )
