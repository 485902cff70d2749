"""Reading a real request trace (CSV or JSON Lines) to replay through the simulator.

Columns are named by options, defaulting to the Mooncake trace's names
(`timestamp` in ms, `input_length`, `output_length`). Optional columns give the tenant,
the model and cached prompt tokens; without them the simulator assigns tenants and
models (see `workload.trace_arrivals`) and treats no prompt token as cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from models.errors import InputError

TimeUnit = Literal["s", "ms", "us", "ns", "iso"]
_UNIT_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


@dataclass(frozen=True)
class TraceColumns:
    time: str = "timestamp"
    time_unit: TimeUnit = "ms"
    prompt: str = "input_length"
    completion: str = "output_length"
    tenant: str | None = None
    model: str | None = None
    cached: str | None = None


@dataclass(frozen=True)
class TraceRequests:
    path: Path
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    cached_tokens: np.ndarray | None
    tenants: np.ndarray | None
    models: np.ndarray | None
    repeat: bool


def read_trace(path: Path, columns: TraceColumns, *, repeat: bool = True) -> TraceRequests:
    """Load and check a trace; every problem is an `InputError` naming file and column."""
    if not path.is_file():
        raise InputError(f"trace {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pl.read_csv(path, infer_schema_length=10_000)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            frame = pl.read_ndjson(path, infer_schema_length=10_000)
        else:
            raise InputError(
                f"trace {path}: unknown format {suffix or '(none)'}; use .csv or .jsonl"
            )
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"trace {path}: cannot parse: {first}") from None
    if frame.height == 0:
        raise InputError(f"trace {path}: no requests in the file")

    wanted = [columns.time, columns.prompt, columns.completion]
    wanted += [c for c in (columns.tenant, columns.model, columns.cached) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise InputError(
            f"trace {path}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(c) for c in missing)}; columns present: {', '.join(frame.columns)}"
        )

    arrival_s = _times(path, frame, columns)
    prompt = _counts(path, frame, columns.prompt, minimum=1)
    completion = _counts(path, frame, columns.completion, minimum=0)
    cached = _counts(path, frame, columns.cached, minimum=0) if columns.cached else None
    if cached is not None and bool(np.any(cached > prompt)):
        row = int(np.flatnonzero(cached > prompt)[0])
        raise InputError(
            f"trace {path}: column {columns.cached!r}: row {row + 1} has more cached than "
            "prompt tokens"
        )
    tenants = _labels(path, frame, columns.tenant) if columns.tenant else None
    models = _labels(path, frame, columns.model) if columns.model else None
    return TraceRequests(
        path=path,
        arrival_s=arrival_s,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        tenants=tenants,
        models=models,
        repeat=repeat,
    )


def _times(path: Path, frame: pl.DataFrame, columns: TraceColumns) -> np.ndarray:
    column = frame[columns.time]
    if columns.time_unit == "iso":
        try:
            parsed = column.cast(pl.String).str.to_datetime(time_zone="UTC", strict=True)
        except pl.exceptions.PolarsError:
            raise InputError(
                f"trace {path}: column {columns.time!r}: not ISO 8601 timestamps"
            ) from None
        values = parsed.dt.epoch("us").to_numpy().astype(np.float64) * 1e-6
    else:
        if not column.dtype.is_numeric():
            raise InputError(
                f"trace {path}: column {columns.time!r}: expected numbers in "
                f"{columns.time_unit}, found {column.dtype}"
            )
        values = column.cast(pl.Float64).to_numpy() * _UNIT_SECONDS[columns.time_unit]
    if np.isnan(values).any():
        row = int(np.flatnonzero(np.isnan(values))[0])
        raise InputError(f"trace {path}: column {columns.time!r}: row {row + 1} has no time")
    return np.asarray(values, dtype=np.float64)


def _counts(path: Path, frame: pl.DataFrame, name: str, *, minimum: int) -> np.ndarray:
    column = frame[name]
    if not column.dtype.is_integer():
        if column.dtype.is_float() and bool((column.drop_nulls() % 1 == 0).all()):
            column = column.cast(pl.Int64)
        else:
            raise InputError(
                f"trace {path}: column {name!r}: expected whole token counts, found {column.dtype}"
            )
    bad = column.is_null() | (column < minimum)
    if bool(bad.any()):
        row = int(bad.arg_true()[0])
        raise InputError(
            f"trace {path}: column {name!r}: row {row + 1} is missing or below {minimum}"
        )
    return column.cast(pl.Int64).to_numpy()


def _labels(path: Path, frame: pl.DataFrame, name: str) -> np.ndarray:
    column = frame[name].cast(pl.String)
    if bool(column.is_null().any()):
        row = int(column.is_null().arg_true()[0])
        raise InputError(f"trace {path}: column {name!r}: row {row + 1} is empty")
    return column.to_numpy()
