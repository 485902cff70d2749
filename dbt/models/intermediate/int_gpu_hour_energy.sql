{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- Per GPU-hour: the metered energy and its split, and where idle energy goes under the
-- configured idle policy (ALLOCATION.md §5):
-- - separate: idle stays on the GPU, unallocated;
-- - absorb: the idle energy of pieces with work goes with their dynamic energy;
-- - share: all the hour's idle energy goes to the requests in proportion to their
--   dynamic energy on this GPU (when there is any).

with pieces as (
    select *
    from {{ ref('int_gpu_slice_energy') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
),

hourly as (
    select
        gpu_key,
        any_value(gpu_uuid) as gpu_uuid,
        any_value(hostname) as hostname,
        any_value(gpu_model) as gpu_model,
        hour_start,
        sum(energy_j) as metered_j,
        sum(case when energy_source = 'counter' then energy_j else 0 end) as counter_j,
        sum(case when energy_source = 'power_integral' then energy_j else 0 end)
            as estimated_j,
        sum(case when energy_source = 'missing' then duration_s else 0 end) as unmeasured_s,
        sum(idle_j) as idle_j,
        sum(dynamic_j) as dynamic_j,
        sum(case when has_work then dynamic_j else 0 end) as attributed_dynamic_j,
        sum(case when has_work then 0 else dynamic_j end) as unattributed_j,
        sum(case when has_work then idle_j else 0 end) as idle_in_work_j,
        sum(duration_s) as covered_s,
        sum(case when has_work then duration_s else 0 end) as occupied_s,
        sum(case when has_work then 0 else duration_s end) as idle_s,
        sum(case when has_work then duration_s * coalesce(activity, 0) else 0 end) as active_s,
        sum(case when is_gap then duration_s else 0 end) as gap_s,
        count(distinct case when counter_reset then piece_start end) as counter_resets,
        avg(idle_power_w) as idle_power_w,
        any_value(idle_source) as idle_source
    from pieces
    group by gpu_key, hour_start
)

select
    *,
    '{{ var("idle_policy") }}' as idle_policy,
    case '{{ var("idle_policy") }}'
        when 'absorb' then idle_in_work_j
        when 'share' then case when attributed_dynamic_j > 0 then idle_j else 0.0 end
        else 0.0
    end as idle_allocated_j,
    idle_j - case '{{ var("idle_policy") }}'
        when 'absorb' then idle_in_work_j
        when 'share' then case when attributed_dynamic_j > 0 then idle_j else 0.0 end
        else 0.0
    end as idle_unallocated_j
from hourly
