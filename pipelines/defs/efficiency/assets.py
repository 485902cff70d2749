"""Efficiency marts and the analysts' snapshots as assets.

- `efficiency_period_models`: the dbt models tagged `monthly` (mart_tenant_efficiency)
  on the billing periods' partitions. They read the period's invoices (the raw
  `invoice_revenue` source is the `invoice_drafts` asset), so they run after them in
  the invoice jobs. The hourly efficiency marts (mart_efficiency_hourly,
  mart_fleet_daily, mart_data_quality) are part of `allocation_models`.
- `analytics_snapshot` (hourly) and `analytics_period_snapshot` (monthly) publish what
  their run changed to the analysts' catalog (`pipelines.analytics.publish`): a new,
  consistent snapshot that readers pick up on their next connection.
"""

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslatorSettings, dbt_assets

from pipelines.allocation import MONTHLY_TAG
from pipelines.analytics.publish import PUBLISHED_TABLES, PublishReport, publish
from pipelines.billing.usage import period_window
from pipelines.defs.allocation.assets import AllocationTranslator, dbt_build
from pipelines.defs.allocation.resources import (
    DBT_PROJECT,
    GpuledgerDbtResource,
    prepare_manifest,
)
from pipelines.defs.billing.assets import (
    MONTHLY_BACKFILL,
    MONTHLY_PARTITIONS,
    monthly_asset,
    period_of_key,
)
from pipelines.defs.partitions import hourly_asset, run_window
from pipelines.defs.resources import GpuledgerSettings

__all__ = [
    "EFFICIENCY_GROUP",
    "analytics_period_snapshot",
    "analytics_snapshot",
    "efficiency_period_models",
    "publish_metadata",
]

EFFICIENCY_GROUP = "efficiency"


class EfficiencyTranslator(AllocationTranslator):
    """As the allocation's (dbt tests as asset checks), in the `efficiency` group."""

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        del dbt_resource_props
        return EFFICIENCY_GROUP


_TRANSLATOR = EfficiencyTranslator(DagsterDbtTranslatorSettings(enable_asset_checks=True))
#: The hourly runs' marts. The invoice index changes only in invoice runs, which
#: publish it (reading every invoice document) with the monthly tables.
_HOURLY_TABLES = [t.name for t in PUBLISHED_TABLES if not t.monthly and t.source == "warehouse"]
_MONTHLY_TABLES = [t.name for t in PUBLISHED_TABLES if t.monthly or t.source == "invoices"]


def _mart(name: str) -> dg.AssetKey:
    return dg.AssetKey(["marts", name])


def _period_window(context: dg.AssetExecutionContext) -> tuple[Any, Any]:
    keys = context.partition_key_range
    start, _ = period_window(period_of_key(keys.start))
    _, end = period_window(period_of_key(keys.end))
    return start, end


with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)

    @dbt_assets(
        manifest=prepare_manifest(),
        project=DBT_PROJECT,
        name="efficiency_period_models",
        select=f"tag:{MONTHLY_TAG}",
        partitions_def=MONTHLY_PARTITIONS,
        backfill_policy=MONTHLY_BACKFILL,
        dagster_dbt_translator=_TRANSLATOR,
    )
    def efficiency_period_models(
        context: dg.AssetExecutionContext,
        dbt: GpuledgerDbtResource,
        gpuledger: GpuledgerSettings,
    ) -> Iterator[Any]:
        """`dbt build` of the monthly models and their tests for the run's billing periods."""
        start, end = _period_window(context)
        yield from dbt_build(context, dbt, gpuledger.settings(), start, end, selection=())


def publish_metadata(report: PublishReport) -> dict[str, Any]:
    return {
        "snapshot_id": report.snapshot_id,
        "catalog": dg.MetadataValue.path(str(report.catalog)),
        "rows": dg.MetadataValue.json(report.rows),
        "partitions_rewritten": dg.MetadataValue.json(report.rewritten),
        "missing_tables": report.missing,
        "files_removed": report.removed_files,
        "seconds": round(report.seconds, 2),
    }


@hourly_asset(
    group_name=EFFICIENCY_GROUP,
    kinds={"duckdb", "parquet"},
    deps=[_mart(name) for name in _HOURLY_TABLES],
)
def analytics_snapshot(
    context: dg.AssetExecutionContext, gpuledger: GpuledgerSettings
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    """Publish the hourly marts of the run's hours (the UTC days they touch) as a new
    snapshot of the analysts' catalog (the other tables carry over unchanged)."""
    window = run_window(context)
    assert window is not None  # partitioned: Dagster always gives a key or range
    report = publish(gpuledger.settings(), *window, tables=_HOURLY_TABLES)
    if report.missing:
        context.log.warning(f"not in the warehouse yet: {', '.join(report.missing)}")
    return dg.MaterializeResult(metadata=publish_metadata(report))


@monthly_asset(
    group_name=EFFICIENCY_GROUP,
    kinds={"duckdb", "parquet"},
    deps=[_mart("mart_tenant_efficiency"), "invoices_final"],
)
def analytics_period_snapshot(
    context: dg.AssetExecutionContext, gpuledger: GpuledgerSettings
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    """Publish the run's billing periods of mart_tenant_efficiency and the invoice index
    as a new snapshot of the analysts' catalog."""
    report = publish(gpuledger.settings(), *_period_window(context), tables=_MONTHLY_TABLES)
    return dg.MaterializeResult(metadata=publish_metadata(report))
