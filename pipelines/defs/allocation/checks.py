"""`allocation_invariants`: the allocation closes, for the run's window (blocking).

`pipelines.allocation.check_invariants` recomputes, from the marts and the raw events,
the invariants of ALLOCATION.md §6: per GPU-hour, allocated + idle + unattributed
energy = metered energy and occupied + idle seconds = covered seconds; per event hour,
every usage event billed exactly once with its tokens. The dbt tests check rows one
model at a time; this check closes the sums across models and against the raw layer.

ERROR and blocking: an invoice built on an allocation that does not close would bill
energy that was never metered (or miss some). The failing rows are in the metadata;
on success, the largest relative errors seen. A check launched without a partition
(from the UI) covers the newest `FALLBACK_HOURS` hours of `fct_gpu_hourly`.
"""

from datetime import datetime, timedelta
from typing import Any

import dagster as dg
import duckdb
from dagster_dbt import get_asset_key_for_model

from ingest.catalog import connect
from ingest.settings import Settings
from pipelines.allocation import InvariantReport, check_invariants
from pipelines.defs.allocation.assets import allocation_models
from pipelines.defs.partitions import run_window
from pipelines.defs.resources import GpuledgerSettings

__all__ = [
    "FALLBACK_HOURS",
    "MAX_LISTED",
    "allocation_invariants",
    "describe_invariants",
    "invariant_metadata",
]

FALLBACK_HOURS = 24
#: Failing rows listed per invariant in the metadata (the counts are always whole).
MAX_LISTED = 50

FCT_GPU_HOURLY = get_asset_key_for_model([allocation_models], "fct_gpu_hourly")
FCT_REQUEST_ALLOCATION = get_asset_key_for_model([allocation_models], "fct_request_allocation")


def _newest_hours(settings: Settings) -> tuple[datetime, datetime] | None:
    with connect(settings) as con:
        row = con.execute("select max(hour_start) from marts.fct_gpu_hourly").fetchone()
    if row is None or row[0] is None:
        return None
    last: datetime = row[0]
    return last - timedelta(hours=FALLBACK_HOURS - 1), last + timedelta(hours=1)


def invariant_metadata(report: InvariantReport, start: datetime, end: datetime) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "gpu_hours_checked": report.gpu_hours,
        "event_hours_checked": report.event_hours,
        "requests_checked": report.requests,
        "max_energy_relative_error": report.max_energy_relative_error,
        "max_time_relative_error": report.max_time_relative_error,
        "energy_failures": len(report.energy_failures),
        "time_failures": len(report.time_failures),
        "token_failures": len(report.token_failures),
    }
    for name, rows in (
        ("energy_not_closing", report.energy_failures),
        ("time_not_closing", report.time_failures),
        ("tokens_not_billed_once", report.token_failures),
    ):
        if rows:
            metadata[name] = rows[:MAX_LISTED]
    return metadata


def describe_invariants(report: InvariantReport) -> str:
    if report.passed:
        return (
            f"energy and time close on {report.gpu_hours} GPU-hours (max relative error: "
            f"energy {report.max_energy_relative_error:.1e}, "
            f"time {report.max_time_relative_error:.1e}); "
            f"{report.requests} requests in {report.event_hours} event hours billed once"
        )
    parts = []
    if report.energy_failures:
        parts.append(f"energy does not close on {len(report.energy_failures)} GPU-hours")
    if report.time_failures:
        parts.append(f"time does not close on {len(report.time_failures)} GPU-hours")
    if report.token_failures:
        parts.append(f"tokens not billed once in {len(report.token_failures)} event hours")
    first = (report.energy_failures + report.time_failures + report.token_failures)[0]
    return "; ".join(parts) + f" (first: {first})"


@dg.asset_check(
    asset=FCT_GPU_HOURLY,
    blocking=True,
    additional_deps=[FCT_REQUEST_ALLOCATION],
    description="Energy and time close per GPU-hour; every usage event billed once.",
)
def allocation_invariants(
    context: dg.AssetCheckExecutionContext, gpuledger: GpuledgerSettings
) -> dg.AssetCheckResult:
    settings = gpuledger.settings()
    window = run_window(context)
    try:
        if window is None:
            window = _newest_hours(settings)
        if window is None:
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description="fct_gpu_hourly has no rows: nothing was allocated yet",
            )
        start, end = window
        report = check_invariants(settings, start, end)
    except duckdb.CatalogException as exc:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"the marts are not built: {str(exc).splitlines()[0]}",
        )
    return dg.AssetCheckResult(
        passed=report.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=invariant_metadata(report, start, end),
        description=describe_invariants(report),
    )
