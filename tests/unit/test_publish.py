"""Published snapshots of the marts (pipelines/analytics/publish.py): partitions rewritten
per window, a catalog renamed into place, old snapshots kept then collected."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import pytest

import pipelines.analytics.publish as publish_module
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


