"""`allocation_models`: the dbt project (staging, intermediate, marts) as hourly assets.

One `@dbt_assets` multi-asset over the manifest, on the ingest domains' hourly
partitions, backfilled as one run. A run passes its window (one hour, or a single-run
backfill's range) to dbt as `--vars` (`pipelines.allocation.dbt_vars`: the window plus
the allocation method's configuration) and runs `dbt build`, so the incremental models
replace the window's rows and every dbt data test reports as an asset check on the
model it tests. The raw sources carry `meta.dagster.asset_key`, which makes every
model downstream of `usage_events_raw` and `gpu_telemetry_raw`, hour by hour.

dbt runs in a child process (dagster-dbt's `DbtCliResource`) on the warehouse named
by the run's settings. A model that errors, or a dbt unit test that fails, fails the
step with a ServiceError naming it; failing dbt data tests are check results (blocking
when their severity is error: dbt has already skipped what depends on them) and fail
the step afterwards with `DbtTestsFailed`, so `allocation_invariants` does not run on
models that failed their own tests.
"""

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DagsterDbtTranslatorSettings, dbt_assets

from ingest.catalog import prepare_dbt_inputs
from ingest.settings import Settings
from models.errors import ServiceError
from pipelines.allocation import HOURLY_SELECTION, MONTHLY_TAG, dbt_build_args, dbt_vars
from pipelines.defs.allocation.resources import (
    DBT_PROJECT,
    GpuledgerDbtResource,
    prepare_manifest,
)
from pipelines.defs.partitions import HOURLY_PARTITIONS, run_window
from pipelines.defs.resources import GpuledgerSettings

__all__ = [
    "ALLOCATION_GROUP",
    "AllocationTranslator",
    "DbtTestsFailed",
    "allocation_models",
    "dbt_build",
    "dbt_failures",
]

ALLOCATION_GROUP = "allocation"

#: dbt colours parts of its messages (a unit test's "actual differs from expected").
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DbtTestsFailed(Exception):
    """dbt data tests failed (their check results say which); the models they guard
    were skipped by dbt."""


class AllocationTranslator(DagsterDbtTranslator):
    """dagster-dbt's defaults (model name as asset key, source `meta.dagster.asset_key`,
    dbt tests as asset checks), every model in the `allocation` group."""

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        del dbt_resource_props
        return ALLOCATION_GROUP


TRANSLATOR = AllocationTranslator(DagsterDbtTranslatorSettings(enable_asset_checks=True))


def dbt_failures(run_results: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(nodes that errored or unit tests that failed, data tests that failed) from a
    run_results.json document."""
    errors: list[str] = []
    failed_tests: list[str] = []
    for item in run_results.get("results", []):
        unique_id = str(item.get("unique_id", ""))
        status = str(item.get("status"))
        kind = unique_id.split(".", 1)[0]
        message = _ANSI.sub("", item.get("message") or "").strip().splitlines()
        detail = f"{unique_id}: {message[0] if message else status}"
        if kind == "test" and status in {"fail", "error"}:
            failed_tests.append(detail)
        elif status == "error" or (kind == "unit_test" and status == "fail"):
            # A unit test has no asset check: its model's logic is wrong, an error.
            errors.append(detail)
    return errors, failed_tests


def _window(context: dg.AssetExecutionContext) -> tuple[datetime, datetime]:
    window = run_window(context)
    if window is None:  # the asset is partitioned: Dagster never runs it without a key
        raise ServiceError("allocation_models: the run has no partition key or range")
    return window


with warnings.catch_warnings():
    # backfill_policy is beta in Dagster 1.13 (see partitions.hourly_asset).
    warnings.simplefilter("ignore", dg.BetaWarning)

    @dbt_assets(
        manifest=prepare_manifest(),
        project=DBT_PROJECT,
        name="allocation_models",
        # The monthly models read the period's invoices: pipelines/defs/efficiency.
        exclude=f"tag:{MONTHLY_TAG}",
        partitions_def=HOURLY_PARTITIONS,
        backfill_policy=dg.BackfillPolicy.single_run(),
        dagster_dbt_translator=TRANSLATOR,
    )
    def allocation_models(
        context: dg.AssetExecutionContext,
        dbt: GpuledgerDbtResource,
        gpuledger: GpuledgerSettings,
    ) -> Iterator[Any]:
        """`dbt build` of the selected models and their tests for the run's window."""
        settings = gpuledger.settings()
        start, end = _window(context)
        yield from dbt_build(context, dbt, settings, start, end)


def dbt_build(
    context: dg.AssetExecutionContext,
    dbt: GpuledgerDbtResource,
    settings: Settings,
    start: datetime,
    end: datetime,
    *,
    selection: Sequence[str] = HOURLY_SELECTION,
) -> Iterator[Any]:
    """`dbt build` of the context's selected models and their tests for [start, end):
    events streamed to Dagster, failures raised as described in the module doc."""
    variables = dbt_vars(settings, start, end)
    prepare_dbt_inputs(settings)  # the raw views and reference data dbt's sources read
    context.log.info(f"dbt build for [{start.isoformat()}, {end.isoformat()})")
    invocation = dbt.cli_on(
        settings, dbt_build_args(variables, selection=selection), context=context
    )
    yield from invocation.stream()
    try:
        run_results = invocation.get_artifact("run_results.json")
    except FileNotFoundError:
        run_results = {}
    errors, failed_tests = dbt_failures(run_results)
    if not run_results and not invocation.is_successful():
        lines = str(invocation.get_error() or "").strip().splitlines()
        raise ServiceError(f"dbt build failed: {lines[-1] if lines else 'no run results'}")
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ServiceError(f"dbt build failed: {errors[0]}{more}")
    if failed_tests:
        raise DbtTestsFailed(
            f"{len(failed_tests)} dbt tests failed: " + "; ".join(failed_tests[:5])
        )
