{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- Per hour: the fleet's metered energy, facility energy (times the configured PUE) and
-- its carbon at the hour's grid intensity: the configured file's value for the hour
-- where it has one, else the hour-of-day profile (var grid_intensity_by_hour, UTC).

with gpu_hours as (
    select
        hour_start,
        count(*) as gpus,
        sum(metered_j) as metered_j,
        sum(dynamic_j) as dynamic_j,
        sum(idle_j) as idle_j,
        sum(unattributed_j) as unattributed_j
    from {{ ref('fct_gpu_hourly') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by hour_start
),

tokens as (
    select
        hour_start,
        sum(decode_tokens) as output_tokens
    from {{ ref('int_request_gpu_hour_allocation') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by hour_start
),

profile as (
    select
        hour_of_day - 1 as hour_of_day,
        g_co2e_per_kwh
    from (
        select
            unnest({{ var('grid_intensity_by_hour') }}) as g_co2e_per_kwh,
            generate_subscripts({{ var('grid_intensity_by_hour') }}, 1) as hour_of_day
    )
),

measured as (
    select
        g.*,
        coalesce(t.output_tokens, 0.0) as output_tokens,
        g.metered_j / 3.6e6 as metered_kwh,
        g.metered_j / 3.6e6 * {{ var('pue') }} as facility_kwh,
        coalesce(f.g_co2e_per_kwh, p.g_co2e_per_kwh) as grid_g_co2e_per_kwh,
        case when f.g_co2e_per_kwh is null then 'hour_of_day' else 'file' end as intensity_source
    from gpu_hours as g
    left join tokens as t on g.hour_start = t.hour_start
    left join {{ ref('stg_reference__grid_intensity') }} as f on g.hour_start = f.hour_start
    left join profile as p on hour(g.hour_start) = p.hour_of_day
)

select
    hour_start,
    gpus,
    metered_kwh,
    dynamic_j / 3.6e6 as dynamic_kwh,
    idle_j / 3.6e6 as idle_kwh,
    unattributed_j / 3.6e6 as unattributed_kwh,
    cast({{ var('pue') }} as double) as pue,
    facility_kwh,
    grid_g_co2e_per_kwh,
    intensity_source,
    facility_kwh * grid_g_co2e_per_kwh / 1000.0 as kg_co2e,
    output_tokens
from measured
