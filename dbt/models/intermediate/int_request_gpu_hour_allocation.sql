{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- Each request's allocation per GPU-hour: the sum of its slice pieces, plus — under the
-- `share` idle policy — its part of the GPU-hour's idle energy, in proportion to its
-- dynamic energy there.

with pieces as (
    select
        request_id,
        tenant,
        model,
        gpu_key,
        gpu_count,
        hour_start,
        sum(prefill_tokens) as prefill_tokens,
        sum(decode_tokens) as decode_tokens,
        sum(overlap_s) as overlap_s,
        sum(dynamic_j) as dynamic_j,
        sum(absorbed_idle_j) as absorbed_idle_j,
        sum(occupied_s) as occupied_s,
        sum(active_s) as active_s,
        bool_or(energy_source <> 'counter') as any_estimated,
        bool_or(is_gap) as any_gap
    from {{ ref('int_request_slice_allocation') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    -- A request's tenant, model and group size are its own: grouping by them adds no
    -- group, and keeps the aggregate's state small (any_value of strings made it spill).
    group by request_id, tenant, model, gpu_key, gpu_count, hour_start
)

select
    p.*,
    g.gpu_uuid,
    g.gpu_model,
    case
        when '{{ var("idle_policy") }}' = 'share' and g.attributed_dynamic_j > 0
            then g.idle_j * p.dynamic_j / g.attributed_dynamic_j
        else 0.0
    end as shared_idle_j,
    p.dynamic_j + p.absorbed_idle_j + case
        when '{{ var("idle_policy") }}' = 'share' and g.attributed_dynamic_j > 0
            then g.idle_j * p.dynamic_j / g.attributed_dynamic_j
        else 0.0
    end as energy_j
from pieces as p
inner join {{ ref('int_gpu_hour_energy') }} as g
    on p.gpu_key = g.gpu_key and p.hour_start = g.hour_start
where g.hour_start >= {{ window_start() }} and g.hour_start < {{ window_end() }}
