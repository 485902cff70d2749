"""Published snapshots of the marts: what analysts and the dashboard read.

Why not the warehouse itself: a DuckDB file admits one writing process, and a reader
that opens it while dbt writes gets a lock error (or, holding it open, blocks the next
scheduled run). So after each run the marts it changed are published:

    <published>/data/<table>/<partition>/<snapshot>.parquet   immutable, written once
    <published>/snapshots/<snapshot>.json                     the files of a snapshot
    <published>/catalogs/<snapshot>.duckdb                    its catalog
    <published>/analytics.duckdb                              the current catalog

A snapshot rewrites only the partitions (UTC days, or billing periods) its window
touched, then writes a new catalog — a small DuckDB file of views over exactly the
snapshot's files, plus `main.snapshot` (its id, time and row counts) — beside the old
one, and renames it over `analytics.duckdb`. A reader that opened the catalog keeps the
snapshot it opened (the old file lives on while open; its Parquet files are kept for
`efficiency.keep_snapshots` more snapshots); the next connection sees the new one. No
reader ever takes a lock a writer needs, and no reader sees half a run. Publishing holds
an exclusive lock on `<published>/.lock`, so concurrent runs publish one after another.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import duckdb

from ingest.lake import (
    TMP_SUFFIX,
    atomic_path,
    fsync_dir,
    remove_stale_tmp,
    write_parquet_atomic,
)
from ingest.settings import Settings
from ingest.stack.process import locked
from models.errors import ServiceError
from pipelines.billing.index import invoice_index

__all__ = [
    "PUBLISHED_TABLES",
    "PublishReport",
    "PublishedTable",
    "current_catalog",
    "publish",
    "snapshot_info",
]

Grain = Literal["day", "month", "period", "all"]


@dataclass(frozen=True)
class PublishedTable:
    """A table analysts read: its source, and how it is cut into partitions."""

    name: str
    #: The column partitions are cut on, and the grain: `day` (a timestamp's UTC day),
    #: `month` (a date's month), `period` (a YYYY-MM column) or `all` (one partition).
    column: str | None
    grain: Grain
    #: Where the rows come from: the warehouse's `marts` schema, or the invoice store.
    source: Literal["warehouse", "invoices"] = "warehouse"
    #: Built by the monthly run (after the invoices), not the hourly one.
    monthly: bool = False


PUBLISHED_TABLES: tuple[PublishedTable, ...] = (
    PublishedTable("mart_efficiency_hourly", "hour_start", "day"),
    PublishedTable("mart_data_quality", "hour_start", "day"),
    PublishedTable("mart_fleet_daily", "day", "month"),
    PublishedTable("fct_gpu_hourly", "hour_start", "day"),
    PublishedTable("fct_tenant_usage_hourly", "event_hour", "day"),
    PublishedTable("fct_request_allocation", "event_hour", "day"),
    PublishedTable("dq_orphan_requests", "event_hour", "day"),
    PublishedTable("mart_tenant_efficiency", "period", "period", monthly=True),
    PublishedTable("mart_invoices", None, "all", source="invoices"),
)
_BY_NAME = {t.name: t for t in PUBLISHED_TABLES}
#: Seconds to wait for the warehouse while a dbt run holds its write lock.
WAREHOUSE_WAIT_S = 300.0


@dataclass
class PublishReport:
    snapshot_id: str
    published_at: datetime
    catalog: Path
    #: Per table: partitions rewritten in this snapshot.
    rewritten: dict[str, list[str]] = field(default_factory=dict)
    #: Per table: rows in the whole snapshot.
    rows: dict[str, int] = field(default_factory=dict)
    #: Tables the warehouse does not have yet (no run built them).
    missing: list[str] = field(default_factory=list)
    removed_files: int = 0
    seconds: float = 0.0


def _partition_expr(table: PublishedTable) -> str:
    column = f'"{table.column}"'
    if table.grain == "day":
        return f"strftime({column}, '%Y-%m-%d')"
    if table.grain == "month":
        return f"strftime({column}, '%Y-%m')"
    if table.grain == "period":
        return column
    return "'all'"


def window_partitions(table: PublishedTable, start: datetime, end: datetime) -> list[str]:
    """The partition keys of `table` that the window [start, end) touches."""
    if table.grain == "all":
        return ["all"]
    first = start.astimezone(UTC)
    last = (end - timedelta(microseconds=1)).astimezone(UTC)
    if table.grain == "day":
        days = (last.date() - first.date()).days
        return [(first.date() + timedelta(days=i)).isoformat() for i in range(days + 1)]
    keys = []
    year, month = first.year, first.month
    while (year, month) <= (last.year, last.month):
        keys.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return keys


def _open_warehouse(settings: Settings, wait_s: float) -> duckdb.DuckDBPyConnection | None:
    """The warehouse, read-only, waiting while a dbt run holds its lock; None if it
    does not exist yet."""
    path = settings.warehouse_path
    if not path.exists():
        return None
    deadline = time.monotonic() + wait_s
    delay = 0.2
    while True:
        try:
            con = duckdb.connect(str(path), read_only=True)
            con.execute("SET TimeZone = 'UTC'")
            return con
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise ServiceError(
                    f"publish: cannot open the warehouse {path} read-only: {exc}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _current_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        return {"snapshot_id": None, "tables": {}}
    return json.loads(path.read_text())


def _marts_present(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        row[0]
        for row in con.sql(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'marts'"
        ).fetchall()
    }


def _write_partition(
    con: duckdb.DuckDBPyConnection, table: PublishedTable, key: str | None, final: Path
) -> int:
    where = "" if key is None else f"WHERE {_partition_expr(table)} = $key"
    query = f'SELECT * FROM marts."{table.name}" {where}'
    relation = con.sql(query, params={"key": key} if key is not None else None)
    arrow = relation.to_arrow_table()
    if key is not None and arrow.num_rows == 0:
        return 0
    write_parquet_atomic(arrow, final)
    return arrow.num_rows


def _all_partitions(con: duckdb.DuckDBPyConnection, table: PublishedTable) -> list[str]:
    rows = con.sql(
        f'SELECT DISTINCT {_partition_expr(table)} FROM marts."{table.name}" ORDER BY 1'
    ).fetchall()
    return [str(r[0]) for r in rows if r[0] is not None]


def publish(
    settings: Settings,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    tables: Iterable[str] | None = None,
    wait_s: float = WAREHOUSE_WAIT_S,
) -> PublishReport:
    """Publish a new snapshot: the partitions of `tables` (default: all published
    tables) that [start, end) touches, or every partition when no window is given."""
    began = time.perf_counter()
    chosen = [_BY_NAME[name] for name in tables] if tables is not None else list(PUBLISHED_TABLES)
    root = settings.published_path.resolve()
    snapshot_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:8]
    with locked(root / ".lock"):
        remove_stale_tmp(root)
        remove_stale_tmp(root / "catalogs")
        manifest = _current_manifest(root)
        tables_state: dict[str, dict[str, dict[str, Any]]] = {
            name: dict(parts) for name, parts in manifest.get("tables", {}).items()
        }
        schemas: dict[str, str] = dict(manifest.get("schemas", {}))
        report = PublishReport(snapshot_id, datetime.now(UTC), root / "analytics.duckdb")
        warehouse = (
            _open_warehouse(settings, wait_s)
            if any(t.source == "warehouse" for t in chosen)
            else None
        )
        try:
            present = _marts_present(warehouse) if warehouse is not None else set()
            for table in chosen:
                data_dir = root / "data" / table.name
                if table.source == "invoices":
                    frame = invoice_index(settings)
                    final = data_dir / "all" / f"{snapshot_id}.parquet"
                    write_parquet_atomic(frame.to_arrow(), final)
                    tables_state[table.name] = {
                        "all": {"file": str(final.relative_to(root)), "rows": frame.height}
                    }
                    report.rewritten[table.name] = ["all"]
                    continue
                if warehouse is None or table.name not in present:
                    report.missing.append(table.name)
                    continue
                schema_file = data_dir / "_schema" / f"{snapshot_id}.parquet"
                write_parquet_atomic(
                    warehouse.sql(f'SELECT * FROM marts."{table.name}" LIMIT 0').to_arrow_table(),
                    schema_file,
                )
                schemas[table.name] = str(schema_file.relative_to(root))
                parts = tables_state.setdefault(table.name, {})
                keys = (
                    # Every partition the warehouse has, and those published before
                    # (a partition emptied since is removed from the snapshot).
                    sorted(set(_all_partitions(warehouse, table)) | set(parts))
                    if start is None or end is None
                    else window_partitions(table, start, end)
                )
                for key in keys:
                    final = data_dir / key / f"{snapshot_id}.parquet"
                    rows = _write_partition(
                        warehouse, table, None if table.grain == "all" else key, final
                    )
                    if rows:
                        parts[key] = {"file": str(final.relative_to(root)), "rows": rows}
                    else:
                        parts.pop(key, None)
                report.rewritten[table.name] = keys
        finally:
            if warehouse is not None:
                warehouse.close()
        document = {
            "snapshot_id": snapshot_id,
            # Snapshots are ordered by this, not by id or clock (publishes are serialized
            # by the lock, so it only grows).
            "sequence": int(manifest.get("sequence", 0)) + 1,
            "published_at": report.published_at.isoformat(),
            "window": [
                start.isoformat() if start else None,
                end.isoformat() if end else None,
            ],
            "tables": tables_state,
            "schemas": schemas,
        }
        report.rows = {
            name: sum(int(p["rows"]) for p in parts.values())
            for name, parts in tables_state.items()
        }
        _write_catalog(root, document, report.rows)
        snapshots = root / "snapshots"
        snapshots.mkdir(parents=True, exist_ok=True)
        with atomic_path(snapshots / f"{snapshot_id}.json") as tmp:
            tmp.write_text(json.dumps(document, indent=1, sort_keys=True))
        with atomic_path(root / "manifest.json") as tmp:
            tmp.write_text(json.dumps(document, indent=1, sort_keys=True))
        report.removed_files = _collect_garbage(
            root, settings.efficiency.keep_snapshots, snapshot_id
        )
    report.seconds = time.perf_counter() - began
    return report


def _sql_list(paths: Sequence[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _write_catalog(root: Path, document: dict[str, Any], rows: dict[str, int]) -> None:
    """The snapshot's catalog as `catalogs/<snapshot>.duckdb`, then the same file
    (a hard link) renamed over `analytics.duckdb`."""
    final = root / "analytics.duckdb"
    named = root / "catalogs" / f"{document['snapshot_id']}.duckdb"
    named.parent.mkdir(parents=True, exist_ok=True)
    tmp = named.with_name(f".{named.name}{TMP_SUFFIX}")
    link = root / f".analytics-{document['snapshot_id']}.duckdb{TMP_SUFFIX}"
    try:
        with duckdb.connect(str(tmp)) as con:
            con.execute("SET TimeZone = 'UTC'")
            con.execute("CREATE SCHEMA marts")
            for name in sorted(set(document["tables"]) | set(document["schemas"])):
                parts = document["tables"].get(name, {})
                files = [root / p["file"] for _, p in sorted(parts.items())]
                if name in document["schemas"]:
                    files.insert(0, root / document["schemas"][name])
                if not files:
                    continue
                con.execute(
                    f'CREATE VIEW marts."{name}" AS SELECT * FROM read_parquet('
                    f"{_sql_list(files)}, union_by_name = true, hive_partitioning = false)"
                )
            con.execute(
                "CREATE TABLE main.snapshot AS SELECT $id AS snapshot_id, "
                "$at::TIMESTAMPTZ AS published_at, $tables AS tables",
                {
                    "id": document["snapshot_id"],
                    "at": document["published_at"],
                    "tables": json.dumps(rows, sort_keys=True),
                },
            )
            con.execute("CHECKPOINT")
        wal = tmp.with_name(tmp.name + ".wal")
        if wal.exists():
            raise ServiceError(f"publish: {wal} was left behind; the catalog is not whole")
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(named)
        os.link(named, link)
        link.replace(final)
        fsync_dir(named.parent)
        fsync_dir(root)
    finally:
        for leftover in (tmp, link):
            leftover.unlink(missing_ok=True)


def _collect_garbage(root: Path, keep: int, current: str) -> int:
    """Delete what no kept snapshot names: data files and per-snapshot catalogs of all
    but the current snapshot and the `keep` before it (by sequence)."""
    documents = []
    for path in (root / "snapshots").glob("*.json"):
        document = json.loads(path.read_text())
        documents.append(
            (int(document.get("sequence", 0)), document["snapshot_id"], path, document)
        )
    documents.sort(key=lambda item: item[:2])
    kept = documents[-(keep + 1) :]
    kept += [d for d in documents if d[1] == current and d not in kept]
    dropped = [d for d in documents if d not in kept]
    referenced: set[str] = set()
    for _, _, _, document in kept:
        for parts in document.get("tables", {}).values():
            referenced.update(p["file"] for p in parts.values())
        referenced.update(document.get("schemas", {}).values())
    removed = 0
    data = root / "data"
    if data.is_dir():
        for path in data.rglob("*.parquet"):
            if str(path.relative_to(root)) not in referenced:
                path.unlink()
                removed += 1
    for _, snapshot_id, path, _ in dropped:
        (root / "catalogs" / f"{snapshot_id}.duckdb").unlink(missing_ok=True)
        path.unlink()
    return removed


def current_catalog(path: Path) -> Path:
    """The catalog file of the current snapshot, by its own name
    (`<published>/catalogs/<snapshot>.duckdb`), or `path` itself when the publisher's
    manifest is not beside it.

    Processes that open many connections over time (the dashboard) open this, not
    `analytics.duckdb`: DuckDB shares one database per path within a process, so while
    any connection to `analytics.duckdb` is open, a new one would see that old
    snapshot; a path per snapshot always opens the snapshot it names.
    """
    manifest = path.parent / "manifest.json"
    try:
        snapshot_id = json.loads(manifest.read_text())["snapshot_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return path
    named = path.parent / "catalogs" / f"{snapshot_id}.duckdb"
    return named if named.is_file() else path


def snapshot_info(catalog: Path) -> dict[str, Any]:
    """The current snapshot of a catalog file: id, time and row counts per table."""
    with duckdb.connect(str(catalog), read_only=True) as con:
        rows = con.sql("SELECT snapshot_id, published_at, tables FROM main.snapshot").fetchall()
    if not rows:
        raise ServiceError(f"{catalog}: holds no snapshot")
    row = rows[0]
    return {"snapshot_id": row[0], "published_at": row[1], "tables": json.loads(row[2])}
