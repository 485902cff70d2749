"""Published snapshots of the marts (pipelines/analytics/publish.py): partitions rewritten
per window, a catalog renamed into place, old snapshots kept then collected."""

from __future__ import annotations

import contextlib
import importlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import pytest

from ingest.settings import Settings
from models.errors import ServiceError
from pipelines.analytics.publish import (
    PUBLISHED_TABLES,
    PublishReport,
    publish,
    snapshot_info,
    window_partitions,
)
from tests.conftest import build_settings

# The package re-exports the function `publish`, which shadows the module's name.
publish_module = importlib.import_module("pipelines.analytics.publish")

EFFICIENCY = "mart_efficiency_hourly"
FLEET = "mart_fleet_daily"
TENANT = "mart_tenant_efficiency"
INVOICES = "mart_invoices"
TABLES = [EFFICIENCY, FLEET, TENANT, INVOICES]
BY_NAME = {t.name: t for t in PUBLISHED_TABLES}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


EFFICIENCY_ROWS = [
    ("m1", utc(2026, 3, 1, 22), 100.0),
    ("m2", utc(2026, 3, 1, 23), 200.0),
    ("m1", utc(2026, 3, 2, 0), 300.0),
    ("m2", utc(2026, 3, 2, 0), 400.0),
    ("m1", utc(2026, 3, 2, 23), 500.0),
    ("m1", utc(2026, 3, 3, 5), 600.0),
]
FLEET_ROWS = [
    (date(2026, 2, 27), 1.5),
    (date(2026, 2, 28), 2.5),
    (date(2026, 3, 1), 3.5),
]
TENANT_ROWS = [
    ("2026-02", "t1", Decimal("5.000000")),
    ("2026-03", "t1", Decimal("7.250000")),
    ("2026-03", "t2", Decimal("0.125000")),
]


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return build_settings(tmp_path / "state", efficiency={"keep_snapshots": 1})


@pytest.fixture(autouse=True)
def ticking_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `datetime.now` in publish is a minute after the last: snapshot ids (which
    start with the second they were taken in) sort in publishing order."""
    ticks = (utc(2026, 3, 10) + timedelta(minutes=i) for i in range(10**6))

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return next(ticks)

    monkeypatch.setattr(publish_module, "datetime", Clock)


def write_warehouse(
    settings: Settings,
    efficiency: list[tuple[str, datetime, float]] | None = EFFICIENCY_ROWS,
    fleet: list[tuple[date, float]] | None = FLEET_ROWS,
    tenant: list[tuple[str, str, Decimal]] | None = TENANT_ROWS,
) -> None:
    """(Re)create the marts given (None: leave the table out)."""
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("CREATE SCHEMA IF NOT EXISTS marts")
        tables = {
            EFFICIENCY: ("model VARCHAR, hour_start TIMESTAMPTZ, energy_j DOUBLE", efficiency),
            FLEET: ("day DATE, metered_kwh DOUBLE", fleet),
            TENANT: ("period VARCHAR, tenant VARCHAR, billed DECIMAL(18, 6)", tenant),
        }
        for name, (columns, rows) in tables.items():
            con.execute(f"DROP TABLE IF EXISTS marts.{name}")
            if rows is None:
                continue
            con.execute(f"CREATE TABLE marts.{name} ({columns})")
            if rows:
                marks = ", ".join("?" for _ in rows[0])
                con.executemany(f"INSERT INTO marts.{name} VALUES ({marks})", rows)


def warehouse_sql(settings: Settings, query: str) -> None:
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(query)


@contextlib.contextmanager
def catalog(settings: Settings) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the published catalog, as an analyst opens it."""
    con = duckdb.connect(str(settings.analytics_path), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        yield con
    finally:
        con.close()


def view_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[Any, ...]]:
    return con.sql(f"SELECT * FROM marts.{table} ORDER BY ALL").fetchall()


