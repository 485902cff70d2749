{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- The tokens of each request falling in each slice piece of each of its GPUs
-- (ALLOCATION.md §3): prompt tokens spread uniformly over the prefill phase, completion
-- tokens over the decode phase; a phase of zero length puts all its tokens at its
-- instant. A request on a tensor-parallel group of k GPUs counts 1/k on each.
--
-- Pieces are found by sequence number rather than by an interval join: the piece
-- holding the arrival and the last piece starting before the end (ASOF joins), then
-- every piece between — linear in the output, where an interval join is quadratic.

with pieces as (
    select
        *,
        row_number() over (partition by gpu_uuid order by piece_start) as seq
    from {{ ref('int_gpu_slices_cut') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
),

request_gpus as (
    select
        * exclude (gpu_uuids),
        unnest(gpu_uuids) as gpu_uuid
    from {{ ref('int_requests_in_window') }}
),

first_piece as (
    select
        r.*,
        p.seq as first_seq
    from request_gpus as r
    asof left join pieces as p
        on r.gpu_uuid = p.gpu_uuid and r.arrival_ts >= p.piece_start
),

last_piece as (
    select
        r.*,
        p.seq as last_seq
    from first_piece as r
    asof left join pieces as p
        on r.gpu_uuid = p.gpu_uuid and r.end_ts >= p.piece_start
),

spans as (
    select
        * exclude (first_seq, last_seq),
        unnest(range(coalesce(first_seq, 1), last_seq + 1)) as seq
    from last_piece
    where last_seq is not null
),

spread as (
    select
        s.request_id,
        s.tenant,
        s.model,
        s.gpu_uuid,
        s.gpu_count,
        p.gpu_key,
        p.hour_start,
        p.piece_start,
        case
            when s.prefill_end_ts > s.arrival_ts
                then greatest(
                    {{ seconds_between(
                        'greatest(s.arrival_ts, p.piece_start)',
                        'least(s.prefill_end_ts, p.piece_end)'
                    ) }}, 0.0
                ) / {{ seconds_between('s.arrival_ts', 's.prefill_end_ts') }}
            when s.arrival_ts >= p.piece_start and s.arrival_ts < p.piece_end then 1.0
            else 0.0
        end as prefill_fraction,
        case
            when s.end_ts > s.prefill_end_ts
                then greatest(
                    {{ seconds_between(
                        'greatest(s.prefill_end_ts, p.piece_start)',
                        'least(s.end_ts, p.piece_end)'
                    ) }}, 0.0
                ) / {{ seconds_between('s.prefill_end_ts', 's.end_ts') }}
            when s.prefill_end_ts >= p.piece_start and s.prefill_end_ts < p.piece_end then 1.0
            else 0.0
        end as decode_fraction,
        greatest(
            {{ seconds_between(
                'greatest(s.arrival_ts, p.piece_start)', 'least(s.end_ts, p.piece_end)'
            ) }}, 0.0
        ) as overlap_s,
        s.uncached_prompt_tokens,
        s.completion_tokens
    from spans as s
    inner join pieces as p on s.gpu_uuid = p.gpu_uuid and s.seq = p.seq
)

select
    request_id,
    tenant,
    model,
    gpu_uuid,
    gpu_key,
    gpu_count,
    hour_start,
    piece_start,
    uncached_prompt_tokens * prefill_fraction / gpu_count as prefill_tokens,
    completion_tokens * decode_fraction / gpu_count as decode_tokens,
    overlap_s
from spread
where prefill_fraction > 0 or decode_fraction > 0 or overlap_s > 0
