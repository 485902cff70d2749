"""Efficiency domain: the monthly efficiency marts and the analysts' snapshots."""

import dagster as dg

from pipelines.defs.efficiency.assets import (
    analytics_period_snapshot,
    analytics_snapshot,
    efficiency_period_models,
)

#: The configured grid carbon intensity (efficiency.grid_intensity_file), copied into
#: the lake before each dbt run; declared so the dbt source is a known asset.
GRID_INTENSITY = dg.AssetSpec(
    ["raw", "grid_intensity"],
    group_name="efficiency",
    description="Grid carbon intensity per UTC hour, from efficiency.grid_intensity_file.",
)

__all__ = [
    "GRID_INTENSITY",
    "analytics_period_snapshot",
    "analytics_snapshot",
    "definitions",
    "efficiency_period_models",
]


def definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[
            efficiency_period_models,
            analytics_snapshot,
            analytics_period_snapshot,
            GRID_INTENSITY,
        ]
    )
