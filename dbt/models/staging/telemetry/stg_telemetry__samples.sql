-- DCGM samples: the counter, power and activity the allocation reads, per GPU.
-- Activity is DCGM_FI_PROF_GR_ENGINE_ACTIVE, else GPU utilisation / 100.
select
    gpu_key,
    gpu_uuid,
    hostname,
    model_name as gpu_model,
    ts as sample_ts,
    hour_start as sample_hour,
    energy_mj,
    power_w,
    coalesce(gr_engine_active, gpu_util_pct / 100.0) as activity,
    repeated
from {{ source('raw', 'gpu_telemetry') }}
