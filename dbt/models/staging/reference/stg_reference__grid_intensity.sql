-- The configured grid carbon intensity per UTC hour.
select
    hour_start,
    g_co2e_per_kwh
from {{ source('raw', 'grid_intensity') }}
