{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('event_hour') }}",
    )
}}

-- One row per usage event (request) of the window's event hours — every event billed
-- exactly once, with or without telemetry — with the energy and GPU-seconds allocated to
-- it across every GPU-hour it ran in (a request can start in an earlier hour).
-- A request no slice covers is an orphan: it keeps its tokens and gets zero energy.

with events as (
    select *
    from {{ ref('stg_usage__events') }}
    where event_hour >= {{ window_start() }} and event_hour < {{ window_end() }}
),

allocated as (
    select
        a.request_id,
        min(a.gpu_model) as gpu_model,
        sum(a.energy_j) as energy_j,
        sum(a.dynamic_j) as dynamic_energy_j,
        sum(a.absorbed_idle_j + a.shared_idle_j) as idle_energy_j,
        sum(a.occupied_s) as occupied_gpu_s,
        sum(a.active_s) as active_gpu_s,
        sum(a.overlap_s) as overlap_gpu_s,
        bool_or(a.any_estimated) as any_estimated,
        bool_or(a.any_gap) as any_gap
    from {{ ref('int_request_gpu_hour_allocation') }} as a
    semi join events as e on a.request_id = e.request_id
    group by a.request_id
)

select
    e.request_id,
    e.tenant,
    e.model,
    coalesce(a.gpu_model, 'unknown') as gpu_type,
    e.gpu_count,
    e.event_hour,
    e.arrival_ts,
    e.end_ts,
    e.status,
    e.prompt_tokens,
    e.cached_prompt_tokens,
    e.completion_tokens,
    '{{ var("idle_policy") }}' as idle_policy,
    coalesce(a.energy_j, 0.0) as energy_j,
    coalesce(a.dynamic_energy_j, 0.0) as dynamic_energy_j,
    coalesce(a.idle_energy_j, 0.0) as idle_energy_j,
    coalesce(a.occupied_gpu_s, 0.0) as occupied_gpu_s,
    coalesce(a.active_gpu_s, 0.0) as active_gpu_s,
    case
        when a.request_id is null then 0.0
        when e.end_ts > e.arrival_ts
            then least(
                a.overlap_gpu_s / e.gpu_count
                / {{ seconds_between('e.arrival_ts', 'e.end_ts') }},
                1.0
            )
        else 1.0
    end as telemetry_coverage,
    a.request_id is null as is_orphan,
    coalesce(a.any_estimated, false) as energy_estimated,
    coalesce(a.any_gap, false) as crosses_gap
from events as e
left join allocated as a on e.request_id = a.request_id
