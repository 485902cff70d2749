"""Checks on the invoice assets: thin wrappers around `pipelines.billing.checks`.

The same three checks on `invoice_drafts` and on `invoices_final`, each over the run's
billing period (every period of a partition range; the newest period with documents
when launched without a partition):

- `invoice_lines_sum_to_totals` (ERROR, blocking): lines add up to the total in every
  document of the period, in invoice.json, lines.csv and both FOCUS files.
- `invoice_tokens_billed` (blocking): the period's usage tokens per tenant are billed
  by its documents and adjustments; ERROR on a mismatch, WARN when the only
  differences are late usage pending on (or awaiting) a later draft. Blocking stops
  only on ERROR, so pending late usage never holds up a finalize.
- `invoice_tenant_isolation` (ERROR, blocking): every file in a tenant's directories
  holds that tenant only.

Blocking on `invoice_drafts`: a run that drafts and finalizes does not finalize drafts
that fail. The metadata lists the first `MAX_LISTED` problems; the counts are whole.
"""

from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg

from ingest.settings import Settings
from pipelines.billing.checks import (
    IsolationReport,
    SumsReport,
    TokensReport,
    lines_sum_to_totals,
    tenant_isolation,
    tokens_billed,
)
from pipelines.billing.store import InvoiceStore
from pipelines.defs.billing.assets import (
    MONTHLY_PARTITIONS,
    invoice_drafts,
    invoices_final,
    period_of_key,
)
from pipelines.defs.resources import GpuledgerSettings

__all__ = [
    "DRAFT_CHECKS",
    "FINAL_CHECKS",
    "MAX_LISTED",
    "billing_checks",
    "check_periods",
    "isolation_result",
    "sums_result",
    "tokens_result",
]

#: Problems listed in a check's metadata.
MAX_LISTED = 20


def check_periods(context: dg.AssetCheckExecutionContext, settings: Settings) -> list[str]:
    """The billing periods of the run; without a partition, the newest with documents."""
    step = context.op_execution_context.get_step_execution_context()
    if step.has_partitions:
        keys = MONTHLY_PARTITIONS.get_partition_keys_in_range(step.partition_key_range)
        return [period_of_key(key) for key in keys]
    store = InvoiceStore(settings.invoices_path)
    periods = set(store.draft_periods()) | {r.period for r in store.finals()}
    return [max(periods)] if periods else []


def _listed(problems: Sequence[str]) -> dict[str, Any]:
    return {"problems": len(problems), "first_problems": list(problems[:MAX_LISTED])}


def _describe(ok: str, problems: Sequence[str]) -> str:
    if not problems:
        return ok
    return f"{len(problems)} problem(s); first: {problems[0]}"


def sums_result(reports: Sequence[SumsReport]) -> dg.AssetCheckResult:
    problems = [p for r in reports for p in r.problems]
    documents = sum(r.documents for r in reports)
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "periods": [r.period for r in reports],
            "documents": documents,
            "lines": sum(r.lines for r in reports),
            "focus_rows": sum(r.focus_rows for r in reports),
            **_listed(problems),
        },
        description=_describe(
            f"lines add up to the total in {documents} document(s): JSON, CSV, FOCUS",
            problems,
        ),
    )


def tokens_result(reports: Sequence[TokensReport]) -> dg.AssetCheckResult:
    errors = [p for r in reports for p in (*r.problems_reading, *map(str, r.mismatches))]
    pending = [str(d) for r in reports for d in r.pending]
    usage = {k: sum(r.usage_tokens[k] for r in reports) for k in ("prompt", "completion")}
    billed = {k: sum(r.billed_tokens[k] for r in reports) for k in ("prompt", "completion")}
    metadata: dict[str, Any] = {
        "periods": [r.period for r in reports],
        "tenants": sum(r.tenants for r in reports),
        "usage_prompt_tokens": usage["prompt"],
        "usage_completion_tokens": usage["completion"],
        "billed_prompt_tokens": billed["prompt"],
        "billed_completion_tokens": billed["completion"],
        "mismatches": len(errors),
        "first_mismatches": errors[:MAX_LISTED],
        "pending": len(pending),
        "first_pending": pending[:MAX_LISTED],
    }
    if errors:
        description = _describe("", errors)
    elif pending:
        description = f"{len(pending)} pending late-usage difference(s); first: {pending[0]}"
    else:
        description = (
            f"every tenant's tokens are billed: {usage['prompt']} prompt, "
            f"{usage['completion']} completion"
        )
    return dg.AssetCheckResult(
        passed=not (errors or pending),
        severity=dg.AssetCheckSeverity.ERROR if errors else dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        description=description,
    )


def isolation_result(reports: Sequence[IsolationReport]) -> dg.AssetCheckResult:
    problems = [p for r in reports for p in r.problems]
    files = sum(r.files for r in reports)
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "periods": [r.period for r in reports],
            "directories": sum(r.directories for r in reports),
            "files": files,
            "known_tenants": sorted({t for r in reports for t in r.known_tenants}),
            **_listed(problems),
        },
        description=_describe(f"{files} file(s) each hold their own tenant only", problems),
    )


def _no_period() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        description="no billing period to check: the invoice store has no documents",
    )


def _make_check(
    asset: dg.AssetsDefinition,
    name: str,
    description: str,
    run: Callable[[Settings, list[str]], dg.AssetCheckResult],
) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset, name=name, blocking=True, description=description)
    def _check(
        context: dg.AssetCheckExecutionContext, gpuledger: GpuledgerSettings
    ) -> dg.AssetCheckResult:
        settings = gpuledger.settings()
        periods = check_periods(context, settings)
        return run(settings, periods) if periods else _no_period()

    return _check


_CHECKS: tuple[tuple[str, str, Callable[[Settings, list[str]], dg.AssetCheckResult]], ...] = (
    (
        "invoice_lines_sum_to_totals",
        "Lines add up to the total in every document: invoice.json, lines.csv, FOCUS.",
        lambda s, periods: sums_result([lines_sum_to_totals(s, p) for p in periods]),
    ),
    (
        "invoice_tokens_billed",
        "The period's usage tokens are billed per tenant (WARN when only pending).",
        lambda s, periods: tokens_result([tokens_billed(s, p) for p in periods]),
    ),
    (
        "invoice_tenant_isolation",
        "Every file in a tenant's directories holds that tenant only.",
        lambda s, periods: isolation_result([tenant_isolation(s, p) for p in periods]),
    ),
)


def billing_checks(asset: dg.AssetsDefinition) -> list[dg.AssetChecksDefinition]:
    """The three invoice checks on `asset`."""
    return [_make_check(asset, name, description, run) for name, description, run in _CHECKS]


DRAFT_CHECKS = billing_checks(invoice_drafts)
FINAL_CHECKS = billing_checks(invoices_final)
