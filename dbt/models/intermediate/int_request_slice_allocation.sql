{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- Allocation of each slice piece over the requests in it (ALLOCATION.md §4): with total
-- work W > 0, request r receives dynamic energy D * work_r / W, occupied GPU-seconds
-- duration * work_r / W and active GPU-seconds duration * activity * work_r / W; under
-- the `absorb` idle policy also the piece's idle energy by the same share.
-- work = w_prefill * prompt tokens + completion tokens (w_decode = 1 after scaling).

with configured as (
    {{ values_from_var(
        'model_weights', ['model', 'w_prefill', 'w_decode'], ['varchar', 'double', 'double']
    ) }}
),

tokens as (
    select
        t.*,
        e.gpu_model,
        coalesce(
            w.w_prefill,
            coalesce(c.w_prefill, {{ var('default_w_prefill') }})
            / coalesce(c.w_decode, {{ var('default_w_decode') }})
        ) as w_prefill
    from {{ ref('int_request_slice_tokens') }} as t
    inner join {{ ref('int_gpu_slice_energy') }} as e
        on t.gpu_key = e.gpu_key and t.piece_start = e.piece_start
    left join {{ ref('int_prefill_weights') }} as w
        on
            t.hour_start = w.hour_start
            and t.model = w.model
            and e.gpu_model = w.gpu_model
    left join configured as c on t.model = c.model
    where
        t.hour_start >= {{ window_start() }}
        and t.hour_start < {{ window_end() }}
        and e.hour_start >= {{ window_start() }}
        and e.hour_start < {{ window_end() }}
),

worked as (
    select
        *,
        w_prefill * prefill_tokens + decode_tokens as work,
        sum(w_prefill * prefill_tokens + decode_tokens) over (
            partition by gpu_key, piece_start
        ) as piece_work
    from tokens
)

select
    w.request_id,
    w.tenant,
    w.model,
    w.gpu_uuid,
    w.gpu_key,
    w.gpu_model,
    w.gpu_count,
    w.hour_start,
    w.piece_start,
    w.prefill_tokens,
    w.decode_tokens,
    w.overlap_s,
    w.work,
    w.piece_work,
    e.energy_source,
    e.is_gap,
    case when w.piece_work > 0 then w.work / w.piece_work else 0.0 end as share,
    case when w.piece_work > 0 then e.dynamic_j * w.work / w.piece_work else 0.0 end
        as dynamic_j,
    case
        when w.piece_work > 0 and '{{ var("idle_policy") }}' = 'absorb'
            then e.idle_j * w.work / w.piece_work
        else 0.0
    end as absorbed_idle_j,
    case when w.piece_work > 0 then e.duration_s * w.work / w.piece_work else 0.0 end
        as occupied_s,
    case
        when w.piece_work > 0
            then e.duration_s * coalesce(e.activity, 0.0) * w.work / w.piece_work
        else 0.0
    end as active_s
from worked as w
inner join {{ ref('int_gpu_slice_energy') }} as e
    on w.gpu_key = e.gpu_key and w.piece_start = e.piece_start
where e.hour_start >= {{ window_start() }} and e.hour_start < {{ window_end() }}