def manifest(settings: Settings) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((settings.published_path / "manifest.json").read_text())
    return document


def partition_files(settings: Settings, table: str) -> dict[str, str]:
    return {key: part["file"] for key, part in manifest(settings)["tables"][table].items()}


def referenced(document: dict[str, Any]) -> set[str]:
    files = {p["file"] for parts in document["tables"].values() for p in parts.values()}
    return files | set(document["schemas"].values())


def data_files(settings: Settings) -> set[str]:
    root = settings.published_path
    return {str(p.relative_to(root)) for p in (root / "data").rglob("*.parquet")}


def full_publish(settings: Settings, **kw: Any) -> PublishReport:
    return publish(settings, tables=TABLES, wait_s=5, **kw)


# -- window_partitions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "start", "end", "keys"),
    [
        (EFFICIENCY, utc(2026, 3, 1, 5), utc(2026, 3, 1, 6), ["2026-03-01"]),
        # Crossing midnight; the end is exclusive.
        (EFFICIENCY, utc(2026, 3, 1, 22), utc(2026, 3, 2, 2), ["2026-03-01", "2026-03-02"]),
        (EFFICIENCY, utc(2026, 3, 1, 23), utc(2026, 3, 2, 0), ["2026-03-01"]),
        (EFFICIENCY, utc(2026, 3, 1), utc(2026, 3, 4), ["2026-03-01", "2026-03-02", "2026-03-03"]),
        (EFFICIENCY, utc(2026, 2, 28, 23), utc(2026, 3, 1, 1), ["2026-02-28", "2026-03-01"]),
        # Other offsets are UTC days: 01:00 +02:00 is 23:00 UTC the day before.
        (
            EFFICIENCY,
            datetime(2026, 3, 2, 1, tzinfo=timezone(timedelta(hours=2))),
            datetime(2026, 3, 2, 3, tzinfo=timezone(timedelta(hours=2))),
            ["2026-03-01", "2026-03-02"],
        ),
        (FLEET, utc(2026, 2, 28, 23), utc(2026, 3, 1, 1), ["2026-02", "2026-03"]),
        (FLEET, utc(2026, 2, 1), utc(2026, 3, 1), ["2026-02"]),
        (FLEET, utc(2025, 12, 31, 23), utc(2026, 1, 1, 1), ["2025-12", "2026-01"]),
        (FLEET, utc(2025, 11, 15), utc(2026, 2, 1), ["2025-11", "2025-12", "2026-01"]),
        (TENANT, utc(2026, 3, 1), utc(2026, 4, 1), ["2026-03"]),
        (TENANT, utc(2026, 3, 31, 23), utc(2026, 4, 1), ["2026-03"]),
        (TENANT, utc(2026, 3, 31, 23), utc(2026, 4, 1, 0, 0, 0, 1), ["2026-03", "2026-04"]),
        (INVOICES, utc(2026, 3, 1), utc(2026, 3, 2), ["all"]),
    ],
)
def test_window_partitions(table: str, start: datetime, end: datetime, keys: list[str]) -> None:
    assert window_partitions(BY_NAME[table], start, end) == keys


# -- publishing ---------------------------------------------------------------------------


