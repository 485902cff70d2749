"""Running the allocation (the dbt project) for a window, and checking its invariants.

`allocate(settings, start, end)` runs `dbt build` on the models between the raw lake
views and the marts, for the hours in [start, end), with the allocation method's
configuration passed as dbt vars. Incremental models replace the window's rows, so
re-running a window is idempotent. `check_invariants` then recomputes, from the marts
and the raw events, the three invariants of ALLOCATION.md §6 per GPU-hour and event
hour: energy closes, time closes, every usage event is billed exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ingest.catalog import connect, prepare_dbt_inputs
from ingest.settings import EfficiencySettings, Settings
from models.allocation_config import AllocationConfig
from models.errors import InputError, ServiceError

#: The dbt project shipped with gpuledger.
DBT_PROJECT_DIR = Path(__file__).resolve().parents[1] / "dbt"
#: dbt models built per billing period (after the invoices), not per hour.
MONTHLY_TAG = "monthly"
HOURLY_SELECTION = ("--exclude", f"tag:{MONTHLY_TAG}")
MONTHLY_SELECTION = ("--select", f"tag:{MONTHLY_TAG}")
#: Relative tolerance of the closing invariants (ALLOCATION.md §6).
INVARIANT_RELATIVE = 1e-9
#: Absolute slack for sums near zero (J or s).
INVARIANT_ABSOLUTE = 1e-6


def load_allocation_config(settings: Settings) -> AllocationConfig:
    """The allocation method's configuration: the YAML file when present, else defaults."""
    path = settings.allocation_path
    if not path.is_file():
        if settings.allocation_file is not None:
            raise InputError(f"allocation config {path} does not exist")
        return AllocationConfig()
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(
            f"allocation config {path}: not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    try:
        return AllocationConfig.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise InputError(f"allocation config {path}: {where}: {first['msg']}") from None


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise InputError("allocation window: times must carry a time zone (UTC)")
    return moment.astimezone(UTC).isoformat()


def hour_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def window_hours(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The whole hours covering [start, end)."""
    first = hour_floor(start)
    last = hour_floor(end)
    if last < end:
        last += timedelta(hours=1)
    if last <= first:
        raise InputError("allocation window: end must be after start")
    return first, last


def dbt_vars(settings: Settings, start: datetime, end: datetime) -> dict[str, Any]:
    config = load_allocation_config(settings)
    first, last = window_hours(start, end)
    return {
        **config.dbt_vars(_iso(first), _iso(last), settings.kafka.topic),
        **efficiency_dbt_vars(settings.efficiency),
    }


def efficiency_dbt_vars(efficiency: EfficiencySettings) -> dict[str, Any]:
    """The efficiency marts' economics and carbon as dbt vars (money as strings, which
    dbt casts to DECIMAL: never through a float)."""
    return {
        "cost_currency": efficiency.currency,
        "energy_tariff_per_kwh": str(efficiency.energy_tariff_per_kwh),
        "gpu_hour_cost": [
            {"gpu_type": gpu_type, "cost": str(cost)}
            for gpu_type, cost in sorted(efficiency.gpu_hour_cost.items())
        ],
        "default_gpu_hour_cost": str(efficiency.default_gpu_hour_cost),
        "pue": efficiency.pue,
        "grid_intensity_by_hour": list(efficiency.grid_intensity_by_hour),
    }


def dbt_build_args(
    variables: Mapping[str, Any], *, selection: Sequence[str] = HOURLY_SELECTION
) -> list[str]:
    """The `dbt build` of one window, as every caller runs it (CLI, Dagster, bench):
    the hourly models by default, or (MONTHLY_SELECTION) the models tagged `monthly`,
    which read the period's invoices. (Dagster selects a multi-asset's models itself.)

    dbt's unit tests check the models' logic on fixed inputs, not the window's data:
    they run in the test suite (tests/integration/test_dbt_unit_tests.py), not here.
    """
    return [
        "build",
        "--vars",
        json.dumps(variables, sort_keys=True),
        "--exclude-resource-type",
        "unit_test",
        *selection,
    ]


@dataclass(frozen=True)
class DbtNodeResult:
    name: str
    resource_type: str
    status: str
    message: str | None
    seconds: float


@dataclass(frozen=True)
class DbtRun:
    command: list[str]
    success: bool
    nodes: tuple[DbtNodeResult, ...]
    seconds: float
    log: str = ""

    @property
    def failures(self) -> tuple[DbtNodeResult, ...]:
        return tuple(n for n in self.nodes if n.status in {"error", "fail", "runtime error"})


def dbt_executable() -> str:
    candidate = Path(sys.executable).parent / "dbt"
    found = str(candidate) if candidate.exists() else shutil.which("dbt")
    if found is None:
        raise ServiceError("dbt not found next to this Python or on PATH: run `make install`")
    return found


def run_dbt(settings: Settings, args: list[str]) -> DbtRun:
    """Run a dbt command on the warehouse of `settings`, in a child process.

    A child process, as Dagster's dbt integration runs it: the DuckDB connection dbt
    holds is gone when it exits, so this process can open the warehouse afterwards.
    """
    prepare_dbt_inputs(settings)
    target = (settings.state_dir / "dbt-target").resolve()
    command = [
        dbt_executable(),
        *args,
        "--project-dir",
        str(DBT_PROJECT_DIR),
        "--profiles-dir",
        str(DBT_PROJECT_DIR),
        "--target-path",
        str(target),
        "--log-path",
        str((settings.state_dir / "dbt-logs").resolve()),
    ]
    env = {
        **os.environ,
        "GPULEDGER_DUCKDB_PATH": str(settings.warehouse_path.resolve()),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    began = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - began
    nodes: list[DbtNodeResult] = []
    results_path = target / "run_results.json"
    if results_path.is_file() and results_path.stat().st_mtime >= time.time() - seconds - 1:
        document = json.loads(results_path.read_text())
        for item in document.get("results", []):
            unique_id = str(item.get("unique_id", ""))
            nodes.append(
                DbtNodeResult(
                    name=unique_id.split(".")[-1] if unique_id.startswith("model.") else unique_id,
                    resource_type=unique_id.split(".", 1)[0],
                    status=str(item.get("status")),
                    message=item.get("message"),
                    seconds=float(item.get("execution_time") or 0.0),
                )
            )
    if completed.returncode not in (0, 1):
        tail = (completed.stdout + completed.stderr).strip().splitlines()[-3:]
        raise ServiceError(
            f"dbt {args[0]} failed (exit {completed.returncode}): {' / '.join(tail)}"
        )
    return DbtRun(command, completed.returncode == 0, tuple(nodes), seconds, completed.stdout)


def allocate(
    settings: Settings, start: datetime, end: datetime, *, select: str | None = None
) -> DbtRun:
    """`dbt build` (models and their data tests) for the hours of [start, end)."""
    args = dbt_build_args(dbt_vars(settings, start, end))
    if select:
        args += ["--select", select]
    return run_dbt(settings, args)


def build_period_marts(settings: Settings, start: datetime, end: datetime) -> DbtRun:
    """`dbt build` of the monthly models (mart_tenant_efficiency) for the billing
    periods of [start, end), month-aligned; run after the period's invoices."""
    variables = dbt_vars(settings, start, end)
    return run_dbt(settings, dbt_build_args(variables, selection=MONTHLY_SELECTION))


