"""Revenue assurance: usage events against Triton's own request counters.

Every request a Triton server completes should have exactly one usage event (the
metering gateway writes it; billing reads only events). Triton counts the requests
it completes itself, in `nv_inference_request_success` and
`nv_inference_request_failure`. For a decoupled Python-backend model, measured on
Triton 2.51: `success` counts one per request *including* model errors and
cancellations, and `failure` stays 0. So events of every status (ok, error,
cancelled) are compared with success + failure, per Triton server, model and hour.

The rows (one per server, model and hour present on either side: a full outer join)
carry both counts, `difference = events - triton_requests` and
`drift_ratio = |difference| / triton_requests`. Where Triton counted nothing the ratio
is 0 when there are no events either and +inf otherwise (every event lacks a Triton
count, however many). A row is flagged when `drift_ratio > drift_threshold` and
`|difference| > min_abs_drift`.

`difference < 0` is revenue at risk (requests served, never billed); `> 0` means
events Triton cannot confirm (a misattributed source, duplicates that escaped
deduplication, or requests counted by Triton in the next hour's first scrape).

Pure: takes and returns Polars frames; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from models.errors import InputError

__all__ = [
    "EVENT_COUNTS_SCHEMA",
    "EVENT_STATUSES",
    "RECONCILIATION_SCHEMA",
    "TRITON_COUNTS_SCHEMA",
    "DriftRule",
    "apply_rule",
    "reconcile",
]

#: The statuses of a v1 usage event (`models.usage_event.RequestStatus`).
EVENT_STATUSES = ("ok", "error", "cancelled")

_HOUR = pl.Datetime("us", "UTC")

#: Usage events per server, model, hour and status.
EVENT_COUNTS_SCHEMA = pl.Schema(
    {
        "server": pl.String(),
        "model": pl.String(),
        "hour_start": _HOUR,
        "status": pl.String(),
        "events": pl.Int64(),
    }
)

#: Requests Triton completed per server, model and hour (success + failure).
TRITON_COUNTS_SCHEMA = pl.Schema(
    {
        "server": pl.String(),
        "model": pl.String(),
        "hour_start": _HOUR,
        "triton_requests": pl.Int64(),
    }
)

RECONCILIATION_SCHEMA = pl.Schema(
    {
        "server": pl.String(),
        "model": pl.String(),
        "hour_start": _HOUR,
        "events": pl.Int64(),
        "events_ok": pl.Int64(),
        "events_error": pl.Int64(),
        "events_cancelled": pl.Int64(),
        "triton_requests": pl.Int64(),
        #: Triton reported a counter for this server and model (possibly with 0 requests).
        "triton_seen": pl.Boolean(),
        "difference": pl.Int64(),
        "drift_ratio": pl.Float64(),
        "flagged": pl.Boolean(),
        "reason": pl.String(),
    }
)

_KEYS = ["server", "model", "hour_start"]


@dataclass(frozen=True)
class DriftRule:
    """When a row's drift is a finding (`settings.reconciliation`)."""

    drift_threshold: float = 0.02
    min_abs_drift: int = 0

    def __post_init__(self) -> None:
        if math.isnan(self.drift_threshold) or self.drift_threshold < 0:
            raise InputError(
                f"reconciliation: drift_threshold must be >= 0, got {self.drift_threshold}"
            )
        if self.min_abs_drift < 0:
            raise InputError(
                f"reconciliation: min_abs_drift must be >= 0, got {self.min_abs_drift}"
            )

    def describe(self) -> str:
        text = f"drift above {self.drift_threshold:.2%} of Triton's count"
        if self.min_abs_drift:
            text += f" and more than {self.min_abs_drift} requests apart"
        return text


