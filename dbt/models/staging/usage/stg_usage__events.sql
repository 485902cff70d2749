-- Usage events of the configured topic, renamed for the allocation.
select
    event_id as request_id,
    tenant,
    model,
    model_version,
    prompt_tokens,
    completion_tokens,
    cached_prompt_tokens,
    arrival_time as arrival_ts,
    first_token_time as first_token_ts,
    end_time as end_ts,
    hostname,
    gpu_uuids,
    len(gpu_uuids) as gpu_count,
    status,
    hour_start as event_hour
from {{ source('raw', 'usage_events') }}
where topic = '{{ var("usage_topic") }}'