@dataclass(frozen=True)
class InvariantReport:
    """The three invariants per window; each failing row described."""

    gpu_hours: int
    event_hours: int
    requests: int
    energy_failures: list[str] = field(default_factory=list)
    time_failures: list[str] = field(default_factory=list)
    token_failures: list[str] = field(default_factory=list)
    max_energy_relative_error: float = 0.0
    max_time_relative_error: float = 0.0

    @property
    def passed(self) -> bool:
        return not (self.energy_failures or self.time_failures or self.token_failures)


def check_invariants(settings: Settings, start: datetime, end: datetime) -> InvariantReport:
    """Recompute the invariants of ALLOCATION.md §6 for the hours of [start, end).

    Energy closes per GPU-hour: the energy of every request piece on it + idle left
    unallocated + unattributed dynamic energy = metered. Time closes per GPU-hour:
    occupied request GPU-seconds + idle seconds = covered seconds. Tokens close per event
    hour: every usage event appears once in fct_request_allocation with its tokens.
    """
    first, last = window_hours(start, end)
    params = {"start": first, "end": last, "topic": settings.kafka.topic}
    with connect(settings) as con:
        energy = con.sql(
            """
            with pieces as (
                select gpu_key, hour_start, sum(energy_j) as request_j,
                       sum(occupied_s) as request_occupied_s
                from intermediate.int_request_gpu_hour_allocation
                where hour_start >= $start and hour_start < $end
                group by all
            )
            select g.gpu_key, g.hour_start, g.metered_j,
                   coalesce(p.request_j, 0) + g.idle_unallocated_j + g.unattributed_j as closed_j,
                   g.covered_s, coalesce(p.request_occupied_s, 0) + g.idle_s as closed_s
            from marts.fct_gpu_hourly g
            left join pieces p using (gpu_key, hour_start)
            where g.hour_start >= $start and g.hour_start < $end
            """,
            params={"start": first, "end": last},
        ).fetchall()
        tokens = con.sql(
            """
            with raw as (
                select hour_start as event_hour, count(*) as events,
                       sum(prompt_tokens) as prompt, sum(completion_tokens) as completion
                from raw.usage_events
                where topic = $topic and hour_start >= $start and hour_start < $end
                group by all
            ), billed as (
                select event_hour, count(*) as events, count(distinct request_id) as ids,
                       sum(prompt_tokens) as prompt, sum(completion_tokens) as completion
                from marts.fct_request_allocation
                where event_hour >= $start and event_hour < $end
                group by all
            )
            select coalesce(r.event_hour, b.event_hour), r.events, b.events, b.ids,
                   r.prompt, b.prompt, r.completion, b.completion
            from raw r full join billed b using (event_hour)
            """,
            params=params,
        ).fetchall()
    report = InvariantReport(gpu_hours=len(energy), event_hours=len(tokens), requests=0)
    max_e = max_t = 0.0
    for gpu_key, hour, metered, closed_j, covered, closed_s in energy:
        e_err = abs(closed_j - metered) / max(abs(metered), abs(closed_j), 1e-300)
        t_err = abs(closed_s - covered) / max(abs(covered), abs(closed_s), 1e-300)
        if (
            abs(closed_j - metered)
            > INVARIANT_RELATIVE * max(abs(metered), abs(closed_j)) + INVARIANT_ABSOLUTE
        ):
            report.energy_failures.append(
                f"{gpu_key} {hour:%Y-%m-%d %H:00}: allocated + idle + unattributed = "
                f"{closed_j:.6f} J, metered {metered:.6f} J"
            )
        else:
            max_e = max(max_e, e_err)
        if (
            abs(closed_s - covered)
            > INVARIANT_RELATIVE * max(abs(covered), abs(closed_s)) + INVARIANT_ABSOLUTE
        ):
            report.time_failures.append(
                f"{gpu_key} {hour:%Y-%m-%d %H:00}: occupied + idle = {closed_s:.6f} s, "
                f"covered {covered:.6f} s"
            )
        else:
            max_t = max(max_t, t_err)
    requests = 0
    for hour, raw_n, billed_n, ids, raw_p, billed_p, raw_c, billed_c in tokens:
        requests += billed_n or 0
        if (raw_n, raw_p, raw_c) != (billed_n, billed_p, billed_c) or billed_n != ids:
            report.token_failures.append(
                f"{hour:%Y-%m-%d %H:00}: {raw_n} events ({raw_p} prompt, {raw_c} completion "
                f"tokens) ingested, {billed_n} rows for {ids} ids ({billed_p}, {billed_c}) billed"
            )
    return InvariantReport(
        gpu_hours=report.gpu_hours,
        event_hours=report.event_hours,
        requests=requests,
        energy_failures=report.energy_failures,
        time_failures=report.time_failures,
        token_failures=report.token_failures,
        max_energy_relative_error=max_e,
        max_time_relative_error=max_t,
    )