def test_full_publish_publishes_every_partition_and_counts_its_rows(settings: Settings) -> None:
    write_warehouse(settings)
    report = full_publish(settings)

    assert report.missing == []
    assert report.rewritten == {
        EFFICIENCY: ["2026-03-01", "2026-03-02", "2026-03-03"],
        FLEET: ["2026-02", "2026-03"],
        TENANT: ["2026-02", "2026-03"],
        INVOICES: ["all"],
    }
    assert report.rows == {EFFICIENCY: 6, FLEET: 3, TENANT: 3, INVOICES: 0}
    assert report.catalog == settings.analytics_path.resolve()
    for table in (EFFICIENCY, FLEET, TENANT):
        assert sorted(partition_files(settings, table)) == report.rewritten[table]
        for key, file in partition_files(settings, table).items():
            assert file == f"data/{table}/{key}/{report.snapshot_id}.parquet"
    assert {(k, p["rows"]) for k, p in manifest(settings)["tables"][EFFICIENCY].items()} == {
        ("2026-03-01", 2),
        ("2026-03-02", 3),
        ("2026-03-03", 1),
    }

    with catalog(settings) as con:
        assert view_rows(con, EFFICIENCY) == sorted(EFFICIENCY_ROWS)
        assert view_rows(con, FLEET) == sorted(FLEET_ROWS)
        assert view_rows(con, TENANT) == sorted(TENANT_ROWS)
        assert view_rows(con, INVOICES) == []
        snapshot_id, tables = con.sql("SELECT snapshot_id, tables FROM main.snapshot").fetchall()[0]
        counted = {
            name: con.sql(f"SELECT count(*) FROM marts.{name}").fetchall()[0][0] for name in TABLES
        }
    assert snapshot_id == report.snapshot_id
    assert json.loads(tables) == counted == report.rows
    info = snapshot_info(settings.analytics_path)
    assert info["snapshot_id"] == report.snapshot_id
    assert info["tables"] == report.rows


def test_views_keep_the_warehouse_column_types(settings: Settings) -> None:
    write_warehouse(settings)
    full_publish(settings)
    with catalog(settings) as con:
        types = con.sql(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() "
            "WHERE schema_name = 'marts' AND table_name <> 'mart_invoices' ORDER BY ALL"
        ).fetchall()
    assert types == [
        (EFFICIENCY, "energy_j", "DOUBLE"),
        (EFFICIENCY, "hour_start", "TIMESTAMP WITH TIME ZONE"),
        (EFFICIENCY, "model", "VARCHAR"),
        (FLEET, "day", "DATE"),
        (FLEET, "metered_kwh", "DOUBLE"),
        (TENANT, "billed", "DECIMAL(18,6)"),
        (TENANT, "period", "VARCHAR"),
        (TENANT, "tenant", "VARCHAR"),
    ]


def test_windowed_publish_replaces_only_the_windows_partition(settings: Settings) -> None:
    write_warehouse(settings)
    first = full_publish(settings)
    before = {table: partition_files(settings, table) for table in TABLES}

    warehouse_sql(
        settings,
        "UPDATE marts.mart_efficiency_hourly SET energy_j = energy_j + 1 "
        "WHERE hour_start >= '2026-03-02 00:00:00+00' AND hour_start < '2026-03-03 00:00:00+00'",
    )
    # Changed too, but outside the window: must not be published yet.
    warehouse_sql(
        settings, "UPDATE marts.mart_efficiency_hourly SET energy_j = 0 WHERE energy_j = 600"
    )
    second = publish(settings, utc(2026, 3, 2, 23), utc(2026, 3, 3), tables=[EFFICIENCY])

    assert second.rewritten == {EFFICIENCY: ["2026-03-02"]}
    after = {table: partition_files(settings, table) for table in TABLES}
    assert after[EFFICIENCY] == {
        **before[EFFICIENCY],
        "2026-03-02": f"data/{EFFICIENCY}/2026-03-02/{second.snapshot_id}.parquet",
    }
    assert before[EFFICIENCY]["2026-03-02"].endswith(f"{first.snapshot_id}.parquet")
    for table in (FLEET, TENANT, INVOICES):
        assert after[table] == before[table]
    root = settings.published_path
    assert all((root / f).is_file() for files in after.values() for f in files.values())

    with catalog(settings) as con:
        assert view_rows(con, EFFICIENCY) == [
            ("m1", utc(2026, 3, 1, 22), 100.0),
            ("m1", utc(2026, 3, 2, 0), 301.0),
            ("m1", utc(2026, 3, 2, 23), 501.0),
            ("m1", utc(2026, 3, 3, 5), 600.0),
            ("m2", utc(2026, 3, 1, 23), 200.0),
            ("m2", utc(2026, 3, 2, 0), 401.0),
        ]
        assert view_rows(con, FLEET) == sorted(FLEET_ROWS)
        assert view_rows(con, TENANT) == sorted(TENANT_ROWS)
    assert snapshot_info(settings.analytics_path)["snapshot_id"] == second.snapshot_id


