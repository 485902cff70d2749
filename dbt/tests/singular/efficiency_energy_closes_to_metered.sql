-- Hours of the window where mart_efficiency_hourly's energy, summed over models and GPU
-- types, differs from the fleet's metered energy by more than 1e-9 relative.
with efficiency as (
    select
        hour_start,
        sum(energy_j) as energy_j,
        sum(covered_s) as covered_s
    from {{ ref('mart_efficiency_hourly') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by hour_start
),

metered as (
    select
        hour_start,
        sum(metered_j) as metered_j,
        sum(covered_s) as covered_s
    from {{ ref('fct_gpu_hourly') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by hour_start
)

select
    m.hour_start,
    m.metered_j,
    e.energy_j,
    m.covered_s,
    e.covered_s as efficiency_covered_s
from metered as m
left join efficiency as e on m.hour_start = e.hour_start
where
    e.energy_j is null
    or abs(e.energy_j - m.metered_j) > 1e-9 * greatest(abs(m.metered_j), 1e-3)
    or abs(e.covered_s - m.covered_s) > 1e-9 * greatest(m.covered_s, 1e-3)
