{{ config(materialized='view') }}

-- Allocation of each slice piece over the requests in it (ALLOCATION.md §4): with total
-- work W > 0, request r receives dynamic energy D * work_r / W, occupied GPU-seconds
-- duration * work_r / W and active GPU-seconds duration * activity * work_r / W; under
-- the `absorb` idle policy also the piece's idle energy by the same share.
-- work = w_prefill * prompt tokens + completion tokens (w_decode = 1 after scaling).
--
-- A view over the last run's window, not a table: it has a row per request per slice
-- (20 M for a fleet-hour of 256 GPUs at 1 s telemetry with 1 M requests) and only
-- int_request_gpu_hour_allocation reads it, summing it per request and GPU-hour;
-- writing it out and reading it back cost more than the allocation itself
-- (bench/allocate.py). For the same reason W comes from the piece's token totals in
-- int_gpu_slice_energy (w of its model * prompt tokens + completion tokens), not from a
-- window over the request rows; only a piece serving several models sums its rows.

with configured as (
    {{ values_from_var(
        'model_weights', ['model', 'w_prefill', 'w_decode'], ['varchar', 'double', 'double']
    ) }}
),

weights as (
    -- w_prefill per hour, model and GPU model: the fitted or configured weight of
    -- int_prefill_weights, else the configured one.
    select
        w.hour_start,
        w.model,
        w.gpu_model,
        w.w_prefill
    from {{ ref('int_prefill_weights') }} as w
    where w.hour_start >= {{ window_start() }} and w.hour_start < {{ window_end() }}
),

pieces as (
    select
        e.gpu_key,
        e.hour_start,
        e.piece_start,
        e.gpu_model,
        e.duration_s,
        e.activity,
        e.idle_j,
        e.dynamic_j,
        e.energy_source,
        e.is_gap,
        e.models,
        coalesce(
            w.w_prefill,
            coalesce(c.w_prefill, {{ var('default_w_prefill') }})
            / coalesce(c.w_decode, {{ var('default_w_decode') }})
        ) * e.prefill_tokens + e.decode_tokens as single_model_work
    from {{ ref('int_gpu_slice_energy') }} as e
    left join weights as w
        on
            e.hour_start = w.hour_start
            and e.model = w.model
            and e.gpu_model = w.gpu_model
    left join configured as c on e.model = c.model
    where e.hour_start >= {{ window_start() }} and e.hour_start < {{ window_end() }}
),

tokens as (
    select
        t.request_id,
        t.tenant,
        t.model,
        t.gpu_uuid,
        t.gpu_key,
        t.gpu_count,
        t.hour_start,
        t.piece_start,
        t.prefill_tokens,
        t.decode_tokens,
        t.overlap_s,
        p.gpu_model,
        p.duration_s,
        p.activity,
        p.idle_j as piece_idle_j,
        p.dynamic_j as piece_dynamic_j,
        p.energy_source,
        p.is_gap,
        p.models,
        p.single_model_work,
        coalesce(
            w.w_prefill,
            coalesce(c.w_prefill, {{ var('default_w_prefill') }})
            / coalesce(c.w_decode, {{ var('default_w_decode') }})
        ) * t.prefill_tokens + t.decode_tokens as work
    from {{ ref('int_request_slice_tokens') }} as t
    inner join pieces as p
        on t.gpu_key = p.gpu_key and t.piece_start = p.piece_start
    left join weights as w
        on
            t.hour_start = w.hour_start
            and t.model = w.model
            and p.gpu_model = w.gpu_model
    left join configured as c on t.model = c.model
    where t.hour_start >= {{ window_start() }} and t.hour_start < {{ window_end() }}
),

multi_model_work as (
    select
        gpu_key,
        piece_start,
        sum(work) as piece_work
    from tokens
    where models > 1
    group by gpu_key, piece_start
),

worked as (
    select
        t.*,
        coalesce(m.piece_work, t.single_model_work) as piece_work
    from tokens as t
    left join multi_model_work as m
        on t.gpu_key = m.gpu_key and t.piece_start = m.piece_start
)

select
    request_id,
    tenant,
    model,
    gpu_uuid,
    gpu_key,
    gpu_model,
    gpu_count,
    hour_start,
    piece_start,
    prefill_tokens,
    decode_tokens,
    overlap_s,
    work,
    piece_work,
    energy_source,
    is_gap,
    case when piece_work > 0 then work / piece_work else 0.0 end as share,
    case when piece_work > 0 then piece_dynamic_j * work / piece_work else 0.0 end
        as dynamic_j,
    case
        when piece_work > 0 and '{{ var("idle_policy") }}' = 'absorb'
            then piece_idle_j * work / piece_work
        else 0.0
    end as absorbed_idle_j,
    case when piece_work > 0 then duration_s * work / piece_work else 0.0 end as occupied_s,
    case
        when piece_work > 0
            then duration_s * coalesce(activity, 0.0) * work / piece_work
        else 0.0
    end as active_s
from worked