def test_reader_of_the_old_catalog_keeps_its_snapshot_across_a_publish(
    settings: Settings,
) -> None:
    write_warehouse(settings)
    first = full_publish(settings)
    with catalog(settings) as old:
        assert view_rows(old, EFFICIENCY) == sorted(EFFICIENCY_ROWS)

        warehouse_sql(settings, "UPDATE marts.mart_efficiency_hourly SET energy_j = -1")
        warehouse_sql(settings, "DELETE FROM marts.mart_fleet_daily WHERE day = '2026-03-01'")
        second = full_publish(settings)

        # The open connection still reads the first snapshot, whole.
        assert view_rows(old, EFFICIENCY) == sorted(EFFICIENCY_ROWS)
        assert view_rows(old, FLEET) == sorted(FLEET_ROWS)
        assert old.sql("SELECT snapshot_id FROM main.snapshot").fetchall() == [(first.snapshot_id,)]
        # A new connection reads the second. (In another process: in this one, DuckDB
        # hands connect() of a path it has open the same database instance.)
        assert read_elsewhere(
            settings.analytics_path,
            "SELECT DISTINCT energy_j FROM marts.mart_efficiency_hourly",
            "SELECT snapshot_id FROM main.snapshot",
        ) == [[[-1.0]], [[second.snapshot_id]]]
    # No temporary catalog left behind.
    assert sorted(p.name for p in settings.published_path.glob("*.duckdb*")) == ["analytics.duckdb"]


def test_snapshots_beyond_keep_snapshots_are_collected(settings: Settings) -> None:
    keep = settings.efficiency.keep_snapshots
    assert keep == 1
    write_warehouse(settings)
    reports = [full_publish(settings)]
    for i in range(4):
        warehouse_sql(
            settings,
            f"UPDATE marts.mart_efficiency_hourly SET energy_j = {i} "
            "WHERE hour_start::DATE = DATE '2026-03-02'",
        )
        reports.append(publish(settings, utc(2026, 3, 2), utc(2026, 3, 2, 1), tables=[EFFICIENCY]))

        root = settings.published_path
        current = manifest(settings)
        assert current["snapshot_id"] == reports[-1].snapshot_id
        assert all((root / f).is_file() for f in referenced(current)), "current file missing"
        kept = sorted(p.stem for p in (root / "snapshots").glob("*.json"))
        assert kept == [r.snapshot_id for r in reports[-(keep + 1) :]]
        still = set().union(
            *(referenced(json.loads((root / "snapshots" / f"{s}.json").read_text())) for s in kept)
        )
        assert data_files(settings) == still
        with catalog(settings) as con:
            assert con.sql(
                "SELECT DISTINCT energy_j FROM marts.mart_efficiency_hourly "
                "WHERE hour_start::DATE = DATE '2026-03-02'"
            ).fetchall() == [(float(i),)]

    # The first snapshot's 2026-03-02 file was superseded twice over: deleted. Its other
    # partitions are still current, so kept.
    first = reports[0].snapshot_id
    assert not (root / f"data/{EFFICIENCY}/2026-03-02/{first}.parquet").exists()
    assert (root / f"data/{EFFICIENCY}/2026-03-01/{first}.parquet").is_file()
    assert (root / f"data/{FLEET}/2026-02/{first}.parquet").is_file()
    # Each windowed publish drops one 2026-03-02 file and one schema file.
    assert [r.removed_files for r in reports] == [0, 0, 2, 2, 2]


