{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        tags=['monthly'],
        pre_hook="{{ delete_window_periods('period') }}",
    )
}}

-- Per billing period (calendar month, UTC) x tenant x model: what serving the tenant's
-- tokens used (allocated energy, occupied GPU-hours) and cost, against what its invoice
-- billed for them (pipelines/billing/index.py: final invoice, else the draft).
-- Cost to serve = kWh x energy tariff + GPU-hours x the GPU type's hourly amortization
-- (vars energy_tariff_per_kwh, gpu_hour_cost, default_gpu_hour_cost). Amounts are
-- DECIMAL(18, 6); kWh and GPU-hours are converted from the allocation's floats once, to
-- 9 decimals. Idle energy the tenant was not allocated (idle policy `separate`) is the
-- provider's overhead (mart_fleet_daily), not in this cost: margin here is the
-- contribution margin over allocated cost.

with rates as (
    select
        gpu_type,
        cast(cost as decimal(18, 6)) as gpu_hour_cost
    from ({{ values_from_var('gpu_hour_cost', ['gpu_type', 'cost'], ['varchar', 'varchar']) }})
),

usage as (
    select
        strftime(u.event_hour, '%Y-%m') as period,
        u.tenant,
        u.model,
        u.gpu_type,
        sum(u.requests) as requests,
        sum(u.prompt_tokens) as prompt_tokens,
        sum(u.completion_tokens) as output_tokens,
        sum(u.energy_j) as energy_j,
        sum(u.occupied_gpu_s) as occupied_gpu_s
    from {{ ref('fct_tenant_usage_hourly') }} as u
    where u.event_hour >= {{ window_start() }} and u.event_hour < {{ window_end() }}
    group by strftime(u.event_hour, '%Y-%m'), u.tenant, u.model, u.gpu_type
),

costed as (
    select
        u.*,
        cast(u.energy_j / 3.6e6 as decimal(18, 9)) as energy_kwh,
        cast(u.occupied_gpu_s / 3600.0 as decimal(18, 9)) as gpu_hours,
        coalesce(
            r.gpu_hour_cost, cast('{{ var("default_gpu_hour_cost") }}' as decimal(18, 6))
        ) as gpu_hour_cost
    from usage as u
    left join rates as r on u.gpu_type = r.gpu_type
),

per_model as (
    select
        period,
        tenant,
        model,
        sum(requests) as requests,
        sum(prompt_tokens) as prompt_tokens,
        sum(output_tokens) as output_tokens,
        sum(energy_j) as energy_j,
        sum(gpu_hours) as gpu_hours,
        sum(
            cast(
                energy_kwh * cast('{{ var("energy_tariff_per_kwh") }}' as decimal(18, 6))
                as decimal(18, 6)
            )
        ) as energy_cost,
        sum(cast(gpu_hours * gpu_hour_cost as decimal(18, 6))) as gpu_cost
    from costed
    group by period, tenant, model
),

billed as (
    select
        period,
        tenant,
        model,
        currency as billed_currency,
        billed,
        invoice_status
    from {{ ref('stg_billing__revenue') }}
    where
        period >= strftime({{ window_start() }}, '%Y-%m')
        and period < strftime({{ window_end() }}, '%Y-%m')
),

joined as (
    select
        coalesce(u.period, b.period) as period,
        coalesce(u.tenant, b.tenant) as tenant,
        coalesce(u.model, b.model) as model,
        coalesce(u.requests, 0) as requests,
        coalesce(u.prompt_tokens, 0) as prompt_tokens,
        coalesce(u.output_tokens, 0) as output_tokens,
        coalesce(u.energy_j, 0.0) as energy_j,
        coalesce(u.gpu_hours, 0) as gpu_hours,
        cast(coalesce(u.energy_cost, 0) as decimal(18, 6)) as energy_cost,
        cast(coalesce(u.gpu_cost, 0) as decimal(18, 6)) as gpu_cost,
        b.billed_currency,
        cast(b.billed as decimal(18, 6)) as billed,
        b.invoice_status
    from per_model as u
    full outer join billed as b
        on u.period = b.period and u.tenant = b.tenant and u.model = b.model
)

select
    period,
    tenant,
    model,
    cast(requests as bigint) as requests,
    cast(prompt_tokens as bigint) as prompt_tokens,
    cast(output_tokens as bigint) as output_tokens,
    energy_j,
    cast(gpu_hours as double) as gpu_hours,
    case when output_tokens > 0 then energy_j / output_tokens end as j_per_output_token,
    '{{ var("cost_currency") }}' as currency,
    energy_cost,
    gpu_cost,
    cast(energy_cost + gpu_cost as decimal(18, 6)) as cost_to_serve,
    -- Ratios per million tokens: rounded to 6 decimals (DuckDB divides decimals in
    -- double); the amounts above are exact.
    case
        when output_tokens > 0
            then cast((energy_cost + gpu_cost) * 1000000 / output_tokens as decimal(18, 6))
    end as cost_per_1m_output_tokens,
    billed_currency,
    billed,
    case
        when output_tokens > 0 and billed is not null
            then cast(billed * 1000000 / output_tokens as decimal(18, 6))
    end as billed_per_1m_output_tokens,
    case
        when billed_currency = '{{ var("cost_currency") }}'
            then cast(billed - (energy_cost + gpu_cost) as decimal(18, 6))
    end as margin,
    case
        when billed_currency = '{{ var("cost_currency") }}' and billed > 0
            then cast((billed - (energy_cost + gpu_cost)) / billed as double)
    end as margin_share,
    invoice_status
from joined
