"""The allocation (dbt models as Dagster assets) against a real broker and Prometheus.

Two simulated hours are delivered to the module's own stack, then ingest and
allocation are materialized for both hours in one run; the allocation alone is then
materialized again and must change nothing. Every dbt test (an asset check of the model
it tests) and `allocation_invariants` must pass; a mart row that claims energy no
request carries, and a billed request that went missing, must fail the invariants and
the run, and re-materializing the window must repair both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from ingest.catalog import connect
from ingest.settings import Settings
from ingest.simulator.run import SimulationResult
from pipelines.cli import main
from pipelines.defs.allocation import allocation_models
from pipelines.defs.partitions import hour_partition_key
from pipelines.materialize import (
    PARTITION_RANGE_END_TAG,
    PARTITION_RANGE_START_TAG,
    PipelineRunResult,
    check_allocation,
    materialize_all,
    materialize_allocation,
)
from tests.conftest import running_stack, simulate_small_fleet

pytestmark = pytest.mark.integration

START = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
END = START + timedelta(hours=2)
SEED = 11
KEYS = [hour_partition_key(START + timedelta(hours=i)) for i in range(2)]
GPUS = 4
DBT_ASSETS = sorted(key.to_user_string() for key in allocation_models.keys)
DBT_CHECKS = sorted(key.name for key in allocation_models.check_keys)
#: An allocation run materializes the dbt models, then publishes the analysts' snapshot.
ALLOCATION_RUN = {*DBT_ASSETS, "analytics_snapshot"}


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_stack(
        tmp_path_factory.mktemp("allocation-assets") / "state",
        kafka={"topic": "gpuledger.usage.v1", "topic_partitions": 2},
        telemetry={"retries": 1, "backoff_s": 0.01},
    ) as settings:
        yield settings


@pytest.fixture(scope="module")
def simulated(own_stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return simulate_small_fleet(
        own_stack,
        tmp_path_factory.mktemp("run"),
        start=START,
        hours=2,
        seed=SEED,
        rate_per_s=0.5,
    )


def mart_totals(settings: Settings) -> dict[str, Any]:
    """Row counts and sums of the marts over the window."""
    params = {"start": START, "end": END}
    with connect(settings) as con:
        gpu = con.execute(
            "select count(*), sum(metered_j), sum(allocated_j), sum(idle_unallocated_j), "
            "sum(occupied_s), sum(idle_s) from marts.fct_gpu_hourly "
            "where hour_start >= $start and hour_start < $end",
            params,
        ).fetchone()
        requests = con.execute(
            "select count(*), sum(prompt_tokens), sum(completion_tokens), sum(energy_j), "
            "sum(occupied_gpu_s) from marts.fct_request_allocation "
            "where event_hour >= $start and event_hour < $end",
            params,
        ).fetchone()
        tenants = con.execute(
            "select count(*), sum(requests), sum(energy_j) from marts.fct_tenant_usage_hourly "
            "where event_hour >= $start and event_hour < $end",
            params,
        ).fetchone()
    assert gpu is not None and requests is not None and tenants is not None
    return {
        "fct_gpu_hourly": [round(v, 6) if isinstance(v, float) else v for v in gpu],
        "fct_request_allocation": [round(v, 6) if isinstance(v, float) else v for v in requests],
        "fct_tenant_usage_hourly": [round(v, 6) if isinstance(v, float) else v for v in tenants],
    }


@dataclass(frozen=True)
class Runs:
    first: PipelineRunResult
    first_totals: dict[str, Any]
    second: PipelineRunResult
    second_totals: dict[str, Any]
    instance: dg.DagsterInstance


@pytest.fixture(scope="module")
def runs(own_stack: Settings, simulated: SimulationResult) -> Runs:
    instance = dg.DagsterInstance.ephemeral()
    first = materialize_all(own_stack, START, END, instance=instance)
    first_totals = mart_totals(own_stack)
    second = materialize_allocation(own_stack, START, END, instance=instance)
    return Runs(first, first_totals, second, mart_totals(own_stack), instance)


def test_one_run_ingests_and_allocates_both_hours(runs: Runs) -> None:
    first = runs.first
    assert first.success, first.failed_checks
    assert first.partition_keys == tuple(KEYS)
    assert [r.run_id for r in runs.instance.get_runs()] == [runs.second.run_id, first.run_id]
    run = runs.instance.get_run_by_id(first.run_id)
    assert run is not None
    assert (run.tags[PARTITION_RANGE_START_TAG], run.tags[PARTITION_RANGE_END_TAG]) == (
        KEYS[0],
        KEYS[-1],
    )
    assert set(first.materializations) == {"usage_events_raw", "gpu_telemetry_raw", *ALLOCATION_RUN}
    for asset, partitions in first.materializations.items():
        assert sorted(partitions) == KEYS, asset
    assert runs.second.success, runs.second.failed_checks
    assert set(runs.second.materializations) == ALLOCATION_RUN  # no ingest this time


def test_every_dbt_test_and_the_invariants_pass(runs: Runs) -> None:
    for result in (runs.first, runs.second):
        names = {c.name for c in result.checks}
        assert set(DBT_CHECKS) <= names
        assert "allocation_invariants" in names
        assert not result.failed_checks, result.failed_checks
    invariants = runs.first.check("allocation_invariants")
    assert invariants.asset == "marts/fct_gpu_hourly"
    assert invariants.severity == "ERROR"
    assert invariants.metadata["gpu_hours_checked"] == GPUS * 2
    assert invariants.metadata["event_hours_checked"] == 2
    assert invariants.metadata["requests_checked"] > 0
    assert invariants.metadata["max_energy_relative_error"] < 1e-9
    assert invariants.metadata["max_time_relative_error"] < 1e-9
    assert invariants.metadata["window_start"] == START.isoformat()
    assert invariants.metadata["window_end"] == END.isoformat()


def test_allocating_again_changes_nothing(runs: Runs) -> None:
    assert runs.first_totals == runs.second_totals
    assert runs.first_totals["fct_gpu_hourly"][0] == GPUS * 2


def test_tokens_per_tenant_match_the_raw_events(own_stack: Settings, runs: Runs) -> None:
    with connect(own_stack) as con:
        raw = con.execute(
            "select tenant, count(*), sum(prompt_tokens), sum(completion_tokens) "
            "from raw.usage_events where hour_start >= $start and hour_start < $end "
            "group by all order by tenant",
            {"start": START, "end": END},
        ).fetchall()
        billed = con.execute(
            "select tenant, sum(requests), sum(prompt_tokens), sum(completion_tokens) "
            "from marts.fct_tenant_usage_hourly where event_hour >= $start and event_hour < $end "
            "group by all order by tenant",
            {"start": START, "end": END},
        ).fetchall()
    assert len(raw) == 3
    assert billed == raw


def test_a_corrupted_mart_fails_the_invariants_and_a_rebuild_repairs_it(
    own_stack: Settings, runs: Runs
) -> None:
    path = str(own_stack.warehouse_path)
    with duckdb.connect(path) as con:
        # Energy claimed as allocated that no request carries (the row itself still
        # adds up, so fct_gpu_hourly's own dbt tests pass) ...
        gpu_key, hour = con.execute(
            "select gpu_key, hour_start from marts.fct_gpu_hourly "
            "where idle_unallocated_j > 1 order by gpu_key, hour_start limit 1"
        ).fetchone()  # type: ignore[misc]
        con.execute(
            "update marts.fct_gpu_hourly set allocated_j = allocated_j + idle_unallocated_j / 2, "
            "idle_unallocated_j = idle_unallocated_j / 2 "
            "where gpu_key = $gpu_key and hour_start = $hour",
            {"gpu_key": gpu_key, "hour": hour},
        )
        # ... and a billed request gone missing.
        con.execute(
            "delete from marts.fct_request_allocation where request_id = ("
            "select min(request_id) from marts.fct_request_allocation where not is_orphan)"
        )
    broken = check_allocation(own_stack, START, END)
    assert not broken.success  # the blocking check failed the run
    assert broken.materializations == {}  # checks only: nothing was rebuilt
    invariants = broken.check("allocation_invariants")
    assert not invariants.passed and invariants.severity == "ERROR"
    assert invariants.metadata["energy_failures"] == 1
    assert invariants.metadata["token_failures"] == 1
    assert invariants.metadata["time_failures"] == 0
    assert gpu_key in invariants.metadata["energy_not_closing"][0]
    assert [c.name for c in broken.failed_checks] == ["allocation_invariants"]
    assert "energy does not close on 1 GPU-hours" in (invariants.description or "")

    repaired = materialize_allocation(own_stack, START, END)
    assert repaired.success, repaired.failed_checks
    assert mart_totals(own_stack) == runs.first_totals


def test_the_allocate_command_prints_tenants_and_the_invariants(
    own_stack: Settings,
    runs: Runs,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in list(os.environ):
        if name.upper().startswith("GPULEDGER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GPULEDGER_STATE_DIR", str(own_stack.state_dir))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)  # no ./gpuledger.toml
    assert main(["allocate", "--start", START.isoformat(), "--hours", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 hourly partitions, succeeded" in out
    assert "invariants: passed: energy and time close on 8 GPU-hours" in out
    with connect(own_stack) as con:
        tenants = [
            r[0] for r in con.execute("select distinct tenant from raw.usage_events").fetchall()
        ]
    assert all(f"│ {tenant}" in out for tenant in tenants), out
    assert "dbt" not in out.replace("(dbt build)", "")  # dbt's own log lines stay in dbt.log

    assert main(["allocate", "--start", "2099-01-01", "--hours", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpuledger: error: ")
    assert "has not ended" in err[0]
