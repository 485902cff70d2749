{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('event_hour') }}",
    )
}}

-- Tenant x model x GPU type x hour (the hour a request ended, as it is billed): tokens,
-- energy and GPU-seconds.

select
    tenant,
    model,
    gpu_type,
    event_hour,
    idle_policy,
    count(*) as requests,
    cast(sum(prompt_tokens) as bigint) as prompt_tokens,
    cast(sum(cached_prompt_tokens) as bigint) as cached_prompt_tokens,
    cast(sum(completion_tokens) as bigint) as completion_tokens,
    sum(energy_j) as energy_j,
    sum(dynamic_energy_j) as dynamic_energy_j,
    sum(idle_energy_j) as idle_energy_j,
    sum(occupied_gpu_s) as occupied_gpu_s,
    sum(active_gpu_s) as active_gpu_s,
    count(*) filter (where is_orphan) as orphan_requests
from {{ ref('fct_request_allocation') }}
where event_hour >= {{ window_start() }} and event_hour < {{ window_end() }}
group by tenant, model, gpu_type, event_hour, idle_policy
