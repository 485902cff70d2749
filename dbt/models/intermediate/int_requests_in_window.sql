{{ config(materialized='ephemeral') }}

-- Usage events whose request overlaps the window, with its phases (ALLOCATION.md §3):
-- prefill over [arrival, first token) — [arrival, end) when no token came — and
-- decode over [first token, end). Cached prompt tokens do no prefill work. Events are
-- bucketed by the hour they end, so the window's requests are found among the events
-- ending in it or up to max_request_s after it.

select
    request_id,
    tenant,
    model,
    gpu_uuids,
    gpu_count,
    arrival_ts,
    coalesce(first_token_ts, end_ts) as prefill_end_ts,
    end_ts,
    prompt_tokens - cached_prompt_tokens as uncached_prompt_tokens,
    completion_tokens,
    event_hour
from {{ ref('stg_usage__events') }}
where
    event_hour >= {{ window_start() }} - interval 1 hour
    and event_hour < {{ window_end() }} + to_seconds({{ var('max_request_s') }})
    and arrival_ts < {{ window_end() }}
    and end_ts >= {{ window_start() }}
