"""`triton_counts_match`: no (server, model, hour) drifts from Triton's own count.

Reads the run's hours from `assurance.triton_reconciliation` and judges them again
under `settings.reconciliation` (or the check's config), so a threshold changed since
the hours were reconciled applies without rebuilding them. A row fails when
`|events - Triton| / Triton > drift_threshold` and `|events - Triton| > min_abs_drift`
(where Triton counted nothing, any event drifts).

ERROR, not blocking: a drift is revenue at risk (requests served without an event,
or events Triton cannot confirm) for finance to look into, but the events that exist
are still right to bill, so nothing downstream waits. The description names the
threshold and the rows that drift (server, model, hour, both counts, the difference);
the metadata has them all as a table. A check launched without a partition (from the
UI) covers the newest `FALLBACK_HOURS` reconciled hours.
"""

from datetime import datetime, timedelta
from typing import Any

import dagster as dg
import duckdb
import polars as pl
from pydantic import Field

from ingest.catalog import connect
from ingest.lake import hour_key
from ingest.settings import Settings
from models.reconciliation import RECONCILIATION_SCHEMA, DriftRule, apply_rule
from pipelines.defs.assurance.assets import (
    RECONCILIATION_TABLE,
    drift_rule,
    reconciliation_markdown,
    triton_reconciliation,
)
from pipelines.defs.partitions import run_window
from pipelines.defs.resources import GpuledgerSettings, resolve_settings

__all__ = [
    "FALLBACK_HOURS",
    "MAX_DESCRIBED",
    "TritonCountsMatchConfig",
    "describe_drift",
    "reconciled_rows",
    "triton_counts_match",
]

FALLBACK_HOURS = 24
#: Drifting rows named in the description (the metadata table lists more).
MAX_DESCRIBED = 5


def reconciled_rows(
    settings: Settings, window: tuple[datetime, datetime] | None
) -> pl.DataFrame | None:
    """The table's rows of `window` (None: the newest `FALLBACK_HOURS` hours); None
    when the table does not exist yet."""
    columns = ", ".join(RECONCILIATION_SCHEMA)
    with connect(settings) as con:
        try:
            if window is None:
                newest = con.execute(f"SELECT max(hour_start) FROM {RECONCILIATION_TABLE}")
                row = newest.fetchone()
                if row is None or row[0] is None:
                    return pl.DataFrame(schema=RECONCILIATION_SCHEMA)
                last: datetime = row[0]
                window = (last - timedelta(hours=FALLBACK_HOURS - 1), last + timedelta(hours=1))
            frame: pl.DataFrame = con.sql(
                f"SELECT {columns} FROM {RECONCILIATION_TABLE} "
                "WHERE hour_start >= $start AND hour_start < $end ORDER BY ALL",
                params={"start": window[0], "end": window[1]},
            ).pl()
        except duckdb.CatalogException:
            return None
    return frame.cast(RECONCILIATION_SCHEMA)


def describe_drift(rows: pl.DataFrame, rule: DriftRule) -> str:
    """One paragraph for the UI: the verdict, the rule, and the rows that drift."""
    flagged = rows.filter(pl.col("flagged"))
    if flagged.height == 0:
        return (
            f"all {rows.height} server/model/hour rows within the threshold "
            f"({rule.describe()}): events {int(rows['events'].sum())}, "
            f"Triton requests {int(rows['triton_requests'].sum())}"
        )
    worst = flagged.sort(pl.col("difference").abs(), descending=True)
    named = [
        f"{r['server']} {r['model']} {hour_key(r['hour_start'])}: events {r['events']} vs "
        f"Triton {r['triton_requests']} (difference {r['difference']:+d}, {r['reason']})"
        for r in worst.head(MAX_DESCRIBED).iter_rows(named=True)
    ]
    more = flagged.height - len(named)
    tail = f"; and {more} more" if more > 0 else ""
    return (
        f"{flagged.height} of {rows.height} server/model/hour rows drift from Triton's "
        f"request count ({rule.describe()}): " + "; ".join(named) + tail
    )


class TritonCountsMatchConfig(dg.Config):
    drift_threshold: float | None = Field(
        default=None, ge=0, le=1, description="unset = settings.reconciliation.drift_threshold"
    )
    min_abs_drift: int | None = Field(
        default=None, ge=0, description="unset = settings.reconciliation.min_abs_drift"
    )


def _rule(settings: Settings, config: TritonCountsMatchConfig) -> DriftRule:
    base = drift_rule(settings)
    return DriftRule(
        drift_threshold=(
            base.drift_threshold if config.drift_threshold is None else config.drift_threshold
        ),
        min_abs_drift=base.min_abs_drift if config.min_abs_drift is None else config.min_abs_drift,
    )


@dg.asset_check(asset=triton_reconciliation, blocking=False)
def triton_counts_match(
    context: dg.AssetCheckExecutionContext,
    config: TritonCountsMatchConfig,
    gpuledger: GpuledgerSettings,
) -> dg.AssetCheckResult:
    """Usage events per Triton server, model and hour match Triton's own request count
    within `reconciliation.drift_threshold` (ERROR): a drift is revenue at risk."""
    settings = resolve_settings(gpuledger)
    rule = _rule(settings, config)
    window = run_window(context)
    stored = reconciled_rows(settings, window)
    if stored is None:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"{RECONCILIATION_TABLE} does not exist: materialize "
            "triton_reconciliation first",
        )
    rows = apply_rule(stored, rule)
    flagged = rows.filter(pl.col("flagged"))
    metadata: dict[str, Any] = {
        "drift_threshold": rule.drift_threshold,
        "min_abs_drift": rule.min_abs_drift,
        "rows_checked": rows.height,
        "rows_flagged": flagged.height,
        "events": int(rows["events"].sum()),
        "triton_requests": int(rows["triton_requests"].sum()),
        "difference": int(rows["difference"].sum()),
        "drifting_rows": dg.MetadataValue.md(reconciliation_markdown(flagged)),
    }
    if window is not None:
        metadata["window_start"] = window[0].isoformat()
        metadata["window_end"] = window[1].isoformat()
    return dg.AssetCheckResult(
        passed=flagged.height == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
        description=describe_drift(rows, rule),
    )
