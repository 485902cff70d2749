-- Quarantined usage records of the configured topic, per hour.
select
    hour_start,
    reason,
    event_id,
    tenant
from {{ source('raw', 'usage_quarantine') }}
where topic = '{{ var("usage_topic") }}'
