"""Bad input to `gpuledger publish` and `gpuledger dashboard`, and to the efficiency
settings: one line naming the input and the field, exit 2, no traceback.

Run as real subprocesses of the installed console script, as a user would.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cli_errors import assert_one_line_error, run

pytestmark = pytest.mark.integration


def test_publish_rejects_an_unknown_table(tmp_path: Path) -> None:
    result = run(["publish", "--table", "mart_nope"], tmp_path)
    assert_one_line_error(result, 2, "--table", "mart_nope", "mart_efficiency_hourly")


def test_publish_info_without_a_snapshot_says_how_to_make_one(tmp_path: Path) -> None:
    result = run(["publish", "--info"], tmp_path)
    assert_one_line_error(result, 2, "no published snapshot", "gpuledger publish")


def test_dashboard_without_a_snapshot_names_the_catalog(tmp_path: Path) -> None:
    result = run(["dashboard", "--catalog", str(tmp_path / "missing.duckdb")], tmp_path)
    assert_one_line_error(result, 2, "--catalog", "missing.duckdb", "make demo")


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"GPULEDGER_EFFICIENCY__PUE": "0.5"}, ["efficiency.pue"]),
        ({"GPULEDGER_EFFICIENCY__ENERGY_TARIFF_PER_KWH": "cheap"}, ["energy_tariff_per_kwh"]),
        ({"GPULEDGER_EFFICIENCY__CURRENCY": "dollars"}, ["efficiency.currency"]),
    ],
)
def test_bad_efficiency_settings_name_the_field(
    tmp_path: Path, env: dict[str, str], needles: list[str]
) -> None:
    result = run(["publish", "--info"], tmp_path, **env)
    assert_one_line_error(result, 2, *needles)


def test_a_bad_grid_intensity_file_names_its_line_and_field(tmp_path: Path) -> None:
    """The file is read when a run prepares the lake (here: a publish of the catalog)."""
    grid = tmp_path / "grid.csv"
    grid.write_text("hour_start,g_co2e_per_kwh\n2026-03-01T00:30:00Z,400\n")
    result = run(
        ["allocate", "--start", "2026-03-01T00:00Z", "--hours", "1"],
        tmp_path,
        GPULEDGER_EFFICIENCY__GRID_INTENSITY_FILE=str(grid),
    )
    assert_one_line_error(result, 2, "grid.csv", "line 2", "hour_start", "start of an hour")
