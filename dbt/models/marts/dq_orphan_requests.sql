{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('event_hour') }}",
    )
}}

-- Requests no telemetry covers: billed for their tokens, with zero energy. The reason
-- says whether their GPUs report at all.

with orphans as (
    select *
    from {{ ref('fct_request_allocation') }}
    where
        is_orphan
        and event_hour >= {{ window_start() }}
        and event_hour < {{ window_end() }}
),

events as (
    select
        request_id,
        hostname,
        gpu_uuids
    from {{ ref('stg_usage__events') }}
    where event_hour >= {{ window_start() }} and event_hour < {{ window_end() }}
),

known_gpus as (
    select distinct gpu_uuid
    from {{ ref('int_gpu_slices_cut') }}
    where
        hour_start >= {{ window_start() }} - interval 1 hour
        and hour_start < {{ window_end() }}
)

select
    o.request_id,
    o.tenant,
    o.model,
    o.event_hour,
    o.arrival_ts,
    o.end_ts,
    e.hostname,
    e.gpu_uuids,
    o.prompt_tokens,
    o.completion_tokens,
    case
        when not exists (
            select 1
            from known_gpus as k
            where list_contains(e.gpu_uuids, k.gpu_uuid)
        ) then 'gpu_not_in_telemetry'
        else 'no_samples_during_request'
    end as reason
from orphans as o
inner join events as e on o.request_id = e.request_id
