"""Materialize the ingest assets for a window, in one in-process Dagster run.

`materialize_ingest(settings, start, end)` runs `usage_events_raw` and
`gpu_telemetry_raw` (with their checks) for every hour overlapping `[start, end)` as a
single run: the run carries the partition range in the
`dagster/asset_partition_range_start` / `_end` tags, which is how Dagster 1.13 itself
launches a `BackfillPolicy.single_run()` backfill (`dg.materialize` takes one
`partition_key`, no range). Each asset then sees the whole window in
`context.partition_time_window` and records per-hour metadata on each partition.

It needs no DAGSTER_HOME (an ephemeral instance unless one is given) and prints
nothing: Dagster's console logger is set to CRITICAL for the run.

A failing check does not raise: the run's result says which check failed (a failing
blocking check also marks the run failed). An asset that fails raises its own error
class again (ServiceError, InputError) with the original one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg

from ingest.settings import Settings
from models.errors import GpuledgerError, InputError, ServiceError
from pipelines.defs.partitions import partition_keys_between
from pipelines.defs.resources import GpuledgerSettings, KafkaResource, PrometheusResource
from pipelines.defs.telemetry.assets import gpu_telemetry_raw
from pipelines.defs.telemetry.checks import telemetry_coverage_per_gpu
from pipelines.defs.usage.assets import usage_events_raw
from pipelines.defs.usage.checks import usage_duplicate_rate, usage_quarantine_rate

__all__ = [
    "INGEST_ASSETS",
    "INGEST_CHECKS",
    "PARTITION_RANGE_END_TAG",
    "PARTITION_RANGE_START_TAG",
    "CheckOutcome",
    "IngestRunError",
    "IngestRunResult",
    "check_ingest",
    "materialize_ingest",
]

#: The tags of a single run over a partition range (dagster._core.storage.tags).
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"

INGEST_ASSETS = (usage_events_raw, gpu_telemetry_raw)
INGEST_CHECKS = (usage_duplicate_rate, usage_quarantine_rate, telemetry_coverage_per_gpu)

_QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


class IngestRunError(GpuledgerError):
    """An ingest asset failed with an error that is not one of gpuledger's own."""

    exit_code = 3


@dataclass(frozen=True)
class CheckOutcome:
    asset: str
    name: str
    passed: bool
    severity: str  # "WARN" or "ERROR"
    description: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class IngestRunResult:
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


def _gpuledger_resource(
    settings_or_config: Settings | GpuledgerSettings | str | Path | None,
) -> GpuledgerSettings:
    if isinstance(settings_or_config, Settings):
        return GpuledgerSettings.pinned(settings_or_config)
    if isinstance(settings_or_config, GpuledgerSettings):
        return settings_or_config
    if isinstance(settings_or_config, str | Path):
        return GpuledgerSettings(config_file=str(settings_or_config))
    if settings_or_config is None:
        return GpuledgerSettings()
    raise InputError(
        "materialize_ingest: settings_or_config must be Settings, GpuledgerSettings, "
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
        if error is None or error.cls_name == "DagsterAssetCheckFailedError":
            continue
        cause = error.cause or error
        message = cause.message.strip()
        prefix = f"{cause.cls_name}: "
        short = message.split(prefix, 1)[1] if prefix in message else message
        known: dict[str, type[GpuledgerError]] = {
            "ServiceError": ServiceError,
            "InputError": InputError,
        }
        if cause.cls_name in known:
            raise known[cause.cls_name](short)
        raise IngestRunError(f"{event.step_key}: {cause.cls_name}: {short}")


def _run(
    settings_or_config: Settings | GpuledgerSettings | str | Path | None,
    start: datetime,
    end: datetime,
    *,
    instance: dg.DagsterInstance | None,
    selection: dg.AssetSelection | None,
    run_config: Mapping[str, Any] | None,
) -> IngestRunResult:
    keys = partition_keys_between(start, end)
    resources = {
        "gpuledger": _gpuledger_resource(settings_or_config),
        "kafka": KafkaResource(),
        "prometheus": PrometheusResource(),
    }
    config: dict[str, Any] = {**_QUIET, **(run_config or {})}
    result = dg.materialize(
        [*INGEST_ASSETS, *INGEST_CHECKS],
        run_config=config,
        instance=instance,
        resources=resources,
        selection=selection,
        raise_on_error=False,
        tags={PARTITION_RANGE_START_TAG: keys[0], PARTITION_RANGE_END_TAG: keys[-1]},
    )
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
    return IngestRunResult(
        run_id=result.run_id,
        success=result.success,
        partition_keys=tuple(keys),
        materializations=materializations,
        checks=checks,
    )


def materialize_ingest(
    settings_or_config: Settings | GpuledgerSettings | str | Path | None,
    start: datetime,
    end: datetime,
    *,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> IngestRunResult:
    """Materialize both ingest assets, with their checks, for the hours overlapping
    `[start, end)`, in one run.

    `settings_or_config`: a `Settings` (used as is), a `GpuledgerSettings` resource, a
    TOML config file, or None (GPULEDGER_* environment and ./gpuledger.toml, as the CLI).
    `run_config` adds to the run's config (e.g. `{"ops": {"usage_events_raw": {"config":
    {"consume": False}}}}`). Every hour must have ended.
    """
    return _run(
        settings_or_config, start, end, instance=instance, selection=None, run_config=run_config
    )


def check_ingest(
    settings_or_config: Settings | GpuledgerSettings | str | Path | None,
    start: datetime,
    end: datetime,
    *,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> IngestRunResult:
    """Run only the ingest checks for the hours overlapping `[start, end)` (one run),
    against what the lake holds now; nothing is materialized."""
    return _run(
        settings_or_config,
        start,
        end,
        instance=instance,
        selection=dg.AssetSelection.checks(*INGEST_CHECKS),
        run_config=run_config,
    )
