{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_window('hour_start') }}",
    )
}}

-- The prefill weight per model and GPU model, per hour: the work of one uncached prompt
-- token relative to one completion token (w_decode = 1).
--
-- Configured (models/allocation_config.py: from Splitwise prefill speed and ML.ENERGY
-- decode curves), or — with learn_prefill_weight — fitted on the hour's own slices:
-- dynamic energy = alpha * prompt tokens + beta * completion tokens by least squares over
-- the pieces that served one model, measured by the counter and not gaps; w = alpha /
-- beta. The fit follows the energy a token really costs at the batch sizes the fleet ran
-- that hour; it falls back to the configured weight with too few pieces or a degenerate
-- fit.

with configured as (
    {{ values_from_var(
        'model_weights', ['model', 'w_prefill', 'w_decode'], ['varchar', 'double', 'double']
    ) }}
),

fit_input as (
    select
        hour_start,
        model,
        gpu_model,
        prefill_tokens as p,
        decode_tokens as d,
        dynamic_j as e
    from {{ ref('int_gpu_slice_energy') }}
    where
        hour_start >= {{ window_start() }}
        and hour_start < {{ window_end() }}
        and has_work
        and models = 1
        and energy_source = 'counter'
        and not is_gap
),

sums as (
    select
        hour_start,
        model,
        gpu_model,
        count(*) as pieces,
        sum(p * p) as spp,
        sum(p * d) as spd,
        sum(d * d) as sdd,
        sum(p * e) as spe,
        sum(d * e) as sde
    from fit_input
    group by hour_start, model, gpu_model
),

fitted as (
    select
        *,
        spp * sdd - spd * spd as det,
        (spe * sdd - sde * spd) / nullif(spp * sdd - spd * spd, 0) as alpha_j,
        (spp * sde - spd * spe) / nullif(spp * sdd - spd * spd, 0) as beta_j
    from sums
)

select
    f.hour_start,
    f.model,
    f.gpu_model,
    f.pieces,
    f.alpha_j,
    f.beta_j,
    coalesce(c.w_prefill, {{ var('default_w_prefill') }})
    / coalesce(c.w_decode, {{ var('default_w_decode') }}) as configured_w,
    case
        when
            {{ var('learn_prefill_weight') }}
            and f.pieces >= {{ var('min_fit_slices') }}
            and f.alpha_j > 0
            and f.beta_j > 0
            -- a relative determinant near zero means prompts and completions never varied
            -- independently: the split between them is not identified
            and f.det > 1e-9 * f.spp * f.sdd
            then 'fitted'
        else 'configured'
    end as weight_source,
    case
        when
            {{ var('learn_prefill_weight') }}
            and f.pieces >= {{ var('min_fit_slices') }}
            and f.alpha_j > 0
            and f.beta_j > 0
            and f.det > 1e-9 * f.spp * f.sdd
            then f.alpha_j / f.beta_j
        else
            coalesce(c.w_prefill, {{ var('default_w_prefill') }})
            / coalesce(c.w_decode, {{ var('default_w_decode') }})
    end as w_prefill
from fitted as f
left join configured as c on f.model = c.model
