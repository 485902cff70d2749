"""`triton_reconciliation`: usage events against Triton's request counters, per hour.

For each hour of the run's window (one hour, or a single-run backfill's range):
- the hour's usage events are counted per Triton server, model and status from the
  lake file `usage_events_raw` built (`events.parquet`: one row per event id, bucketed
  by event time, i.e. the request's end). The server is the authority of the event's
  `source` (`triton://<server>/v2/models/<model>`); a source of another form is kept
  whole, so its events show up unmatched rather than vanish;
- Triton's counters are read from Prometheus for the same hour
  (`ingest.triton_counters`: success + failure, raw samples, resets handled);
- `models.reconciliation.reconcile` joins the two (full outer) under
  `settings.reconciliation`'s drift rule;
- the rows replace the hour's rows of the warehouse table
  `assurance.triton_reconciliation` (schema and table created when missing).

The check `triton_counts_match` (checks.py) fails when a row drifts. The work is in
plain functions; the asset is a thin wrapper.
"""

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import duckdb
import polars as pl

from ingest.catalog import connect
from ingest.lake import Lake, hour_key
from ingest.settings import Settings
from ingest.triton_counters import TritonCounts, read_triton_counts
from ingest.usage_hours import hours_between, read_manifest
from models.errors import InputError, ServiceError
from models.reconciliation import (
    EVENT_COUNTS_SCHEMA,
    RECONCILIATION_SCHEMA,
    DriftRule,
    reconcile,
)
from pipelines.defs.partitions import hour_partition_key, hourly_asset
from pipelines.defs.resources import (
    GpuledgerSettings,
    KafkaResource,
    PrometheusResource,
    resolve_settings,
)
from pipelines.defs.usage.assets import usage_events_raw

__all__ = [
    "ASSURANCE_GROUP",
    "MAX_TABLE_ROWS",
    "RECONCILIATION_TABLE",
    "HourReconciliation",
    "drift_rule",
    "hour_event_counts",
    "reconcile_hour",
    "reconciliation_markdown",
    "server_of_source",
    "triton_reconciliation",
    "write_reconciliation",
]

ASSURANCE_GROUP = "assurance"
RECONCILIATION_TABLE = "assurance.triton_reconciliation"
#: Rows shown in a markdown table (flagged first); the warehouse table has them all.
MAX_TABLE_ROWS = 50
#: How long a write waits for another process (dbt, a second run) to release the
#: warehouse file.
WRITE_LOCK_WAIT_S = 60.0

_SOURCE_SERVER = r"^triton://([^/]+)/"


def server_of_source(source: pl.Expr) -> pl.Expr:
    """The server of `triton://<server>/v2/models/<model>`; other sources whole."""
    return source.str.extract(_SOURCE_SERVER, 1).fill_null(source)


def drift_rule(settings: Settings) -> DriftRule:
    rec = settings.reconciliation
    return DriftRule(drift_threshold=rec.drift_threshold, min_abs_drift=rec.min_abs_drift)


def hour_event_counts(settings: Settings, hour: datetime) -> pl.DataFrame:
    """Events of the built hour per server, model and status (`EVENT_COUNTS_SCHEMA`)."""
    topic = settings.kafka.topic
    directory = Lake(settings.lake_path).usage_hour_dir(topic, hour)
    events = directory / "events.parquet"
    if read_manifest(directory / "_manifest.json") is None or not events.is_file():
        raise InputError(
            f"usage hour {hour_key(hour)} of topic {topic!r} is not built (no events file "
            f"and manifest in {directory}): materialize usage_events_raw for partition "
            f"{hour_partition_key(hour)} first"
        )
    return (
        pl.scan_parquet(events)
        .select(
            server=server_of_source(pl.col("source")),
            model=pl.col("model"),
            hour_start=pl.lit(hour).cast(EVENT_COUNTS_SCHEMA["hour_start"]),
            status=pl.col("status"),
        )
        .group_by("server", "model", "hour_start", "status")
        .agg(events=pl.len())
        .collect()
        .cast(EVENT_COUNTS_SCHEMA)
        .sort("server", "model", "status")
    )


