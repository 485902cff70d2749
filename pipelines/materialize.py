"""Materialize gpuledger's hourly assets for a window, in one in-process Dagster run.

`materialize_ingest(settings, start, end)` runs `usage_events_raw` and
`gpu_telemetry_raw` (with their checks), `materialize_allocation` the dbt models (with
the dbt tests as checks and `allocation_invariants`), and `materialize_all` both, for
every hour overlapping `[start, end)`, each as a single run: the run carries the
partition range in the `dagster/asset_partition_range_start` / `_end` tags, which is
how Dagster 1.13 itself launches a `BackfillPolicy.single_run()` backfill
(`dg.materialize` takes one `partition_key`, no range). Each asset then sees the whole
window in `context.partition_time_window` and records its materialization on every
partition. `check_ingest` and `check_allocation` run only the checks, on what the lake
and the warehouse hold now.

Each returns a `PipelineRunResult`. It needs no DAGSTER_HOME (an ephemeral instance
unless one is given) and prints nothing: Dagster's console logger is set to CRITICAL,
and the dbt log lines dagster-dbt echoes to stdout are dropped (dbt.log keeps them).

A failing check does not raise: the run's result says which check failed (a failing
blocking check, or a failing dbt test, also marks the run failed). An asset that fails
raises its own error class again (ServiceError, InputError) with the original one-line
message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg

from ingest.settings import Settings
from models.errors import GpuledgerError, InputError, ServiceError
from pipelines.defs.allocation.assets import allocation_models
from pipelines.defs.allocation.checks import allocation_invariants
from pipelines.defs.allocation.resources import dbt_resource
from pipelines.defs.assurance.assets import triton_reconciliation
from pipelines.defs.assurance.checks import triton_counts_match
from pipelines.defs.efficiency.assets import analytics_snapshot
from pipelines.defs.partitions import partition_keys_between, provisional_hours
from pipelines.defs.resources import GpuledgerSettings, KafkaResource, PrometheusResource
from pipelines.defs.telemetry.assets import gpu_telemetry_raw
from pipelines.defs.telemetry.checks import telemetry_coverage_per_gpu
from pipelines.defs.usage.assets import usage_events_raw
from pipelines.defs.usage.checks import usage_duplicate_rate, usage_quarantine_rate

__all__ = [
    "ALLOCATION_ASSETS",
    "ALLOCATION_CHECKS",
    "INGEST_ASSETS",
    "INGEST_CHECKS",
    "PARTITION_RANGE_END_TAG",
    "PARTITION_RANGE_START_TAG",
    "CheckOutcome",
    "IngestRunError",
    "IngestRunResult",
    "PipelineRunError",
    "PipelineRunResult",
    "check_allocation",
    "check_ingest",
    "materialize_all",
    "materialize_allocation",
    "materialize_ingest",
    "run_summary",
]

#: The tags of a single run over a partition range (dagster._core.storage.tags).
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"

INGEST_ASSETS = (usage_events_raw, gpu_telemetry_raw)
INGEST_CHECKS = (usage_duplicate_rate, usage_quarantine_rate, telemetry_coverage_per_gpu)
#: The dbt models (their dbt tests are checks of the same definition), then the
#: analysts' snapshot of what they changed.
ALLOCATION_ASSETS = (allocation_models, analytics_snapshot)
ALLOCATION_CHECKS = (allocation_invariants,)

_QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}

#: Step failures that are check results, not asset errors: a blocking check that
#: failed, and dbt tests that failed (each is a check result of its own).
_CHECK_FAILURES = frozenset({"DagsterAssetCheckFailedError", "DbtTestsFailed"})

SettingsSource = Settings | GpuledgerSettings | str | Path | None


class PipelineRunError(GpuledgerError):
    """An asset failed with an error that is not one of gpuledger's own."""

    exit_code = 3


#: The name this error had when only ingest ran here.
IngestRunError = PipelineRunError


