"""The grid-intensity CSV (ingest/grid_intensity.py): validated, normalized to UTC hours,
copied into the lake as Parquet."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ingest.grid_intensity import (
    GRID_INTENSITY_SCHEMA,
    read_grid_intensity_csv,
    sync_grid_intensity,
)
from ingest.lake import Lake
from ingest.settings import Settings
from models.errors import InputError
from tests.conftest import build_settings

HEADER = "hour_start,g_co2e_per_kwh\n"


def write_csv(path: Path, body: str, header: str = HEADER) -> Path:
    path.write_text(header + body)
    return path


def test_good_file_is_read_with_every_offset_normalized_to_utc(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "grid.csv",
        "2026-03-01T00:00:00Z,410.5\n"
        "2026-03-01T01:00:00+00:00,0\n"
        # 04:00 at +02:00 is 02:00 UTC; 21:00 at -05:00 the day before is 02:00 + 1 h.
        "2026-03-01T04:00:00+02:00,388.25\n"
        "2026-02-28T22:00:00-05:00,12\n"
        " 2026-03-01T05:00Z , 1e2\n",
    )
    table = read_grid_intensity_csv(path)
    assert table.schema == GRID_INTENSITY_SCHEMA
    assert table.column("hour_start").to_pylist() == [
        datetime(2026, 3, 1, 0, tzinfo=UTC),
        datetime(2026, 3, 1, 1, tzinfo=UTC),
        datetime(2026, 3, 1, 2, tzinfo=UTC),
        datetime(2026, 3, 1, 3, tzinfo=UTC),
        datetime(2026, 3, 1, 5, tzinfo=UTC),
    ]
    assert table.column("g_co2e_per_kwh").to_pylist() == [410.5, 0.0, 388.25, 12.0, 100.0]


def test_header_only_file_is_an_empty_table(tmp_path: Path) -> None:
    table = read_grid_intensity_csv(write_csv(tmp_path / "grid.csv", ""))
    assert table.num_rows == 0
    assert table.schema == GRID_INTENSITY_SCHEMA


def test_missing_file_is_an_input_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.csv"
    with pytest.raises(InputError, match=re.escape(str(path))):
        read_grid_intensity_csv(path)


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        ("hour_start,g_co2e\n", "g_co2e_per_kwh"),
        ("time,g_co2e_per_kwh\n", "hour_start"),
        ("hour,intensity\n", "hour_start, g_co2e_per_kwh"),
    ],
)
def test_missing_column_names_the_file_and_the_column(
    tmp_path: Path, header: str, missing: str
) -> None:
    path = write_csv(tmp_path / "grid.csv", "2026-03-01T00:00:00Z,1\n", header=header)
    with pytest.raises(InputError) as caught:
        read_grid_intensity_csv(path)
    message = caught.value.message
    assert str(path) in message
    assert f"missing column(s) {missing} " in message


@pytest.mark.parametrize(
    ("row", "field", "detail"),
    [
        ("yesterday,1", "hour_start", "not an ISO 8601 time: 'yesterday'"),
        ("2026-03-01T25:00:00Z,1", "hour_start", "not an ISO 8601 time"),
        ("2026-03-01T00:00:00,1", "hour_start", "needs a time zone"),
        ("2026-03-01 03:00,1", "hour_start", "needs a time zone"),
        ("2026-03-01T03:30:00Z,1", "hour_start", "not the start of an hour"),
        ("2026-03-01T03:00:01+00:00,1", "hour_start", "not the start of an hour"),
        # 05:00 at +05:30 is 23:30 UTC: not a UTC hour.
        ("2026-03-01T05:00:00+05:30,1", "hour_start", "not the start of an hour"),
        (",1", "hour_start", "not an ISO 8601 time: ''"),
        ("2026-03-01T03:00:00Z,-0.5", "g_co2e_per_kwh", "must be a finite number >= 0"),
        ("2026-03-01T03:00:00Z,nan", "g_co2e_per_kwh", "must be a finite number >= 0"),
        ("2026-03-01T03:00:00Z,NaN", "g_co2e_per_kwh", "must be a finite number >= 0"),
        ("2026-03-01T03:00:00Z,inf", "g_co2e_per_kwh", "must be a finite number >= 0"),
        ("2026-03-01T03:00:00Z,lots", "g_co2e_per_kwh", "not a number: 'lots'"),
        ("2026-03-01T03:00:00Z,", "g_co2e_per_kwh", "not a number: ''"),
        ("2026-03-01T03:00:00Z", "g_co2e_per_kwh", "not a number: None"),
    ],
)
def test_bad_row_names_the_file_the_line_and_the_field(
    tmp_path: Path, row: str, field: str, detail: str
) -> None:
    path = write_csv(
        tmp_path / "grid.csv",
        f"2026-03-01T00:00:00Z,400\n2026-03-01T01:00:00Z,401\n{row}\n2026-03-01T02:00:00Z,1\n",
    )
    with pytest.raises(InputError) as caught:
        read_grid_intensity_csv(path)
    # Header is line 1, so the third row is line 4.
    assert caught.value.message.startswith(f"grid intensity file {path}, line 4: {field}: ")
    assert detail in caught.value.message


def test_duplicate_hour_names_both_lines_even_when_written_in_another_offset(
    tmp_path: Path,
) -> None:
    path = write_csv(
        tmp_path / "grid.csv",
        "2026-03-01T00:00:00Z,400\n"
        "2026-03-01T02:00:00Z,402\n"
        "2026-03-01T01:00:00Z,401\n"
        "2026-03-01T04:00:00+02:00,999\n",
    )
    with pytest.raises(InputError) as caught:
        read_grid_intensity_csv(path)
    assert caught.value.message == (
        f"grid intensity file {path}, line 5: hour_start: "
        "2026-03-01T02:00:00+00:00 already given on line 3"
    )


def test_line_number_counts_blank_lines(tmp_path: Path) -> None:
    """Guards against error line numbers drifting after a blank line in the file."""
    path = write_csv(tmp_path / "grid.csv", "2026-03-01T00:00:00Z,400\n\n2026-03-01T01:00:00Z,x\n")
    with pytest.raises(InputError, match=r", line 4: g_co2e_per_kwh: "):
        read_grid_intensity_csv(path)


# -- sync into the lake -------------------------------------------------------------------


def settings_with(tmp_path: Path, grid_file: Path | None) -> Settings:
    return build_settings(tmp_path / "state", efficiency={"grid_intensity_file": grid_file})


def lake_copy(settings: Settings) -> Path:
    return Lake(settings.lake_path).grid_intensity / "table" / "grid_intensity.parquet"


def test_sync_copies_the_file_to_the_lake_as_parquet(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "grid.csv", "2026-03-01T00:00:00Z,410\n2026-03-01T01:00Z,390\n")
    settings = settings_with(tmp_path, source)
    sync_grid_intensity(settings, Lake(settings.lake_path))
    copy = pq.read_table(lake_copy(settings))
    assert copy.schema.equals(GRID_INTENSITY_SCHEMA)
    assert copy.to_pylist() == [
        {"hour_start": datetime(2026, 3, 1, 0, tzinfo=UTC), "g_co2e_per_kwh": 410.0},
        {"hour_start": datetime(2026, 3, 1, 1, tzinfo=UTC), "g_co2e_per_kwh": 390.0},
    ]
    assert [p.name for p in lake_copy(settings).parent.iterdir()] == ["grid_intensity.parquet"]


def test_sync_skips_an_unchanged_file_and_copies_it_again_when_it_changes(
    tmp_path: Path,
) -> None:
    source = write_csv(tmp_path / "grid.csv", "2026-03-01T00:00:00Z,410\n")
    settings = settings_with(tmp_path, source)
    lake = Lake(settings.lake_path)
    sync_grid_intensity(settings, lake)
    first = lake_copy(settings).stat()

    sync_grid_intensity(settings, lake)
    again = lake_copy(settings).stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    write_csv(source, "2026-03-01T00:00:00Z,410\n2026-03-01T01:00:00Z,5\n")
    later = first.st_mtime + 10
    os.utime(source, (later, later))
    sync_grid_intensity(settings, lake)
    assert pq.read_table(lake_copy(settings)).column("g_co2e_per_kwh").to_pylist() == [410.0, 5.0]


def test_sync_of_a_bad_file_raises_and_keeps_the_previous_copy(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "grid.csv", "2026-03-01T00:00:00Z,410\n")
    settings = settings_with(tmp_path, source)
    lake = Lake(settings.lake_path)
    sync_grid_intensity(settings, lake)
    write_csv(source, "2026-03-01T00:30:00Z,410\n")
    later = lake_copy(settings).stat().st_mtime + 10
    os.utime(source, (later, later))
    with pytest.raises(InputError, match=r"line 2: hour_start: not the start of an hour"):
        sync_grid_intensity(settings, lake)
    assert pq.read_table(lake_copy(settings)).column("g_co2e_per_kwh").to_pylist() == [410.0]
    assert [p.name for p in lake_copy(settings).parent.iterdir()] == ["grid_intensity.parquet"]


def test_sync_removes_the_copy_when_the_setting_is_unset(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "grid.csv", "2026-03-01T00:00:00Z,410\n")
    configured = settings_with(tmp_path, source)
    sync_grid_intensity(configured, Lake(configured.lake_path))
    assert lake_copy(configured).is_file()

    unset = settings_with(tmp_path, None)
    sync_grid_intensity(unset, Lake(unset.lake_path))
    assert not lake_copy(unset).exists()
    sync_grid_intensity(unset, Lake(unset.lake_path))  # nothing to remove: no error
    assert not lake_copy(unset).exists()


@pytest.mark.parametrize("copied_before", [False, True])
def test_sync_of_a_configured_file_that_does_not_exist_is_an_input_error(
    tmp_path: Path, copied_before: bool
) -> None:
    """Guards against a FileNotFoundError (not an InputError) once a lake copy exists."""
    source = write_csv(tmp_path / "grid.csv", "2026-03-01T00:00:00Z,410\n")
    settings = settings_with(tmp_path, source)
    if copied_before:
        sync_grid_intensity(settings, Lake(settings.lake_path))
    source.unlink()
    with pytest.raises(InputError, match=re.escape(str(source))):
        sync_grid_intensity(settings, Lake(settings.lake_path))


def test_sync_copies_a_different_file_even_if_it_is_older_than_the_copy(tmp_path: Path) -> None:
    """Guards against a stale lake copy after the setting names another (older) file."""
    first = write_csv(tmp_path / "first.csv", "2026-03-01T00:00:00Z,410\n")
    second = write_csv(tmp_path / "second.csv", "2026-03-01T00:00:00Z,20\n")
    os.utime(second, (1_000_000_000, 1_000_000_000))  # e.g. unpacked from an archive
    settings = settings_with(tmp_path, first)
    sync_grid_intensity(settings, Lake(settings.lake_path))
    switched = settings_with(tmp_path, second)
    sync_grid_intensity(switched, Lake(switched.lake_path))
    assert pq.read_table(lake_copy(switched)).column("g_co2e_per_kwh").to_pylist() == [20.0]
