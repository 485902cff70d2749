{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- Per model x GPU type x hour: output tokens, energy, time and activity, and the
-- efficiency ratios. A GPU-hour's metered energy, seconds and activity are split over
-- the models served on it in proportion to their allocated dynamic energy (occupied
-- seconds where none was allocated), so the rows of an hour add up to the fleet's
-- metered energy; a GPU-hour with no request is model '(no traffic)'. Output tokens are
-- the completion tokens generated in the hour (a request spanning hours counts pro
-- rata; each GPU of a tensor-parallel group 1/k).

with served as (
    select
        gpu_key,
        hour_start,
        model,
        sum(prefill_tokens) as prompt_tokens,
        sum(decode_tokens) as output_tokens,
        sum(dynamic_j) as dynamic_j,
        sum(occupied_s) as occupied_s
    from {{ ref('int_request_gpu_hour_allocation') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by gpu_key, hour_start, model
),

shares as (
    select
        *,
        coalesce(
            dynamic_j / nullif(sum(dynamic_j) over gpu_hour, 0),
            occupied_s / nullif(sum(occupied_s) over gpu_hour, 0),
            1.0 / count(*) over gpu_hour
        ) as share
    from served
    window gpu_hour as (partition by gpu_key, hour_start)
),

requests as (
    select
        model,
        coalesce(gpu_model, 'unknown') as gpu_type,
        hour_start,
        count(distinct request_id) as requests
    from {{ ref('int_request_gpu_hour_allocation') }}
    where hour_start >= {{ window_start() }} and hour_start < {{ window_end() }}
    group by model, coalesce(gpu_model, 'unknown'), hour_start
),

split as (
    select
        g.gpu_key,
        g.hour_start,
        coalesce(g.gpu_model, 'unknown') as gpu_type,
        coalesce(s.model, '(no traffic)') as model,
        coalesce(s.share, 1.0) as share,
        coalesce(s.prompt_tokens, 0.0) as prompt_tokens,
        coalesce(s.output_tokens, 0.0) as output_tokens,
        g.metered_j,
        g.dynamic_j,
        g.idle_j,
        g.unattributed_j,
        g.covered_s,
        g.active_s,
        g.occupied_s
    from {{ ref('fct_gpu_hourly') }} as g
    left join shares as s on g.gpu_key = s.gpu_key and g.hour_start = s.hour_start
    where g.hour_start >= {{ window_start() }} and g.hour_start < {{ window_end() }}
),

summed as (
    select
        model,
        gpu_type,
        hour_start,
        count(distinct gpu_key) as gpus,
        sum(prompt_tokens) as prompt_tokens,
        sum(output_tokens) as output_tokens,
        sum(share * metered_j) as energy_j,
        sum(share * dynamic_j) as dynamic_j,
        sum(share * idle_j) as idle_j,
        sum(share * unattributed_j) as unattributed_j,
        sum(share * covered_s) as covered_s,
        sum(share * active_s) as active_s,
        sum(share * occupied_s) as occupied_s
    from split
    group by model, gpu_type, hour_start
)

select
    s.model,
    s.gpu_type,
    s.hour_start,
    s.gpus,
    coalesce(r.requests, 0) as requests,
    s.output_tokens,
    s.prompt_tokens,
    s.energy_j,
    s.dynamic_j,
    s.idle_j,
    s.unattributed_j,
    s.covered_s,
    s.active_s,
    s.occupied_s,
    case when s.output_tokens > 0 then s.energy_j / s.output_tokens end as j_per_output_token,
    case when s.energy_j > 0 then s.output_tokens / s.energy_j end as output_tokens_per_j,
    case
        when s.covered_s > 0 then s.output_tokens / s.covered_s
    end as output_tokens_per_s_per_gpu,
    case when s.covered_s > 0 then s.active_s / s.covered_s end as utilization,
    case when s.energy_j > 0 then s.idle_j / s.energy_j end as idle_energy_share,
    case when s.energy_j > 0 then s.unattributed_j / s.energy_j end as unattributed_energy_share
from summed as s
left join requests as r
    on s.model = r.model and s.gpu_type = r.gpu_type and s.hour_start = r.hour_start
