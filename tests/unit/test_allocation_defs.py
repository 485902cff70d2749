"""The pure pieces around the allocation assets: which hour a schedule tick allocates,
how a dbt run's results become errors or check failures, the invariants' metadata,
and when the dbt manifest is parsed again."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from ingest.settings import Settings
from pipelines.allocation import InvariantReport, dbt_build_args
from pipelines.defs.allocation.assets import allocation_models, dbt_failures
from pipelines.defs.allocation.checks import (
    MAX_LISTED,
    describe_invariants,
    invariant_metadata,
)
from pipelines.defs.allocation.resources import _environment, manifest_is_stale
from pipelines.defs.allocation.schedules import allocation_hour_due, allocation_hourly_schedule
from pipelines.defs.resources import GpuledgerSettings
from pipelines.defs.usage.schedules import hour_due

DAY = datetime(2026, 11, 24, tzinfo=UTC)


def isolated(tmp_path: Path, **overrides: object) -> Settings:
    from tests.conftest import build_settings

    return build_settings(tmp_path / "state", **overrides)


@pytest.mark.parametrize(
    ("tick", "watermark_s", "hour"),
    [
        (timedelta(hours=10, minutes=40), 900, 8),  # usage built 09:00 at 10:20
        (timedelta(hours=10, minutes=40), 1800, 7),  # usage built 08:00 at 10:20
        (timedelta(hours=10, minutes=40), 0, 8),
        (timedelta(hours=10, minutes=19), 900, 7),  # before this hour's usage tick
    ],
)
def test_a_tick_allocates_the_hour_before_the_one_the_usage_schedule_built_last(
    tick: timedelta, watermark_s: float, hour: int
) -> None:
    at = DAY + tick
    due = allocation_hour_due(at, watermark_s)
    assert due == DAY + timedelta(hours=hour)
    last_usage_tick = at.replace(minute=20) - timedelta(hours=1 if at.minute < 20 else 0)
    # One hour before it: that hour's last slices end in the next hour's telemetry,
    # pulled at minute 5 of the hour after.
    assert due == hour_due(last_usage_tick, watermark_s) - timedelta(hours=1)


def test_an_allocation_tick_reads_the_watermark_from_the_settings(tmp_path: Path) -> None:
    settings = isolated(tmp_path, ingest={"lateness_watermark_s": 1800})
    context = dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 24, 10, 40, tzinfo=UTC),
        resources={"gpuledger": GpuledgerSettings.pinned(settings)},
    )
    request = allocation_hourly_schedule(context)
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == "2026-11-24-07:00"
    assert request.run_key == "allocation-hour:2026-11-24-07:00"


def test_the_dbt_models_depend_on_the_ingest_assets() -> None:
    deps = {
        key.to_user_string(): {d.to_user_string() for d in deps}
        for key, deps in allocation_models.asset_deps.items()
    }
    assert "usage_events_raw" in deps["staging/stg_usage__events"]
    assert "gpu_telemetry_raw" in deps["staging/stg_telemetry__samples"]
    assert allocation_models.group_names_by_key[dg.AssetKey(["marts", "fct_gpu_hourly"])] == (
        "allocation"
    )


def test_the_build_passes_the_window_as_vars() -> None:
    args = dbt_build_args({"min_hour": "2026-11-24T00:00:00+00:00", "idle_policy": "share"})
    assert args[:2] == ["build", "--vars"]
    assert json.loads(args[2]) == {
        "min_hour": "2026-11-24T00:00:00+00:00",
        "idle_policy": "share",
    }


def test_run_results_split_into_errors_and_failed_data_tests() -> None:
    results = {
        "results": [
            {"unique_id": "model.gpuledger.fct_gpu_hourly", "status": "success"},
            {"unique_id": "model.gpuledger.int_x", "status": "error", "message": "Binder Error\n…"},
            {"unique_id": "model.gpuledger.int_y", "status": "skipped"},
            {"unique_id": "test.gpuledger.not_null_x", "status": "fail", "message": "Got 3"},
            {"unique_id": "test.gpuledger.unique_x", "status": "warn", "message": "Got 1"},
            {
                "unique_id": "unit_test.gpuledger.int_x.case",
                "status": "fail",
                "message": "\x1b[32mactual\x1b[0m differs from \x1b[31mexpected\x1b[0m:\n…",
            },
            {"unique_id": "unit_test.gpuledger.int_z.case", "status": "pass"},
        ]
    }
    errors, failed = dbt_failures(results)
    assert errors == [
        "model.gpuledger.int_x: Binder Error",
        "unit_test.gpuledger.int_x.case: actual differs from expected:",
    ]
    assert failed == ["test.gpuledger.not_null_x: Got 3"]  # a WARN test fails nothing
    assert dbt_failures({}) == ([], [])


def test_invariant_metadata_lists_failing_rows_up_to_a_cap() -> None:
    start = DAY
    end = DAY + timedelta(hours=2)
    ok = InvariantReport(
        gpu_hours=8,
        event_hours=2,
        requests=100,
        max_energy_relative_error=1e-15,
        max_time_relative_error=2e-16,
    )
    metadata = invariant_metadata(ok, start, end)
    assert metadata["energy_failures"] == metadata["token_failures"] == 0
    assert "energy_not_closing" not in metadata
    assert metadata["max_energy_relative_error"] == 1e-15
    assert describe_invariants(ok).startswith("energy and time close on 8 GPU-hours")
    rows = [f"node/gpu-{i} 2026-11-24 00:00: …" for i in range(MAX_LISTED + 5)]
    bad = InvariantReport(gpu_hours=8, event_hours=2, requests=100, energy_failures=rows)
    metadata = invariant_metadata(bad, start, end)
    assert metadata["energy_failures"] == MAX_LISTED + 5
    assert metadata["energy_not_closing"] == rows[:MAX_LISTED]
    assert describe_invariants(bad).startswith(
        f"energy does not close on {MAX_LISTED + 5} GPU-hours (first: node/gpu-0"
    )


def test_a_manifest_older_than_a_project_file_is_stale(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    assert manifest_is_stale(manifest)  # missing
    manifest.write_text("{}")
    os.utime(manifest, (0, 0))
    assert manifest_is_stale(manifest)
    future = datetime(2100, 1, 1, tzinfo=UTC).timestamp()
    os.utime(manifest, (future, future))
    assert not manifest_is_stale(manifest)


def test_the_dbt_environment_is_restored_after_the_child_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPULEDGER_TEST_KEPT", "before")
    monkeypatch.delenv("GPULEDGER_TEST_ADDED", raising=False)
    with _environment({"GPULEDGER_TEST_KEPT": "during", "GPULEDGER_TEST_ADDED": "x"}):
        assert os.environ["GPULEDGER_TEST_KEPT"] == "during"
        assert os.environ["GPULEDGER_TEST_ADDED"] == "x"
    assert os.environ["GPULEDGER_TEST_KEPT"] == "before"
    assert "GPULEDGER_TEST_ADDED" not in os.environ
