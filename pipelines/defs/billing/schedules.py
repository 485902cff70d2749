"""What starts invoice runs: a daily draft refresh and a daily finalize attempt.

- `invoice_draft_schedule` (01:00 UTC) redrafts the month in progress, so tenants see
  a draft at most a day old, and the previous month until it closes (its last hours
  and late events land after it ends). Keyed by month and day: each tick runs once.
- `invoice_finalize_schedule` (03:00 UTC) finalizes the previous month once it has
  closed (its end plus `billing.grace_days`, read from the settings at each tick) and
  while it still has drafts; otherwise it skips and says why. Keyed by the month: a
  period is finalized by one run (finalizing again would change nothing anyway).

Both are stopped until turned on, like every gpuledger schedule.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from pipelines.billing.cycle import period_closes_at
from pipelines.billing.store import InvoiceStore
from pipelines.defs.billing.assets import invoice_drafts, invoices_final, month_partition_key
from pipelines.defs.resources import GpuledgerSettings

__all__ = [
    "INVOICE_DRAFT_CRON",
    "INVOICE_FINALIZE_CRON",
    "invoice_draft_job",
    "invoice_draft_schedule",
    "invoice_finalize_job",
    "invoice_finalize_schedule",
    "previous_period",
]

INVOICE_DRAFT_CRON = "0 1 * * *"
INVOICE_FINALIZE_CRON = "0 3 * * *"

#: The efficiency domain's monthly assets (by key: that domain imports this one's).
_AFTER_INVOICES = (
    dg.AssetKey(["marts", "mart_tenant_efficiency"]),
    dg.AssetKey("analytics_period_snapshot"),
)

invoice_draft_job = dg.define_asset_job(
    "invoice_draft_job",
    selection=dg.AssetSelection.assets(invoice_drafts, *_AFTER_INVOICES),
    description=(
        "Rewrite a month's draft invoices (with the invoice checks), then its tenant "
        "efficiency mart and a new analysts' snapshot."
    ),
)
invoice_finalize_job = dg.define_asset_job(
    "invoice_finalize_job",
    selection=dg.AssetSelection.assets(invoices_final, *_AFTER_INVOICES),
    description=(
        "Finalize a month's invoices (with the invoice checks), then rebuild its tenant "
        "efficiency mart and publish a new analysts' snapshot."
    ),
)


def previous_period(at: datetime) -> str:
    """The month before the one `at` falls in (UTC): `2026-05` for any time in June."""
    first = at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return f"{first - timedelta(days=1):%Y-%m}"


@dg.schedule(
    name="invoice_draft_schedule",
    cron_schedule=INVOICE_DRAFT_CRON,
    job=invoice_draft_job,
    execution_timezone="UTC",
    description="Redraft the month in progress, and the previous one until it closes.",
)
def invoice_draft_schedule(
    context: dg.ScheduleEvaluationContext, gpuledger: GpuledgerSettings
) -> list[dg.RunRequest]:
    at = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
    requests = [
        dg.RunRequest(
            run_key=f"invoice-draft:{at:%Y-%m}:{at:%Y-%m-%d}",
            partition_key=month_partition_key(f"{at:%Y-%m}"),
        )
    ]
    # The previous month's last hours are allocated after midnight, and its late events
    # land during the grace days: its drafts follow them until the period closes.
    previous = previous_period(at)
    if at < period_closes_at(gpuledger.settings(), previous):
        requests.append(
            dg.RunRequest(
                run_key=f"invoice-draft:{previous}:{at:%Y-%m-%d}",
                partition_key=month_partition_key(previous),
            )
        )
    return requests


@dg.schedule(
    name="invoice_finalize_schedule",
    cron_schedule=INVOICE_FINALIZE_CRON,
    job=invoice_finalize_job,
    execution_timezone="UTC",
    description="Finalize the previous month once it has closed (end + grace days).",
)
def invoice_finalize_schedule(
    context: dg.ScheduleEvaluationContext, gpuledger: GpuledgerSettings
) -> dg.RunRequest | dg.SkipReason:
    settings = gpuledger.settings()
    at = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
    period = previous_period(at)
    closes = period_closes_at(settings, period)
    if at < closes:
        return dg.SkipReason(
            f"billing period {period} closes at {closes:%Y-%m-%d %H:%M} UTC (its end + "
            f"{settings.billing.grace_days} grace days); not finalized before then"
        )
    drafts = InvoiceStore(settings.invoices_path).draft_periods()
    if period not in drafts:
        return dg.SkipReason(
            f"billing period {period} has no drafts: finalized already, or never drafted "
            "(materialize invoice_drafts for it first)"
        )
    earlier = [p for p in drafts if p < period]
    if earlier:
        return dg.SkipReason(
            f"billing period {period}: earlier periods still have drafts "
            f"({', '.join(earlier)}); finalize those first"
        )
    key = month_partition_key(period)
    return dg.RunRequest(run_key=f"invoice-finalize:{key}", partition_key=key)