def _checked(frame: pl.DataFrame, schema: pl.Schema, what: str) -> pl.DataFrame:
    missing = [name for name in schema if name not in frame.columns]
    if missing:
        raise InputError(f"reconciliation: {what} lacks columns {missing}")
    try:
        out = frame.select(list(schema)).cast(schema)
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"reconciliation: {what}: {type(exc).__name__}: {exc}") from None
    for name in _KEYS:
        nulls = out[name].null_count()
        if nulls:
            raise InputError(f"reconciliation: {what}: {nulls} rows without a {name}")
    counts = next(name for name in schema if name not in (*_KEYS, "status"))
    negative = out.filter(pl.col(counts).is_null() | (pl.col(counts) < 0)).height
    if negative:
        raise InputError(
            f"reconciliation: {what}: {negative} rows with a null or negative {counts}"
        )
    return out


def reconcile(
    event_counts: pl.DataFrame, triton_counts: pl.DataFrame, rule: DriftRule
) -> pl.DataFrame:
    """One row per (server, model, hour) on either side, sorted; schema
    `RECONCILIATION_SCHEMA`. Input rows with the same key are summed."""
    events = _checked(event_counts, EVENT_COUNTS_SCHEMA, "event counts")
    unknown = sorted(set(events["status"].drop_nulls().to_list()) - set(EVENT_STATUSES))
    if unknown or events["status"].null_count():
        shown = unknown + (["null"] if events["status"].null_count() else [])
        raise InputError(
            f"reconciliation: event counts: unknown status {shown}, "
            f"expected one of {list(EVENT_STATUSES)}"
        )
    triton = _checked(triton_counts, TRITON_COUNTS_SCHEMA, "Triton counts")

    per_key = events.group_by(_KEYS).agg(
        pl.col("events").sum().alias("events"),
        *(
            pl.col("events").filter(pl.col("status") == status).sum().alias(f"events_{status}")
            for status in EVENT_STATUSES
        ),
    )
    triton_per_key = triton.group_by(_KEYS).agg(
        pl.col("triton_requests").sum(), pl.lit(True).alias("triton_seen")
    )
    joined = per_key.join(triton_per_key, on=_KEYS, how="full", coalesce=True).with_columns(
        pl.col("events", *(f"events_{s}" for s in EVENT_STATUSES), "triton_requests").fill_null(0),
        pl.col("triton_seen").fill_null(False),
    )
    difference = pl.col("events") - pl.col("triton_requests")
    rows = joined.with_columns(
        difference.alias("difference"),
        pl.when(pl.col("triton_requests") > 0)
        .then(difference.abs() / pl.col("triton_requests"))
        .when(difference == 0)
        .then(pl.lit(0.0))
        .otherwise(pl.lit(float("inf")))
        .alias("drift_ratio"),
    )
    return apply_rule(rows, rule)


def apply_rule(rows: pl.DataFrame, rule: DriftRule) -> pl.DataFrame:
    """`flagged` and `reason` of reconciliation rows under `rule` (a check can judge
    stored rows under another threshold than the one they were written with)."""
    flagged = (pl.col("drift_ratio") > rule.drift_threshold) & (
        pl.col("difference").abs() > rule.min_abs_drift
    )
    direction = (
        pl.when(pl.col("difference") == 0)
        .then(pl.lit("match"))
        .when(~pl.col("triton_seen"))
        .then(pl.lit("events without a Triton counter (server or model not scraped)"))
        .when(pl.col("triton_requests") == 0)
        .then(pl.lit("events without a Triton count"))
        .when(pl.col("events") == 0)
        .then(pl.lit("events missing (none recorded)"))
        .when(pl.col("difference") < 0)
        .then(pl.lit("events missing"))
        .otherwise(pl.lit("more events than Triton counted"))
    )
    reason = (
        pl.when(~flagged & (pl.col("difference") != 0))
        .then(pl.concat_str(direction, pl.lit(" (within tolerance)")))
        .otherwise(direction)
    )
    return (
        rows.with_columns(flagged.alias("flagged"), reason.alias("reason"))
        .select(list(RECONCILIATION_SCHEMA))
        .cast(RECONCILIATION_SCHEMA)
        .sort(_KEYS)
    )