@dataclass(frozen=True)
class CheckOutcome:
    asset: str
    name: str
    passed: bool
    severity: str  # "WARN" or "ERROR"
    description: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class PipelineRunResult:
    """What one run did: per asset, per partition key, the materialization metadata
    (plain values), and every check's outcome."""

    run_id: str
    success: bool
    partition_keys: tuple[str, ...]
    materializations: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    checks: tuple[CheckOutcome, ...] = ()

    @property
    def failed_checks(self) -> tuple[CheckOutcome, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def check(self, name: str) -> CheckOutcome:
        for outcome in self.checks:
            if outcome.name == name:
                return outcome
        raise KeyError(f"no result for check {name!r} in run {self.run_id}")

    def metadata(self, asset: str, partition_key: str) -> dict[str, Any]:
        return self.materializations[asset][partition_key]


#: The name this result had when only ingest ran here.
IngestRunResult = PipelineRunResult


def _gpuledger_resource(settings_or_config: SettingsSource) -> GpuledgerSettings:
    if isinstance(settings_or_config, Settings):
        return GpuledgerSettings.pinned(settings_or_config)
    if isinstance(settings_or_config, GpuledgerSettings):
        return settings_or_config
    if isinstance(settings_or_config, str | Path):
        return GpuledgerSettings(config_file=str(settings_or_config))
    if settings_or_config is None:
        return GpuledgerSettings()
    raise InputError(
        "materialize: settings_or_config must be Settings, GpuledgerSettings, "
        f"a config file path or None, got {type(settings_or_config).__name__}"
    )


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, dg.MetadataValue) else value


def _raise_asset_failures(result: dg.ExecuteInProcessResult) -> None:
    """Raise the first asset step failure again (check failures are results, not errors)."""
    for event in result.all_events:
        if not event.is_step_failure or event.step_failure_data is None:
            continue
        error = event.step_failure_data.error
        if error is None or error.cls_name in _CHECK_FAILURES:
            continue
        cause = error.cause or error
        if cause.cls_name in _CHECK_FAILURES:
            continue
        message = cause.message.strip()
        prefix = f"{cause.cls_name}: "
        short = message.split(prefix, 1)[1] if prefix in message else message
        known: dict[str, type[GpuledgerError]] = {
            "ServiceError": ServiceError,
            "InputError": InputError,
        }
        if cause.cls_name in known:
            raise known[cause.cls_name](short)
        raise PipelineRunError(f"{event.step_key}: {cause.cls_name}: {short}")


def _run(
    settings_or_config: SettingsSource,
    start: datetime,
    end: datetime,
    *,
    definitions: Sequence[Any],
    instance: dg.DagsterInstance | None,
    selection: dg.AssetSelection | None,
    run_config: Mapping[str, Any] | None,
    provisional: bool = False,
) -> PipelineRunResult:
    keys = partition_keys_between(start, end, open_hour=provisional)
    resources = {
        "gpuledger": _gpuledger_resource(settings_or_config),
        "kafka": KafkaResource(),
        "prometheus": PrometheusResource(),
        "dbt": dbt_resource(),
    }
    config: dict[str, Any] = {**_QUIET, **(run_config or {})}
    # dagster-dbt echoes every dbt log line to stdout (for a deployment's compute logs);
    # here dbt's own log file (<state_dir>/dbt-target/dbt.log) keeps them instead.
    hours = provisional_hours() if provisional else contextlib.nullcontext()
    with (
        hours,
        Path(os.devnull).open("w") as devnull,
        contextlib.redirect_stdout(devnull),
    ):
        result = dg.materialize(
            definitions,
            run_config=config,
            instance=instance,
            resources=resources,
            selection=selection,
            raise_on_error=False,
            tags={PARTITION_RANGE_START_TAG: keys[0], PARTITION_RANGE_END_TAG: keys[-1]},
        )
    return run_summary(result, keys)


_INGEST = (*INGEST_ASSETS, *INGEST_CHECKS)
_ALLOCATION = (*ALLOCATION_ASSETS, *ALLOCATION_CHECKS)
_ASSURANCE = (triton_reconciliation, triton_counts_match)


def materialize_ingest(
    settings_or_config: SettingsSource,
    start: datetime,
    end: datetime,
    *,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
    provisional: bool = False,
) -> PipelineRunResult:
    """Materialize both ingest assets, with their checks, for the hours overlapping
    `[start, end)`, in one run.

    `settings_or_config`: a `Settings` (used as is), a `GpuledgerSettings` resource, a
    TOML config file, or None (GPULEDGER_* environment and ./gpuledger.toml, as the CLI).
    `run_config` adds to the run's config (e.g. `{"ops": {"usage_events_raw": {"config":
    {"consume": False}}}}`). Every hour must have ended, unless `provisional`: then the
    hour in progress may be included (what has arrived so far; the run after the hour
    ends replaces it).
    """
    return _run(
        settings_or_config,
        start,
        end,
        definitions=_INGEST,
        instance=instance,
        selection=None,
        run_config=run_config,
        provisional=provisional,
    )


