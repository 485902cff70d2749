-- Days of the window where mart_fleet_daily's energy or carbon is not the sum of its
-- hours (int_fleet_hour_carbon), to 1e-9 relative.
with hours as (
    select
        cast(hour_start as date) as day,
        sum(metered_kwh) as metered_kwh,
        sum(kg_co2e) as kg_co2e
    from {{ ref('int_fleet_hour_carbon') }}
    where
        hour_start >= {{ window_days_start() }}
        and hour_start < {{ window_days_end() }}
    group by cast(hour_start as date)
)

select
    h.day,
    h.metered_kwh,
    d.metered_kwh as daily_metered_kwh,
    h.kg_co2e,
    d.kg_co2e as daily_kg_co2e
from hours as h
left join {{ ref('mart_fleet_daily') }} as d on h.day = d.day
where
    d.day is null
    or abs(d.metered_kwh - h.metered_kwh) > 1e-9 * greatest(h.metered_kwh, 1e-9)
    or abs(d.kg_co2e - h.kg_co2e) > 1e-9 * greatest(h.kg_co2e, 1e-9)
