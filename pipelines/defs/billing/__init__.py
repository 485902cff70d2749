"""Billing domain: monthly invoice drafts and finals, their checks, their schedules."""

import dagster as dg

from pipelines.defs.billing.assets import MONTHLY_PARTITIONS, invoice_drafts, invoices_final
from pipelines.defs.billing.checks import DRAFT_CHECKS, FINAL_CHECKS
from pipelines.defs.billing.schedules import (
    invoice_draft_job,
    invoice_draft_schedule,
    invoice_finalize_job,
    invoice_finalize_schedule,
)

__all__ = [
    "DRAFT_CHECKS",
    "FINAL_CHECKS",
    "MONTHLY_PARTITIONS",
    "definitions",
    "invoice_draft_job",
    "invoice_draft_schedule",
    "invoice_drafts",
    "invoice_finalize_job",
    "invoice_finalize_schedule",
    "invoices_final",
]


def definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[invoice_drafts, invoices_final],
        asset_checks=[*DRAFT_CHECKS, *FINAL_CHECKS],
        jobs=[invoice_draft_job, invoice_finalize_job],
        schedules=[invoice_draft_schedule, invoice_finalize_schedule],
    )
