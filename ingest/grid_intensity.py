"""The grid carbon-intensity table the fleet carbon mart reads, from a user's CSV.

`efficiency.grid_intensity_file` names a CSV of UTC hours and their grid intensity
(`hour_start,g_co2e_per_kwh`, e.g. exported from Electricity Maps or WattTime). It is
validated here and copied into the lake as Parquet (`reference/grid_intensity/`), so
dbt reads it like any other raw input; hours it lacks fall back to the configured
hour-of-day profile (`efficiency.grid_intensity_by_hour`). A bad row is an error naming
the file, the line and the field: carbon figures from a half-read table would be wrong
without anyone noticing.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from ingest.lake import Lake, write_json_atomic, write_parquet_atomic
from ingest.settings import Settings
from models.errors import InputError

__all__ = ["GRID_INTENSITY_SCHEMA", "read_grid_intensity_csv", "sync_grid_intensity"]

GRID_INTENSITY_SCHEMA = pa.schema(
    [("hour_start", pa.timestamp("us", tz="UTC")), ("g_co2e_per_kwh", pa.float64())]
)
_COLUMNS = ("hour_start", "g_co2e_per_kwh")


def _hour(text: str, where: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{where}: hour_start: not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise InputError(f"{where}: hour_start: needs a time zone (e.g. +00:00): {text!r}")
    moment = moment.astimezone(UTC)
    if (moment.minute, moment.second, moment.microsecond) != (0, 0, 0):
        raise InputError(f"{where}: hour_start: not the start of an hour: {text!r}")
    return moment


def read_grid_intensity_csv(path: Path) -> pa.Table:
    """The file's rows as a table; raises InputError naming the line and field."""
    if not path.is_file():
        raise InputError(f"grid intensity file {path}: does not exist")
    hours: list[datetime] = []
    values: list[float] = []
    seen: dict[datetime, int] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(
                f"grid intensity file {path}: missing column(s) {', '.join(missing)} "
                f"(expected a header hour_start,g_co2e_per_kwh)"
            )
        for row in reader:
            # The reader's own line count: blank lines it skips still count.
            line_no = reader.line_num
            where = f"grid intensity file {path}, line {line_no}"
            hour = _hour(row["hour_start"] or "", where)
            try:
                value = float(row["g_co2e_per_kwh"])
            except (TypeError, ValueError):
                raise InputError(
                    f"{where}: g_co2e_per_kwh: not a number: {row['g_co2e_per_kwh']!r}"
                ) from None
            if not math.isfinite(value) or value < 0:
                raise InputError(f"{where}: g_co2e_per_kwh: must be a finite number >= 0")
            if hour in seen:
                raise InputError(
                    f"{where}: hour_start: {hour.isoformat()} already given on line {seen[hour]}"
                )
            seen[hour] = line_no
            hours.append(hour)
            values.append(value)
    return pa.table({"hour_start": hours, "g_co2e_per_kwh": values}, schema=GRID_INTENSITY_SCHEMA)


def sync_grid_intensity(settings: Settings, lake: Lake) -> None:
    """Copy the configured file into the lake when its content changed (by SHA-256,
    kept beside the copy); remove the copy when no file is configured any more (the
    hour-of-day profile then applies everywhere)."""
    target = lake.grid_intensity / "table" / "grid_intensity.parquet"
    stamp = lake.grid_intensity / "source.json"
    source = settings.efficiency.grid_intensity_file
    if source is None:
        target.unlink(missing_ok=True)
        stamp.unlink(missing_ok=True)
        return
    if not source.is_file():
        raise InputError(f"efficiency.grid_intensity_file {source}: does not exist")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if target.exists() and stamp.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(stamp.read_text())["sha256"] == digest:
                return
    write_parquet_atomic(read_grid_intensity_csv(source), target)
    write_json_atomic({"source": str(source.resolve()), "sha256": digest}, stamp)