@dataclass(frozen=True)
class HourReconciliation:
    hour: datetime
    rows: pl.DataFrame  # RECONCILIATION_SCHEMA
    triton: TritonCounts

    @property
    def events(self) -> int:
        return int(self.rows["events"].sum())

    @property
    def triton_requests(self) -> int:
        return int(self.rows["triton_requests"].sum())

    @property
    def flagged(self) -> pl.DataFrame:
        return self.rows.filter(pl.col("flagged"))


def reconcile_hour(settings: Settings, hour: datetime) -> HourReconciliation:
    """Count the hour's events, read Triton's counters for it, reconcile."""
    events = hour_event_counts(settings, hour)
    triton = read_triton_counts(settings, hour, hour + timedelta(hours=1))
    triton_rows = triton.counts.select(
        "server",
        "model",
        pl.lit(hour).cast(EVENT_COUNTS_SCHEMA["hour_start"]).alias("hour_start"),
        "triton_requests",
    )
    rows = reconcile(events, triton_rows, drift_rule(settings))
    return HourReconciliation(hour=hour, rows=rows, triton=triton)


_TABLE_DDL = f"""
CREATE TABLE IF NOT EXISTS {RECONCILIATION_TABLE} (
    server VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    hour_start TIMESTAMPTZ NOT NULL,
    events BIGINT NOT NULL,
    events_ok BIGINT NOT NULL,
    events_error BIGINT NOT NULL,
    events_cancelled BIGINT NOT NULL,
    triton_requests BIGINT NOT NULL,
    triton_seen BOOLEAN NOT NULL,
    difference BIGINT NOT NULL,
    drift_ratio DOUBLE NOT NULL,
    flagged BOOLEAN NOT NULL,
    reason VARCHAR NOT NULL,
    drift_threshold DOUBLE NOT NULL,
    min_abs_drift BIGINT NOT NULL,
    reconciled_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (server, model, hour_start)
)
"""


def _locked(exc: duckdb.Error) -> bool:
    return "lock" in str(exc).lower()


def write_reconciliation(
    settings: Settings, rows: pl.DataFrame, start: datetime, end: datetime
) -> None:
    """Replace the rows of `[start, end)` in `assurance.triton_reconciliation` (one
    transaction), creating the schema and table when missing."""
    rule = drift_rule(settings)
    table = rows.select(list(RECONCILIATION_SCHEMA)).with_columns(
        drift_threshold=pl.lit(rule.drift_threshold, pl.Float64),
        min_abs_drift=pl.lit(rule.min_abs_drift, pl.Int64),
        reconciled_at=pl.lit(datetime.now(UTC), pl.Datetime("us", "UTC")),
    )
    waited = 0.0
    delay = 0.25
    while True:
        try:
            con = connect(settings, read_only=False)
            break
        except duckdb.Error as exc:
            if not _locked(exc) or waited >= WRITE_LOCK_WAIT_S:
                raise ServiceError(
                    f"warehouse {settings.warehouse_path}: cannot write "
                    f"{RECONCILIATION_TABLE}: {str(exc).splitlines()[0]}"
                ) from None
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 4.0)
    with con:
        con.execute("CREATE SCHEMA IF NOT EXISTS assurance")
        con.execute(_TABLE_DDL)
        con.register("reconciled_rows", table.to_arrow())
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                f"DELETE FROM {RECONCILIATION_TABLE} WHERE hour_start >= $start "
                "AND hour_start < $end",
                {"start": start, "end": end},
            )
            con.execute(f"INSERT INTO {RECONCILIATION_TABLE} BY NAME SELECT * FROM reconciled_rows")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def _drift_text(value: float) -> str:
    return "∞" if value == float("inf") else f"{value:.2%}"


