{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window_days('day') }}",
    )
}}

-- Per UTC day: the fleet's metered, idle and facility energy and its carbon, summed
-- over the day's hours (int_fleet_hour_carbon). A run rebuilds every day its window
-- touches from all of that day's hours allocated so far.

select
    cast(hour_start as date) as day,  -- noqa: RF04
    count(*) as hours,
    max(gpus) as gpus,
    sum(metered_kwh) as metered_kwh,
    sum(dynamic_kwh) as dynamic_kwh,
    sum(idle_kwh) as idle_kwh,
    sum(unattributed_kwh) as unattributed_kwh,
    max(pue) as pue,
    sum(facility_kwh) as facility_kwh,
    sum(kg_co2e) as kg_co2e,
    case
        when sum(facility_kwh) > 0 then sum(kg_co2e) * 1000.0 / sum(facility_kwh)
    end as grid_g_co2e_per_kwh,
    sum(output_tokens) as output_tokens
from {{ ref('int_fleet_hour_carbon') }}
where
    hour_start >= {{ window_days_start() }}
    and hour_start < {{ window_days_end() }}
group by cast(hour_start as date)
