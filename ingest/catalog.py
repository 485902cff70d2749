"""The DuckDB catalog over the lake: views any SQL client (and dbt) can query.

`warehouse.duckdb` holds no rows of its own for the raw layer, only views over the
lake's Parquet files, so writers never contend for the database file and a reader
sees every file that has landed (a file appears whole or not at all). Each dataset
keeps a zero-row `_empty.parquet` with its schema, so a view works before the first
file lands.

Views (schema `raw`):
- `usage_landing`     every Kafka record, decoded, with quarantine reasons
- `usage_events`      one row per event id, per hour (first copy wins)
- `usage_quarantine`  invalid events and conflicting duplicates, per hour
- `usage_hours`       the manifests of built hours (counts, positions, late events)
- `gpu_telemetry`     DCGM samples per GPU as scraped, per hour
- `invoice_revenue`   what each period's invoices billed per tenant and model
- `grid_intensity`    the configured grid carbon intensity per UTC hour
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pyarrow as pa

from ingest.grid_intensity import GRID_INTENSITY_SCHEMA, sync_grid_intensity
from ingest.lake import REVENUE_SCHEMA, Lake, ensure_empty_file
from ingest.settings import Settings
from ingest.telemetry import TELEMETRY_SCHEMA
from ingest.usage_hours import EVENTS_SCHEMA, QUARANTINE_SCHEMA
from ingest.usage_validation import LANDING_SCHEMA

RAW_VIEWS = (
    "usage_landing",
    "usage_events",
    "usage_quarantine",
    "usage_hours",
    "gpu_telemetry",
    "invoice_revenue",
    "grid_intensity",
)


def _datasets(lake: Lake) -> dict[str, tuple[Path, str, pa.Schema]]:
    """View name -> (dataset root, glob below it, the zero-row placeholder's name)."""
    return {
        "usage_landing": (lake.usage_landing, "*.parquet", LANDING_SCHEMA),
        "usage_events": (lake.usage_events, "events.parquet", EVENTS_SCHEMA),
        "usage_quarantine": (lake.usage_events, "quarantine.parquet", QUARANTINE_SCHEMA),
        "gpu_telemetry": (lake.telemetry_samples, "samples.parquet", TELEMETRY_SCHEMA),
        "invoice_revenue": (lake.billing_revenue, "revenue.parquet", REVENUE_SCHEMA),
        "grid_intensity": (lake.grid_intensity, "grid_intensity.parquet", GRID_INTENSITY_SCHEMA),
    }


def ensure_lake(settings: Settings) -> Lake:
    """Create the lake's dataset roots with their zero-row schema files."""
    lake = Lake(settings.lake_path.resolve())
    for root, name, schema in _datasets(lake).values():
        # `_empty/<name>` matches the view's `**/<name>` glob, so the view is valid (and
        # empty) before the first real file lands.
        placeholder = "empty.parquet" if name == "*.parquet" else name
        ensure_empty_file(root / "_empty" / placeholder, schema)
    return lake


def view_sql(settings: Settings) -> list[str]:
    lake = ensure_lake(settings)
    statements = ["CREATE SCHEMA IF NOT EXISTS raw"]
    for view, (root, name, _) in _datasets(lake).items():
        pattern = str(root / "**" / name)
        statements.append(
            f"CREATE OR REPLACE VIEW raw.{view} AS "
            f"SELECT * FROM read_parquet('{pattern}', union_by_name = true, "
            "hive_partitioning = false)"
        )
    manifests = str(lake.usage_events / "topic=*" / "hour=*" / "_manifest.json")
    statements.append(
        "CREATE OR REPLACE VIEW raw.usage_hours AS "
        "SELECT * FROM read_json(["
        f"'{manifests}'], union_by_name = true, ignore_errors = true) "
        if any(lake.usage_events.glob("topic=*/hour=*/_manifest.json"))
        else "CREATE OR REPLACE VIEW raw.usage_hours AS SELECT NULL::VARCHAR AS hour, "
        "NULL::VARCHAR AS topic, NULL::BIGINT AS events, NULL::BIGINT AS duplicates, "
        "NULL::BIGINT AS conflicts, NULL::BIGINT AS quarantined, "
        "NULL::BIGINT AS late_incorporated WHERE false"
    )
    return statements


def prepare_dbt_inputs(settings: Settings) -> Path:
    """What a dbt run reads beyond ingestion's files: the raw views, and the configured
    grid intensity copied into the lake (a bad file fails the run, naming its line;
    ingestion, which never reads it, is not affected)."""
    path = ensure_catalog(settings)
    sync_grid_intensity(settings, Lake(settings.lake_path.resolve()))
    return path


def ensure_catalog(settings: Settings) -> Path:
    """Create or refresh the raw views in the warehouse file; returns its path.

    The file is opened for writing only when a view is missing or its definition
    changed (views over globs see new files without a refresh), so routine ingest runs
    don't contend with dbt or readers for the write lock.
    """
    path = settings.warehouse_path
    path.parent.mkdir(parents=True, exist_ok=True)
    statements = view_sql(settings)
    if path.exists() and _views_current(path, statements):
        return path
    fingerprint = hashlib.sha256("\n".join(statements).encode()).hexdigest()
    with duckdb.connect(str(path)) as con:
        for statement in statements:
            con.execute(statement)
        con.execute(
            "CREATE OR REPLACE TABLE raw._catalog AS SELECT $f AS fingerprint", {"f": fingerprint}
        )
    return path


def _views_current(path: Path, statements: list[str]) -> bool:
    """The views were last written from exactly these statements (a fingerprint kept
    in `raw._catalog`), and all exist."""
    fingerprint = hashlib.sha256("\n".join(statements).encode()).hexdigest()
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            stored = con.sql("SELECT fingerprint FROM raw._catalog").fetchall()
            views = {
                row[0]
                for row in con.sql(
                    "SELECT view_name FROM duckdb_views() WHERE schema_name = 'raw'"
                ).fetchall()
            }
    except duckdb.Error:
        return False
    return stored == [(fingerprint,)] and set(RAW_VIEWS) <= views


def connect(settings: Settings, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection to the warehouse with the raw views in place (UTC session)."""
    path = settings.warehouse_path
    if not path.exists() or not read_only or not _has_views(path):
        ensure_catalog(settings)
    con = duckdb.connect(str(path), read_only=read_only)
    con.execute("SET TimeZone = 'UTC'")
    return con


def _has_views(path: Path) -> bool:
    with duckdb.connect(str(path), read_only=True) as con:
        found = {
            row[0]
            for row in con.sql(
                "SELECT view_name FROM duckdb_views() WHERE schema_name = 'raw'"
            ).fetchall()
        }
    return set(RAW_VIEWS) <= found


def in_memory(settings: Settings) -> duckdb.DuckDBPyConnection:
    """The raw views in a private in-memory database (no lock on the warehouse file)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for statement in view_sql(settings):
        con.execute(statement)
    return con
