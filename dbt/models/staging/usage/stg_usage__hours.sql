-- The manifest of each built usage hour of the configured topic.
select
    strptime(hour, '%Y-%m-%dT%H')::timestamp at time zone 'UTC' as hour_start,
    events,
    duplicates,
    conflicts,
    quarantined,
    late_incorporated
from {{ source('raw', 'usage_hours') }}
where topic = '{{ var("usage_topic") }}'
