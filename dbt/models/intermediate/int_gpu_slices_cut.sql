{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- GPU slices (ALLOCATION.md §1): between consecutive distinct samples of a GPU, cut at
-- hour boundaries, with their energy. Distinct: a scrape that repeats the exporter's
-- last collection adds no information and is skipped.
--
-- Energy is the counter's increase; where the counter is missing at either end or went
-- backwards (a reset), the power integral (P_i + P_i+1) / 2 * duration, flagged
-- `power_integral`. A slice longer than the gap limit is a gap; its energy is estimated
-- from power the same way unless `gap_energy` is 'counter' and the counter held.
-- A slice is cut at each hour it crosses, energy pro rata by time, so that every hour
-- closes on its own. Samples are read two hours either side of the window so the
-- slices crossing its edges are whole.

with samples as (
    select *
    from {{ ref('stg_telemetry__samples') }}
    where
        sample_ts >= {{ window_start() }} - interval 2 hour
        and sample_ts < {{ window_end() }} + interval 2 hour
        and not repeated
),

paired as (
    select
        *,
        lead(sample_ts) over by_gpu as next_ts,
        lead(energy_mj) over by_gpu as next_energy_mj,
        lead(power_w) over by_gpu as next_power_w,
        lead(activity) over by_gpu as next_activity
    from samples
    window by_gpu as (partition by gpu_key order by sample_ts)
),

measured as (
    select
        gpu_key,
        gpu_uuid,
        hostname,
        gpu_model,
        sample_ts as slice_start,
        next_ts as slice_end,
        {{ seconds_between('sample_ts', 'next_ts') }} as duration_s,
        {{ seconds_between('sample_ts', 'next_ts') }} > {{ var('gap_limit_s') }} as is_gap,
        coalesce(next_energy_mj < energy_mj, false) as counter_reset,
        energy_mj is not null
        and next_energy_mj is not null
        and next_energy_mj >= energy_mj as counter_held,
        (next_energy_mj - energy_mj) / 1000.0 as counter_j,
        (coalesce(power_w, next_power_w) + coalesce(next_power_w, power_w))
        / 2.0
        * {{ seconds_between('sample_ts', 'next_ts') }} as power_integral_j,
        -- DCGM's activity is an average over the period a sample closes.
        coalesce(next_activity, activity) as activity
    from paired
    where next_ts is not null and next_ts > sample_ts
),

sourced as (
    select
        *,
        case
            when counter_held and (not is_gap or '{{ var("gap_energy") }}' = 'counter')
                then 'counter'
            when power_integral_j is not null then 'power_integral'
            else 'missing'
        end as energy_source
    from measured
),

slices as (
    select
        *,
        case energy_source
            when 'counter' then counter_j
            when 'power_integral' then power_integral_j
            else 0.0
        end as slice_energy_j
    from sourced
),

cut as (
    select
        *,
        unnest(
            generate_series(
                date_trunc('hour', slice_start),
                slice_end - interval 1 microsecond,
                interval 1 hour
            )
        ) as hour_start
    from slices
),

pieces as (
    select
        *,
        greatest(slice_start, hour_start) as piece_start,
        least(slice_end, hour_start + interval 1 hour) as piece_end
    from cut
)

select
    gpu_key,
    gpu_uuid,
    hostname,
    gpu_model,
    hour_start,
    piece_start,
    piece_end,
    slice_start,
    slice_end,
    {{ seconds_between('piece_start', 'piece_end') }} as duration_s,
    slice_energy_j * {{ seconds_between('piece_start', 'piece_end') }} / duration_s as energy_j,
    energy_source,
    is_gap,
    counter_reset,
    activity
from pieces
where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
