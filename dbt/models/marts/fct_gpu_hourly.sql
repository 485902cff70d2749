{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- Per GPU-hour: metered energy and where it went; seconds covered and how they were
-- used. Closes by construction: allocated + idle unallocated + unattributed = metered,
-- occupied + idle seconds = covered seconds (checked on every run).

with allocated as (
    select
        gpu_key,
        hour_start,
        sum(energy_j) as allocated_j,
        sum(dynamic_j) as allocated_dynamic_j,
        sum(absorbed_idle_j + shared_idle_j) as allocated_idle_j,
        sum(occupied_s) as allocated_occupied_s,
        sum(active_s) as allocated_active_s,
        count(distinct request_id) as requests
    from {{ ref('int_request_gpu_hour_allocation') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by gpu_key, hour_start
)

select
    g.gpu_key,
    g.gpu_uuid,
    g.hostname,
    g.gpu_model,
    g.hour_start,
    g.idle_policy,
    g.metered_j,
    g.counter_j,
    g.estimated_j,
    g.unmeasured_s,
    g.idle_j,
    g.dynamic_j,
    coalesce(a.allocated_j, 0.0) as allocated_j,
    coalesce(a.allocated_dynamic_j, 0.0) as allocated_dynamic_j,
    coalesce(a.allocated_idle_j, 0.0) as allocated_idle_j,
    g.idle_unallocated_j,
    g.unattributed_j,
    g.covered_s,
    g.occupied_s,
    g.idle_s,
    g.active_s,
    g.gap_s,
    g.counter_resets,
    g.idle_power_w,
    g.idle_source,
    coalesce(a.requests, 0) as requests
from {{ ref('int_gpu_hour_energy') }} as g
left join allocated as a on g.gpu_key = a.gpu_key and g.hour_start = a.hour_start
where g.hour_start >= {{ window_start() }} and g.hour_start < {{ window_end() }}
