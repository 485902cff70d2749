{{ config(tags=['monthly']) }}

-- What each period's invoices billed per tenant and model (built with the monthly
-- models, after the invoices).
select
    period,
    tenant,
    model,
    currency,
    billed,
    invoice_status,
    invoice_number
from {{ source('raw', 'invoice_revenue') }}
