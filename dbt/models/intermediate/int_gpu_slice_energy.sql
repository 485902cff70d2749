{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- Each slice piece with its tokens, its GPU's idle power, and its energy split into
-- idle and dynamic (ALLOCATION.md §2): idle = min(E, P_idle * duration), dynamic = the
-- rest. P_idle is learned per GPU-hour as a low percentile of slice power over its
-- pieces with no request (counter-measured, not gaps), when there are enough of them;
-- otherwise it comes from configuration per GPU model.

with tokens as (
    select
        gpu_key,
        piece_start,
        sum(prefill_tokens) as prefill_tokens,
        sum(decode_tokens) as decode_tokens,
        count(distinct request_id) as requests,
        count(distinct model) as models,
        min(model) as model
    from {{ ref('int_request_slice_tokens') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by gpu_key, piece_start
),

pieces as (
    select
        s.*,
        coalesce(t.prefill_tokens, 0.0) as prefill_tokens,
        coalesce(t.decode_tokens, 0.0) as decode_tokens,
        coalesce(t.requests, 0) as requests,
        coalesce(t.models, 0) as models,
        t.model,
        coalesce(t.prefill_tokens, 0.0) + coalesce(t.decode_tokens, 0.0) > 0 as has_work
    from {{ ref('int_gpu_slices_cut') }} as s
    left join tokens as t on s.gpu_key = t.gpu_key and s.piece_start = t.piece_start
    where s.hour_start >= {{ window_start() }} and s.hour_start < {{ window_end() }}
),

configured_idle as (
    {{ values_from_var('idle_power_w', ['gpu_model', 'watts'], ['varchar', 'double']) }}
),

learned_idle as (
    select
        gpu_key,
        hour_start,
        count(*) as idle_pieces,
        quantile_cont(energy_j / duration_s, {{ var('idle_percentile') }}) as learned_w
    from pieces
    where
        not has_work
        and energy_source = 'counter'
        and not is_gap
        and duration_s > 0
    group by gpu_key, hour_start
),

idle_power as (
    select
        p.*,
        case
            when
                {{ var('learn_idle_power') }}
                and l.idle_pieces >= {{ var('min_idle_slices') }}
                then 'learned'
            when c.watts is not null then 'configured'
            else 'default'
        end as idle_source,
        case
            when
                {{ var('learn_idle_power') }}
                and l.idle_pieces >= {{ var('min_idle_slices') }}
                then l.learned_w
            else coalesce(c.watts, {{ var('default_idle_power_w') }})
        end as idle_power_w
    from pieces as p
    left join learned_idle as l on p.gpu_key = l.gpu_key and p.hour_start = l.hour_start
    left join configured_idle as c on p.gpu_model = c.gpu_model
)

select
    gpu_key,
    gpu_uuid,
    hostname,
    gpu_model,
    hour_start,
    piece_start,
    piece_end,
    duration_s,
    energy_j,
    energy_source,
    is_gap,
    counter_reset,
    activity,
    prefill_tokens,
    decode_tokens,
    requests,
    models,
    model,
    has_work,
    idle_power_w,
    idle_source,
    least(energy_j, idle_power_w * duration_s) as idle_j,
    energy_j - least(energy_j, idle_power_w * duration_s) as dynamic_j
from idle_power
