"""Materialize a billing period's invoices in one in-process Dagster run.

`materialize_invoices(settings, "2026-05")` runs `invoice_drafts` for the month's
partition with its three checks; `finalize=True` adds `invoices_final` (and its checks)
to the same run, after the drafts' blocking checks: drafts that fail a check are not
finalized. Both then rebuild the period's tenant efficiency mart (dbt) and publish a
new analysts' snapshot, as the invoice jobs do. `check_invoices` runs only the checks,
on what the invoice store holds now (a draft run would rewrite the drafts it checks).

Like `pipelines.materialize`: no DAGSTER_HOME needed, nothing printed, a failing check
is a result (`PipelineRunResult.failed_checks`), and an asset that fails raises its own
error class again (an `InputError` for a period that has not closed, say).
"""

from __future__ import annotations

import dagster as dg

from pipelines.defs.allocation.resources import dbt_resource
from pipelines.defs.billing.assets import invoice_drafts, invoices_final, month_partition_key
from pipelines.defs.billing.checks import DRAFT_CHECKS, FINAL_CHECKS
from pipelines.defs.efficiency.assets import analytics_period_snapshot, efficiency_period_models
from pipelines.materialize import (
    _QUIET,
    PipelineRunResult,
    SettingsSource,
    _gpuledger_resource,
    run_summary,
)

__all__ = ["BILLING_ASSETS", "BILLING_CHECKS", "check_invoices", "materialize_invoices"]

BILLING_ASSETS = (invoice_drafts, invoices_final)
#: What the invoice jobs run after the invoices (pipelines/defs/efficiency).
AFTER_INVOICES = (efficiency_period_models, analytics_period_snapshot)
BILLING_CHECKS = (*DRAFT_CHECKS, *FINAL_CHECKS)
PARTITION_TAG = "dagster/partition"


def _run(
    settings_or_config: SettingsSource,
    period: str,
    *,
    selection: dg.AssetSelection,
    instance: dg.DagsterInstance | None,
) -> PipelineRunResult:
    key = month_partition_key(period)
    checks_only = not selection.resolve([*BILLING_ASSETS, *AFTER_INVOICES])  # keyed by the tag
    result = dg.materialize(
        [*BILLING_ASSETS, *BILLING_CHECKS, *AFTER_INVOICES],
        run_config=_QUIET,
        instance=instance,
        resources={"gpuledger": _gpuledger_resource(settings_or_config), "dbt": dbt_resource()},
        selection=selection,
        # A run of checks alone has no asset to take the partition's definition from;
        # the partition tag is what `partition_key` would have set.
        partition_key=None if checks_only else key,
        tags={PARTITION_TAG: key} if checks_only else None,
        raise_on_error=False,
    )
    return run_summary(result, (key,))


def materialize_invoices(
    settings_or_config: SettingsSource,
    period: str,
    *,
    finalize: bool = False,
    efficiency: bool = True,
    instance: dg.DagsterInstance | None = None,
) -> PipelineRunResult:
    """Draft `period` (`YYYY-MM`) with the invoice checks; with `finalize`, finalize it
    in the same run (an `InputError` before the period closes). Then, unless
    `efficiency` is False, the period's tenant efficiency mart and a new snapshot."""
    after = AFTER_INVOICES if efficiency else ()
    assets = (*(BILLING_ASSETS if finalize else (invoice_drafts,)), *after)
    return _run(
        settings_or_config,
        period,
        selection=dg.AssetSelection.assets(*assets),
        instance=instance,
    )


def check_invoices(
    settings_or_config: SettingsSource,
    period: str,
    *,
    final: bool = False,
    instance: dg.DagsterInstance | None = None,
) -> PipelineRunResult:
    """Only the invoice checks of `period` (on `invoice_drafts`, or `invoices_final` with
    `final`), against the store as it is; nothing is drafted or finalized."""
    asset = invoices_final if final else invoice_drafts
    return _run(
        settings_or_config,
        period,
        selection=dg.AssetSelection.checks_for_assets(asset),
        instance=instance,
    )
