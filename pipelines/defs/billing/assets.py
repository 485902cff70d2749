"""Invoices as monthly assets: `invoice_drafts` and `invoices_final`.

A partition is a billing period (UTC month, key `2026-05-01`). `end_offset=1`: the month
in progress is a partition too, so its drafts can be refreshed while it runs.
`invoice_drafts` depends on the hourly `marts.fct_tenant_usage_hourly` through
Dagster's default time-window mapping (a month needs all of its hours).

Both assets are thin wrappers around `pipelines.billing.cycle`: `draft_period`
rewrites the period's drafts, `finalize_period` numbers and writes the finals (refused
before the period's end plus `billing.grace_days`, an `InputError` that fails the run).
"""

import re
import warnings
from typing import Any

import dagster as dg

from models.errors import InputError
from pipelines.billing.cycle import BillingRun, draft_period, finalize_period
from pipelines.billing.usage import period_window
from pipelines.defs.resources import GpuledgerSettings

__all__ = [
    "FCT_TENANT_USAGE_HOURLY",
    "MONTHLY_BACKFILL",
    "MONTHLY_PARTITIONS",
    "invoice_drafts",
    "invoices_final",
    "month_partition_key",
    "monthly_asset",
    "period_of_key",
    "run_metadata",
]

MONTHLY_PARTITIONS = dg.MonthlyPartitionsDefinition(
    start_date="2024-01-01", timezone="UTC", end_offset=1
)
with warnings.catch_warnings():
    # backfill_policy is beta in Dagster 1.13. One run per billing period, said for
    # every monthly asset alike, so the invoice jobs (which add the efficiency domain's
    # dbt models, single-run by dagster-dbt's default) keep one policy.
    warnings.simplefilter("ignore", dg.BetaWarning)
    MONTHLY_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)


def monthly_asset(**kwargs: Any) -> Any:
    """`dg.asset` on the billing periods, one run per period (the beta warning of
    `backfill_policy` silenced for this decorator only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.asset(
            partitions_def=MONTHLY_PARTITIONS, backfill_policy=MONTHLY_BACKFILL, **kwargs
        )


FCT_TENANT_USAGE_HOURLY = dg.AssetKey(["marts", "fct_tenant_usage_hourly"])


def period_of_key(partition_key: str) -> str:
    """`2026-05-01` -> `2026-05`."""
    return partition_key[:7]


def month_partition_key(period: str) -> str:
    """`2026-05` -> `2026-05-01`; an InputError for a bad period or one with no partition."""
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}", period):
        raise InputError(f"billing period {period!r}: expected YYYY-MM, e.g. 2026-03")
    period_window(period)
    key = f"{period}-01"
    keys = MONTHLY_PARTITIONS.get_partition_keys()
    if key < keys[0] or key > keys[-1]:
        raise InputError(
            f"billing period {period}: outside the monthly partitions "
            f"({period_of_key(keys[0])} to {period_of_key(keys[-1])})"
        )
    return key


def run_metadata(run: BillingRun) -> dict[str, Any]:
    """A run's documents: tenants, totals as decimal text, numbers, pending late usage."""
    metadata: dict[str, Any] = {
        "period": run.period,
        "documents": len(run.invoices),
        "tenants": sorted(item.document.tenant for item in run.invoices),
        "totals": dg.MetadataValue.json(
            {
                item.document.tenant: f"{item.document.total} {item.document.currency}"
                for item in run.invoices
            }
        ),
        "already_final": sorted(run.final),
        "pending_adjustments": dg.MetadataValue.json(
            [{"tenant": t, "period": p, "invoice": n} for t, p, n in run.pending]
        ),
    }
    numbers = {item.document.tenant: item.document.number for item in run.invoices}
    if any(numbers.values()):
        metadata["numbers"] = dg.MetadataValue.json(numbers)
    paths = sorted({item.path for item in run.invoices})
    if paths:
        metadata["directory"] = dg.MetadataValue.path(paths[0].rsplit("/", 1)[0])
    return metadata


@monthly_asset(
    group_name="billing",
    kinds={"python"},
    deps=[FCT_TENANT_USAGE_HOURLY],
)
def invoice_drafts(
    context: dg.AssetExecutionContext, gpuledger: GpuledgerSettings
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    """Every tenant's draft invoice of the month, rewritten from the usage (JSON, CSV,
    PDF, FOCUS) under `<invoices>/draft/<period>/<tenant>/`."""
    run = draft_period(gpuledger.settings(), period_of_key(context.partition_key))
    for tenant, period, number in run.pending:
        context.log.warning(
            f"{tenant}: usage of {period} changed since {number} was finalized; "
            "a later draft carries the difference"
        )
    return dg.MaterializeResult(metadata=run_metadata(run))


@monthly_asset(
    group_name="billing",
    kinds={"python"},
    deps=[invoice_drafts],
)
def invoices_final(
    context: dg.AssetExecutionContext, gpuledger: GpuledgerSettings
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    """The month's final invoices, numbered and written once (refused before the period
    closes); finalizing a period again changes nothing."""
    run = finalize_period(gpuledger.settings(), period_of_key(context.partition_key))
    return dg.MaterializeResult(metadata=run_metadata(run))
