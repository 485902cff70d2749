{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- Per hour of the window (every hour, also one with no data at all): how much of the
-- fleet's time telemetry covered and how its energy was measured, and what happened to
-- the hour's usage events: billed, orphaned (no telemetry), quarantined, late.

with hours as (
    select unnest(generate_series(
        {{ window_start() }}, {{ window_end() }} - interval 1 hour, interval 1 hour
    )) as hour_start
),

telemetry as (
    select
        hour_start,
        count(*) as gpus_reporting,
        sum(covered_s) as covered_s,
        sum(gap_s) as gap_s,
        sum(unmeasured_s) as unmeasured_s,
        sum(metered_j) as metered_j,
        sum(estimated_j) as estimated_j,
        cast(sum(counter_resets) as bigint) as counter_resets
    from {{ ref('fct_gpu_hourly') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by hour_start
),

requests as (
    select
        event_hour as hour_start,
        count(*) as events,
        count(*) filter (where is_orphan) as orphan_requests,
        count(*) filter (where energy_estimated) as estimated_energy_requests,
        avg(telemetry_coverage) as request_telemetry_coverage
    from {{ ref('fct_request_allocation') }}
    where event_hour >= {{ window_start() }} and event_hour < {{ window_end() }}
    group by event_hour
),

quarantine as (
    select
        hour_start,
        count(*) as quarantined_events
    from {{ ref('stg_usage__quarantine') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by hour_start
),

manifests as (
    select
        hour_start,
        cast(sum(duplicates) as bigint) as duplicate_events,
        cast(sum(late_incorporated) as bigint) as late_events
    from {{ ref('stg_usage__hours') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by hour_start
)

select
    h.hour_start,
    coalesce(t.gpus_reporting, 0) as gpus_reporting,
    coalesce(t.covered_s, 0.0) as covered_s,
    coalesce(t.gap_s, 0.0) as gap_s,
    coalesce(t.unmeasured_s, 0.0) as unmeasured_s,
    -- Seconds measured by scrapes (not gap, not unmeasured) over the reporting GPUs' hour.
    case
        when t.gpus_reporting > 0
            then
                greatest(t.covered_s - t.gap_s - t.unmeasured_s, 0.0)
                / (t.gpus_reporting * 3600.0)
        else 0.0
    end as telemetry_coverage,
    case when t.metered_j > 0 then t.estimated_j / t.metered_j else 0.0 end
        as estimated_energy_share,
    coalesce(t.counter_resets, 0) as counter_resets,
    coalesce(r.events, 0) as events,
    coalesce(r.orphan_requests, 0) as orphan_requests,
    coalesce(r.estimated_energy_requests, 0) as estimated_energy_requests,
    r.request_telemetry_coverage,
    coalesce(q.quarantined_events, 0) as quarantined_events,
    coalesce(m.duplicate_events, 0) as duplicate_events,
    coalesce(m.late_events, 0) as late_events
from hours as h
left join telemetry as t on h.hour_start = t.hour_start
left join requests as r on h.hour_start = r.hour_start
left join quarantine as q on h.hour_start = q.hour_start
left join manifests as m on h.hour_start = m.hour_start
