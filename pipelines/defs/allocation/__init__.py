"""Allocation domain: the dbt project as hourly assets, its invariants, its schedule."""

from __future__ import annotations

import dagster as dg

from pipelines.defs.allocation.assets import allocation_models
from pipelines.defs.allocation.checks import allocation_invariants
from pipelines.defs.allocation.resources import GpuledgerDbtResource, dbt_resource
from pipelines.defs.allocation.schedules import allocation_hourly_schedule, allocation_job

__all__ = [
    "GpuledgerDbtResource",
    "allocation_hourly_schedule",
    "allocation_invariants",
    "allocation_job",
    "allocation_models",
    "definitions",
]


def definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[allocation_models],
        asset_checks=[allocation_invariants],
        jobs=[allocation_job],
        schedules=[allocation_hourly_schedule],
        resources={"dbt": dbt_resource()},
    )
