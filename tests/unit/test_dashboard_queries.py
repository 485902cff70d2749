"""The dashboard's panel queries over a small synthetic catalog with known figures."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from dashboards import queries
from tests.dashboard_catalog import write_synthetic_catalog

MARTS = (
    "mart_efficiency_hourly",
    "mart_tenant_efficiency",
    "mart_fleet_daily",
    "mart_data_quality",
    "mart_invoices",
    "fct_tenant_usage_hourly",
    "fct_gpu_hourly",
)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("published") / "analytics.duckdb"
    return path, write_synthetic_catalog(path)


@pytest.fixture
def con(catalog: tuple[Path, dict[str, Any]]) -> Iterator[duckdb.DuckDBPyConnection]:
    with queries.open_catalog(catalog[0]) as connection:
        yield connection


@pytest.fixture
def empty_con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """Every contract relation present and empty, the snapshot row included."""
    path = tmp_path / "analytics.duckdb"
    write_synthetic_catalog(path)
    writer = duckdb.connect(str(path))
    for name in MARTS:
        writer.sql(f"delete from marts.{name}")
    writer.sql("delete from main.snapshot")
    writer.close()
    with queries.open_catalog(path) as connection:
        yield connection


def test_headline_figures(con: duckdb.DuckDBPyConnection, catalog: tuple[Path, Any]) -> None:
    expected = catalog[1]
    row = queries.headline(con).row(0, named=True)
    assert row["j_per_output_token"] == pytest.approx(
        expected["fleet_j_per_output_token"], rel=1e-12
    )
    assert row["output_tokens"] == expected["output_tokens"]
    assert row["metered_kwh"] == pytest.approx(expected["metered_kwh"], rel=1e-12)
    assert row["kg_co2e"] == pytest.approx(expected["kg_co2e"], rel=1e-12)
    assert row["tenants"] == expected["tenants"]
    assert row["snapshot_id"] == expected["snapshot_id"]


def test_fleet_j_per_token_is_energy_weighted(con: duckdb.DuckDBPyConnection) -> None:
    # Guards against averaging hourly ratios: 2.5 and 5.0 J/token average to 3.75,
    # but 4.0 MJ over 1.0 M tokens is 4.0 J/token.
    frame = queries.fleet_efficiency(
        con, date(2026, 3, 1), date(2026, 3, 1), ["llama-3-70b"], grain="day"
    )
    assert_frame_equal(
        frame.select("period_start", "series", "j_per_output_token", "utilization"),
        pl.DataFrame(
            {
                "period_start": [datetime(2026, 3, 1, tzinfo=UTC)],
                "series": ["llama-3-70b · H100"],
                "j_per_output_token": [4.0],
                # time-weighted: both hours cover 7200 GPU-s
                "utilization": [0.375],
            }
        ),
        check_dtypes=False,
        check_exact=False,
        rel_tol=1e-12,
    )


def test_hours_without_output_tokens_have_no_j_per_token(
    con: duckdb.DuckDBPyConnection,
) -> None:
    frame = queries.fleet_efficiency(con, date(2026, 3, 2), date(2026, 3, 2), ["llama-3-8b"])
    assert frame["j_per_output_token"].to_list() == [None]
    assert frame["energy_j"].to_list() == [600e3]


def test_no_traffic_hours_stay_out_of_efficiency_but_count_as_idle(
    con: duckdb.DuckDBPyConnection,
) -> None:
    efficiency = queries.fleet_efficiency(con, grain="day")
    assert queries.NO_TRAFFIC not in efficiency["model"].to_list()
    idle = queries.idle_energy(con, date(2026, 3, 2), date(2026, 3, 2), grain="day")
    assert idle["no_traffic_kwh"].to_list() == [pytest.approx(2000e3 / 3.6e6)]


def test_models_filter_and_bounds(con: duckdb.DuckDBPyConnection, catalog: tuple) -> None:
    assert queries.models(con) == catalog[1]["models"]
    assert queries.date_bounds(con) == (date(2026, 3, 1), date(2026, 3, 2))
    series = queries.efficiency_by_series(con, models=["llama-3-8b"])
    assert series.select("model", "gpu_type").rows() == [("llama-3-8b", "A100")]
    assert series["j_per_output_token"][0] == pytest.approx(500e3 / 1100e3)


def test_top_tenants_order_and_money(con: duckdb.DuckDBPyConnection, catalog: tuple) -> None:
    by_cost = queries.top_tenants_by_cost(con)
    by_energy = queries.top_tenants_by_energy(con)
    assert by_cost["tenant"].to_list() == catalog[1]["top_tenants_by_cost"]
    assert by_energy["tenant"].to_list() == catalog[1]["top_tenants_by_energy"]
    assert isinstance(by_cost.schema["cost_to_serve"], pl.Decimal)
    acme = by_cost.filter(pl.col("tenant") == "acme").row(0, named=True)
    assert acme["cost_to_serve"] == Decimal("120.500000")
    assert acme["billed"] == Decimal("150.000000")
    assert acme["margin"] == Decimal("29.500000")
    assert acme["j_per_output_token"] == 3_000_000.0 / 1000
    globex = by_cost.filter(pl.col("tenant") == "globex").row(0, named=True)
    assert globex["billed"] is None
    assert queries.top_tenants_by_cost(con, limit=1)["tenant"].to_list() == ["initech"]


def test_invoices_by_period(con: duckdb.DuckDBPyConnection, catalog: tuple) -> None:
    documents = queries.invoices(con)
    assert documents["period"].unique(maintain_order=True).to_list() == catalog[1]["periods"]
    march = queries.invoices(con, date(2026, 3, 1), date(2026, 3, 31))
    assert march["tenant"].to_list() == ["acme", "initech"]
    totals = queries.invoices_by_period(con)
    assert totals.filter(pl.col("period") == "2026-02")["total"].sum() == Decimal(0)
    files = queries.invoice_files(documents["folder"][0])
    assert sorted(files) == sorted(queries.INVOICE_FILES)


def test_data_quality_coverage_is_time_weighted(con: duckdb.DuckDBPyConnection) -> None:
    day = queries.data_quality(con, date(2026, 3, 1), date(2026, 3, 1), grain="day")
    assert day["telemetry_coverage"][0] == pytest.approx(1 - 2 * 1_080 / (24 * 25_200))
    assert day["counter_resets"][0] == 1
    assert day["orphan_requests"][0] == 4


def test_money_text_two_decimals_half_up() -> None:
    frame = pl.DataFrame(
        {"amount": [Decimal("1234.005000"), Decimal("-0.004999"), None]},
        schema={"amount": pl.Decimal(18, 6)},
    )
    assert queries.money_text(frame, ["amount"])["amount"].to_list() == [
        "1,234.01",
        "-0.00",
        "—",
    ]


def test_empty_catalog_gives_empty_frames(empty_con: duckdb.DuckDBPyConnection) -> None:
    # Guards against a crash on a fresh snapshot with no invoices or no traffic yet.
    row = queries.headline(empty_con).row(0, named=True)
    assert row["j_per_output_token"] is None
    assert (row["metered_kwh"], row["output_tokens"], row["tenants"]) == (0, 0, 0)
    assert row["snapshot_id"] is None
    assert queries.date_bounds(empty_con) == (None, None)
    assert queries.models(empty_con) == []
    assert queries.snapshot(empty_con).is_empty()
    for frame in (
        queries.fleet_efficiency(empty_con),
        queries.efficiency_by_series(empty_con),
        queries.idle_energy(empty_con),
        queries.fleet_daily(empty_con),
        queries.top_tenants_by_cost(empty_con),
        queries.top_tenants_by_energy(empty_con),
        queries.invoices(empty_con),
        queries.invoices_by_period(empty_con),
        queries.data_quality(empty_con),
    ):
        assert frame.is_empty()


def test_catalog_is_opened_read_only(catalog: tuple[Path, Any]) -> None:
    with queries.open_catalog(catalog[0]) as connection, pytest.raises(duckdb.Error):
        connection.sql("create table main.scratch (x int)")


def test_dashboard_command_argv(catalog: tuple[Path, Any], tmp_path: Path) -> None:
    from pipelines.cli.dashboard import DASHBOARD_APP, dashboard_command
    from tests.conftest import build_settings

    argv = dashboard_command(build_settings(tmp_path / "state"), catalog[0], "127.0.0.1", 8999)
    assert DASHBOARD_APP.is_file()
    assert argv[1:5] == ["-m", "streamlit", "run", str(DASHBOARD_APP)]
    assert argv[argv.index("--server.port") + 1] == "8999"
    assert argv[-2:] == ["--catalog", str(catalog[0].resolve())]


def test_a_new_connection_sees_a_replaced_snapshot(tmp_path: Path) -> None:
    # Guards against holding a connection across page loads: the publisher swaps the file.
    path = tmp_path / "analytics.duckdb"
    old_id = write_synthetic_catalog(path)["snapshot_id"]
    with queries.open_catalog(path) as first:
        assert queries.snapshot(first)["snapshot_id"].to_list() == [old_id]
    newer = tmp_path / "next" / "analytics.duckdb"
    write_synthetic_catalog(newer)
    writer = duckdb.connect(str(newer))
    writer.sql("update main.snapshot set snapshot_id = 'snap-newer'")
    writer.close()
    newer.replace(path)
    with queries.open_catalog(path) as second:
        assert queries.snapshot(second)["snapshot_id"].to_list() == ["snap-newer"]