def reconciliation_markdown(rows: pl.DataFrame, limit: int = MAX_TABLE_ROWS) -> str:
    """Rows as a markdown table, flagged first, then by |difference|."""
    lines = [
        "| hour | server | model | events (ok/error/cancelled) | Triton | difference "
        "| drift | flagged | reason |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    ordered = rows.sort(
        [pl.col("flagged"), pl.col("difference").abs(), "server", "model", "hour_start"],
        descending=[True, True, False, False, False],
    )
    for row in ordered.head(limit).iter_rows(named=True):
        lines.append(
            f"| {hour_key(row['hour_start'])} | {row['server']} | {row['model']} | "
            f"{row['events']} ({row['events_ok']}/{row['events_error']}/"
            f"{row['events_cancelled']}) | {row['triton_requests']} | "
            f"{row['difference']:+d} | {_drift_text(row['drift_ratio'])} | "
            f"{'yes' if row['flagged'] else ''} | {row['reason']} |"
        )
    if rows.height > limit:
        lines.append(f"\n{rows.height - limit} more rows in `{RECONCILIATION_TABLE}`")
    return "\n".join(lines)


def hour_metadata(result: HourReconciliation) -> dict[str, Any]:
    return {
        "dagster/row_count": result.rows.height,
        "events": result.events,
        "triton_requests": result.triton_requests,
        "difference": result.events - result.triton_requests,
        "flagged": result.flagged.height,
    }


def run_metadata(
    settings: Settings, results: list[HourReconciliation], rows: pl.DataFrame
) -> dict[str, Any]:
    rule = drift_rule(settings)
    warnings = sorted({w for r in results for w in r.triton.warnings})
    metadata: dict[str, Any] = {
        "dagster/row_count": rows.height,
        "hours": len(results),
        "events": int(rows["events"].sum()),
        "triton_requests": int(rows["triton_requests"].sum()),
        "difference": int(rows["difference"].sum()),
        "flagged": int(rows["flagged"].sum()),
        "drift_threshold": rule.drift_threshold,
        "min_abs_drift": rule.min_abs_drift,
        "series_started_in_window": sum(
            int(r.triton.counts["series_started"].sum()) for r in results
        ),
        "counter_resets": sum(int(r.triton.counts["resets"].sum()) for r in results),
        "prometheus": results[0].triton.prometheus_url if results else "",
        "triton_job": settings.reconciliation.triton_job,
        "table": RECONCILIATION_TABLE,
        "reconciliation": dg.MetadataValue.md(reconciliation_markdown(rows)),
    }
    if warnings:
        metadata["warnings"] = dg.MetadataValue.json(warnings)
    return metadata


@hourly_asset(group_name=ASSURANCE_GROUP, kinds={"prometheus", "duckdb"}, deps=[usage_events_raw])
def triton_reconciliation(
    context: dg.AssetExecutionContext,
    gpuledger: GpuledgerSettings,
    kafka: KafkaResource,
    prometheus: PrometheusResource,
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    """Usage events against Triton's own request counters per server, model and hour
    (events of every status against success + failure): `assurance.triton_reconciliation`
    in the warehouse. Drift is judged by the check `triton_counts_match`."""
    settings = resolve_settings(gpuledger, kafka, prometheus)
    window = context.partition_time_window
    start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
    results = [reconcile_hour(settings, hour) for hour in hours_between(start, end)]
    rows = (
        pl.concat([r.rows for r in results])
        if results
        else pl.DataFrame(schema=RECONCILIATION_SCHEMA)
    )
    write_reconciliation(settings, rows, start, end)
    for result in results:
        context.add_asset_metadata(
            hour_metadata(result), partition_key=hour_partition_key(result.hour)
        )
        for warning in result.triton.warnings:
            context.log.warning(f"{hour_key(result.hour)}: {warning}")
    return dg.MaterializeResult(metadata=run_metadata(settings, results, rows))