def check_ingest(
    settings_or_config: SettingsSource,
    start: datetime,
    end: datetime,
    *,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> PipelineRunResult:
    """Run only the ingest checks for the hours overlapping `[start, end)` (one run),
    against what the lake holds now; nothing is materialized."""
    return _run(
        settings_or_config,
        start,
        end,
        definitions=_INGEST,
        instance=instance,
        selection=dg.AssetSelection.checks(*INGEST_CHECKS),
        run_config=run_config,
    )


def materialize_allocation(
    settings_or_config: SettingsSource,
    start: datetime,
    end: datetime,
    *,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
    provisional: bool = False,
) -> PipelineRunResult:
    """`dbt build` of the allocation models for the hours overlapping `[start, end)`,
    with the dbt tests and `allocation_invariants`, in one run, on what the lake holds
    now (ingest is not run). Re-running a window replaces its rows."""
    return _run(
        settings_or_config,
        start,
        end,
        definitions=_ALLOCATION,
        instance=instance,
        selection=None,
        run_config=run_config,
        provisional=provisional,
    )


def materialize_assurance(
    settings_or_config: SettingsSource,
    start: datetime,
    end: datetime,
    *,
    instance: dg.DagsterInstance | None = None,
    provisional: bool = False,
) -> PipelineRunResult:
    """Reconcile the hours overlapping `[start, end)` against Triton's counters
    (`triton_reconciliation` and its check `triton_counts_match`), on the usage the lake
    holds now (ingest is not run)."""
    return _run(
        settings_or_config,
        start,
        end,
        definitions=_ASSURANCE,
        instance=instance,
        selection=None,
        run_config=None,
        provisional=provisional,
    )


def check_allocation(
    settings_or_config: SettingsSource,
    start: datetime,
    end: datetime,
    *,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> PipelineRunResult:
    """Run only the allocation checks (the dbt tests, then `allocation_invariants`) for
    the hours overlapping `[start, end)`, against what the marts hold now; no model is
    rebuilt."""
    return _run(
        settings_or_config,
        start,
        end,
        definitions=_ALLOCATION,
        instance=instance,
        selection=dg.AssetSelection.checks_for_assets(*ALLOCATION_ASSETS),
        run_config=run_config,
    )


def materialize_all(
    settings_or_config: SettingsSource,
    start: datetime,
    end: datetime,
    *,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> PipelineRunResult:
    """Ingest, then allocation, for the hours overlapping `[start, end)`, in one run:
    the dbt models wait for both ingest assets, and a failing blocking ingest check
    (usage_quarantine_rate) stops them."""
    return _run(
        settings_or_config,
        start,
        end,
        definitions=(*_INGEST, *_ALLOCATION),
        instance=instance,
        selection=None,
        run_config=run_config,
    )


def run_summary(
    result: dg.ExecuteInProcessResult, partition_keys: Sequence[str]
) -> PipelineRunResult:
    """What a finished in-process run produced: its materializations' and checks'
    metadata as plain values. An asset that failed raises its own error class again."""
    _raise_asset_failures(result)
    materializations: dict[str, dict[str, dict[str, Any]]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        asset = materialization.asset_key.to_user_string()
        partition = materialization.partition or ""
        materializations.setdefault(asset, {})[partition] = {
            name: _plain(value) for name, value in materialization.metadata.items()
        }
    checks = tuple(
        CheckOutcome(
            asset=evaluation.asset_key.to_user_string(),
            name=evaluation.check_name,
            passed=evaluation.passed,
            severity=evaluation.severity.value,
            description=evaluation.description,
            metadata={name: _plain(value) for name, value in evaluation.metadata.items()},
        )
        for evaluation in result.get_asset_check_evaluations()
    )
    return PipelineRunResult(
        run_id=result.run_id,
        success=result.success,
        partition_keys=tuple(partition_keys),
        materializations=materializations,
        checks=checks,
    )