def test_snapshots_published_within_one_second_never_collect_the_current_one(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against deleting the current snapshot's files when publishes share a second."""

    class SameSecond(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return utc(2026, 3, 10, 12)

    suffixes = iter(SimpleNamespace(hex=c * 32) for c in "fedcba")
    monkeypatch.setattr(publish_module, "datetime", SameSecond)
    monkeypatch.setattr(publish_module, "uuid", SimpleNamespace(uuid4=lambda: next(suffixes)))
    write_warehouse(settings)
    for _ in range(3):
        full_publish(settings)
    root = settings.published_path
    assert all((root / f).is_file() for f in referenced(manifest(settings)))
    with catalog(settings) as con:
        assert view_rows(con, EFFICIENCY) == sorted(EFFICIENCY_ROWS)


def test_windowed_publish_removes_a_partition_whose_rows_disappeared(settings: Settings) -> None:
    write_warehouse(settings)
    full_publish(settings)
    warehouse_sql(
        settings,
        "DELETE FROM marts.mart_efficiency_hourly WHERE hour_start::DATE = DATE '2026-03-02'",
    )
    warehouse_sql(settings, "DELETE FROM marts.mart_tenant_efficiency WHERE period = '2026-02'")
    report = publish(
        settings, utc(2026, 2, 28, 23), utc(2026, 3, 2, 1), tables=[EFFICIENCY, TENANT]
    )

    assert report.rewritten == {
        EFFICIENCY: ["2026-02-28", "2026-03-01", "2026-03-02"],
        TENANT: ["2026-02", "2026-03"],
    }
    assert sorted(partition_files(settings, EFFICIENCY)) == ["2026-03-01", "2026-03-03"]
    assert sorted(partition_files(settings, TENANT)) == ["2026-03"]
    assert report.rows[EFFICIENCY] == 3
    assert report.rows[TENANT] == 2
    with catalog(settings) as con:
        assert view_rows(con, EFFICIENCY) == [
            ("m1", utc(2026, 3, 1, 22), 100.0),
            ("m1", utc(2026, 3, 3, 5), 600.0),
            ("m2", utc(2026, 3, 1, 23), 200.0),
        ]
        assert view_rows(con, TENANT) == sorted(TENANT_ROWS[1:])
        tables = json.loads(con.sql("SELECT tables FROM main.snapshot").fetchall()[0][0])
    assert tables[EFFICIENCY] == 3


def test_a_table_emptied_in_the_window_is_an_empty_view_with_its_columns(
    settings: Settings,
) -> None:
    write_warehouse(settings)
    full_publish(settings)
    warehouse_sql(settings, "DELETE FROM marts.mart_fleet_daily")
    publish(settings, utc(2026, 2, 1), utc(2026, 4, 1), tables=[FLEET])
    assert partition_files(settings, FLEET) == {}
    with catalog(settings) as con:
        assert view_rows(con, FLEET) == []
        assert [c[0] for c in con.sql("DESCRIBE marts.mart_fleet_daily").fetchall()] == [
            "day",
            "metered_kwh",
        ]


def test_full_publish_removes_a_partition_whose_rows_disappeared(settings: Settings) -> None:
    """Guards against a full republish serving rows the warehouse no longer has."""
    write_warehouse(settings)
    full_publish(settings)
    warehouse_sql(
        settings,
        "DELETE FROM marts.mart_efficiency_hourly WHERE hour_start::DATE = DATE '2026-03-02'",
    )
    report = full_publish(settings)
    assert report.rows[EFFICIENCY] == 3
    with catalog(settings) as con:
        assert len(view_rows(con, EFFICIENCY)) == 3


def test_a_table_missing_from_the_warehouse_is_reported(settings: Settings) -> None:
    write_warehouse(settings, fleet=None)
    report = publish(settings, tables=[EFFICIENCY, FLEET, "mart_data_quality"], wait_s=5)
    assert report.missing == [FLEET, "mart_data_quality"]
    assert set(report.rewritten) == {EFFICIENCY}
    with catalog(settings) as con:
        views = con.sql(
            "SELECT view_name FROM duckdb_views() WHERE schema_name = 'marts' ORDER BY 1"
        ).fetchall()
    assert views == [(EFFICIENCY,)]


def test_without_a_warehouse_every_warehouse_table_is_missing(settings: Settings) -> None:
    assert not settings.warehouse_path.exists()
    report = full_publish(settings)
    assert report.missing == [EFFICIENCY, FLEET, TENANT]
    assert report.rows == {INVOICES: 0}
    assert not settings.warehouse_path.exists()  # publishing never creates it


READ_ELSEWHERE = """
import json, sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print(json.dumps([con.sql(q).fetchall() for q in sys.argv[2:]]))
"""


def read_elsewhere(catalog_path: Path, *queries: str) -> Any:
    """The rows of `queries` on `catalog_path`, read by a new process (a new analyst)."""
    done = subprocess.run(
        [sys.executable, "-c", READ_ELSEWHERE, str(catalog_path), *queries],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(done.stdout)


HOLD_LOCK = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


@contextlib.contextmanager
def warehouse_locked(settings: Settings, hold_s: float) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the warehouse's write lock for `hold_s` seconds."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(settings.warehouse_path), str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_publish_waits_for_the_warehouse_lock(settings: Settings) -> None:
    write_warehouse(settings)
    with warehouse_locked(settings, hold_s=2.0) as holder:
        began = time.monotonic()
        report = publish(settings, tables=[EFFICIENCY], wait_s=30)
        waited = time.monotonic() - began
        assert holder.wait(timeout=10) == 0
    assert waited > 1.0, "published while the warehouse was locked"
    assert report.rows == {EFFICIENCY: 6}


def test_publish_gives_up_on_a_locked_warehouse_after_wait_s(settings: Settings) -> None:
    write_warehouse(settings)
    with warehouse_locked(settings, hold_s=30.0):
        began = time.monotonic()
        with pytest.raises(ServiceError) as caught:
            publish(settings, tables=[EFFICIENCY], wait_s=0.5)
        waited = time.monotonic() - began
    assert 0.5 <= waited < 10
    assert f"cannot open the warehouse {settings.warehouse_path}" in caught.value.message
    assert "lock" in caught.value.message.lower()
    assert not settings.analytics_path.exists()


def test_current_catalog_opens_the_new_snapshot_while_the_old_is_held_in_process(
    settings: Settings,
) -> None:
    """Guards against a long-running reader process (the dashboard) seeing an old
    snapshot because DuckDB shares one database per path within a process."""
    from pipelines.analytics.publish import current_catalog

    write_warehouse(settings)
    first = full_publish(settings)
    held = duckdb.connect(str(settings.analytics_path), read_only=True)
    try:
        write_warehouse(settings, fleet=[(date(2026, 3, 1), 9.0)])
        second = full_publish(settings)
        named = current_catalog(settings.analytics_path)
        assert named.name == f"{second.snapshot_id}.duckdb"
        with duckdb.connect(str(named), read_only=True) as con:
            [(snapshot,)] = con.sql("SELECT snapshot_id FROM main.snapshot").fetchall()
            assert snapshot == second.snapshot_id
            assert view_rows(con, FLEET) == [(date(2026, 3, 1), 9.0)]
        # The held connection keeps the snapshot it opened.
        [(old,)] = held.sql("SELECT snapshot_id FROM main.snapshot").fetchall()
        assert old == first.snapshot_id
    finally:
        held.close()
    # Without the publisher's manifest beside it, a catalog path is opened as given.
    assert current_catalog(Path("/nonexistent/analytics.duckdb")) == Path(
        "/nonexistent/analytics.duckdb"
    )
