"""FOCUS 1.2 files: a `models.focus.focus_frame` frame as `focus.csv` and `focus.parquet`.

Both files hold the same rows and columns (`models.focus.FOCUS_COLUMN_NAMES`, FOCUS
columns first, then the x_ columns), in the forms the FinOps Foundation's
focus-validator 2.2.1 accepts for FOCUS 1.2:

- Parquet keeps the frame's types: money and quantities DECIMAL(38, 18), timestamps
  TIMESTAMP WITH TIME ZONE (UTC), strings, x_Tier INT32.
- CSV (UTF-8, comma, header row, "\\n" line ends, RFC 4180 quoting): a null is an empty
  field; timestamps are `2026-03-01T00:00:00Z` (FOCUS date/time format: UTC, whole
  seconds, `Z`); decimals are the Decimal's digits without trailing zeros (`0.5`, `-12`,
  never `5E-1` and never through float), so the file reads back exactly.

Each file is written under a temporary name in its directory, fsync'ed and renamed, so
a reader sees the old file or the new one, never half of one (`ingest.lake.atomic_path`).
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from ingest.lake import atomic_path
from models.focus import FOCUS_COLUMN_NAMES, SCHEMA

__all__ = ["CSV_NAME", "PARQUET_NAME", "focus_bytes", "read_focus_csv", "write_focus"]

CSV_NAME = "focus.csv"
PARQUET_NAME = "focus.parquet"
#: FOCUS's date/time format (DateTimeFormat-A-004..006): date T time, seconds, Z.
CSV_DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def _check_columns(frame: pl.DataFrame) -> None:
    if tuple(frame.columns) != FOCUS_COLUMN_NAMES:
        missing = [name for name in FOCUS_COLUMN_NAMES if name not in frame.columns]
        extra = [name for name in frame.columns if name not in FOCUS_COLUMN_NAMES]
        raise ValueError(
            "FOCUS frame: columns must be models.focus.FOCUS_COLUMN_NAMES in order "
            f"(missing {missing}, unexpected {extra}); build it with focus_frame"
        )
    wrong = [name for name, dtype in SCHEMA.items() if frame.schema[name] != dtype]
    if wrong:
        raise ValueError(
            f"FOCUS frame: columns {wrong} do not have the types of models.focus.SCHEMA"
        )


def _csv_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """Decimals as their shortest exact text: Decimal(38, 18) would print 18 places."""
    decimals = [name for name, dtype in frame.schema.items() if isinstance(dtype, pl.Decimal)]
    return frame.with_columns(
        pl.col(name)
        .cast(pl.String)
        # "0.500000" -> "0.5", "12.000" -> "12.0": one decimal place at least, so a
        # reader (the validator's among them) types the column Decimal, not integer.
        .str.replace(r"(\.[0-9]*?[0-9])0+$", "${1}")
        for name in decimals
    )


def focus_bytes(frame: pl.DataFrame) -> tuple[bytes, bytes]:
    """The CSV and Parquet encodings of a FOCUS frame, in memory."""
    _check_columns(frame)
    csv_data = _csv_frame(frame).write_csv(
        datetime_format=CSV_DATETIME_FORMAT, line_terminator="\n", null_value=""
    )
    buffer = io.BytesIO()
    # Statistics on: readers (DuckDB, the validator) prune by them; zstd as in the lake.
    frame.write_parquet(buffer, compression="zstd", statistics=True)
    return csv_data.encode("utf-8"), buffer.getvalue()


def write_focus(frame: pl.DataFrame, directory: Path) -> tuple[Path, Path]:
    """Write `focus.csv` and `focus.parquet` into `directory` (created if missing),
    each atomically; returns (csv path, parquet path)."""
    csv_data, parquet_data = focus_bytes(frame)
    csv_path, parquet_path = directory / CSV_NAME, directory / PARQUET_NAME
    for path, data in ((csv_path, csv_data), (parquet_path, parquet_data)):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return csv_path, parquet_path


def read_focus_csv(path: Path) -> pl.DataFrame:
    """A `focus.csv` read back with the frame's exact types (Decimal, UTC timestamps)."""
    text_schema = {name: pl.String() for name in FOCUS_COLUMN_NAMES}
    raw = pl.read_csv(path, schema=text_schema)
    return raw.with_columns(
        pl.col(name).str.to_datetime(CSV_DATETIME_FORMAT, time_unit="us", time_zone="UTC")
        if dtype == pl.Datetime("us", "UTC")
        else pl.col(name).cast(dtype)
        for name, dtype in SCHEMA.items()
    )
