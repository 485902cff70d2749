"""Reading DCGM telemetry from Prometheus into the lake, sample for sample as scraped.

`pull_telemetry(settings, start, end)` writes one Parquet file per UTC hour under
`telemetry/samples/hour=<YYYY-MM-DDTHH>/samples.parquet` (+ `_manifest.json`): one row
per GPU per scrape timestamp, one column per dcgm-exporter metric, with counter
resets, gaps, repeated collections and DCGM placeholders marked (never dropped
silently).

How samples are read
--------------------
Stepped `query_range` fills a missing scrape with the previous sample for up to the
lookback delta (5 min), which hides gaps (DESIGN.md). So every query here is a
*range vector* evaluated as an instant query, `METRIC{…}[<range>ms]` at a time, which
answers the samples as they were scraped, with their own timestamps.

Chunking, so that a month of a 1,000-GPU fleet never builds one huge response:
- the GPUs of each hour are discovered first (one small `group by` query);
- then one query per metric, per query window (`telemetry.query_window_s`, at most the
  hour) and per batch of at most `telemetry.series_per_query` GPU series, selected
  with a `UUID=~"a|b|…"` matcher (all MIG instances of a GPU stay in one batch).

Boundaries: a range `[r]` at time `t` covers `[t-r, t]` on Prometheus 2.x and
`(t-r, t]` on 3.x; each window `[lo, hi)` is queried at `hi - 1 ms` with range
`hi - lo` and every sample outside `[lo, hi)` is dropped here, so both behave the same
and each hour file holds exactly the samples with `H <= ts < H + 1h`.

To flag a reset or a gap at an hour's first sample, the previous sample is needed: the
first window reaches back `LOOKBACK_S` before the hour; a GPU with no sample (or no
valid energy sample) there is looked up further back in doubling steps, up to
`MAX_LOOKBACK_S`. A GPU with no earlier sample within that reach counts as first seen
(`gap_before_s` null).

Flags (ALLOCATION.md §1):
- `counter_reset`: the energy counter is below this GPU's previous valid energy value;
- `gap_before_s` / `gap`: seconds since this GPU's previous scrape, and whether that
  exceeds the gap limit (3 x `telemetry.scrape_interval_s`);
- `repeated`: every metric equals the previous scrape's (dcgm-exporter collects every
  30 s while Prometheus scrapes every 15 s, so a scrape can repeat a collection);
- `placeholder_metrics`: the metrics that reported a DCGM blank (int64
  0x7ffffffffffffff0..3, int32 0x7ffffff0..3, fp64 140737488355328.0..+3); their value
  columns are null. The int32 family is not applied to the energy counter, an int64
  field whose mJ count legitimately passes 2^31. A NaN sample is also left null.

Parsing: the JSON of a range vector is mostly `[t,"v"]` pairs. Instead of building
three Python objects per sample, the `values` arrays are cut out of the raw body, the
rest (labels) is parsed with orjson, and the numbers are read by Polars' CSV reader
(off the GIL). Any answer that does not fit this shape is parsed in full with orjson.
prometheus-api-client provides the HTTP session (auth, headers, TLS verification);
the requests go through that session raw, POST-ed (a batch's matcher is long), with
retries and error classification of our own (its `custom_query` would parse with
`requests`' `.json()` and retry inside urllib3 regardless of our settings).

Errors: Prometheus unreachable or answering 5xx/429 is retried with exponential
backoff (`telemetry.retries`, `telemetry.backoff_s`), then a one-line ServiceError
names the URL and the reason; a 4xx (bad query) fails at once; a malformed answer is a
one-line ServiceError naming the query. An hour is fully fetched before its file is
replaced (atomically), so a failure leaves the previous file untouched. An hour
without samples gets an empty file (full schema), so downstream knows it was pulled.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import requests
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from ingest.endpoints import prometheus_auth, prometheus_url
from ingest.lake import Lake, remove_stale_tmp, write_json_atomic, write_parquet_atomic
from ingest.settings import Settings
from ingest.stack.process import os_error_reason
from models.errors import InputError, ServiceError

__all__ = [
    "DCGM_FP64_BLANKS",
    "DCGM_INT32_BLANKS",
    "DCGM_INT64_BLANKS",
    "ENERGY_METRIC",
    "GAP_LIMIT_FACTOR",
    "LOOKBACK_S",
    "MAX_LOOKBACK_S",
    "METRICS",
    "METRIC_COLUMNS",
    "TELEMETRY_SCHEMA",
    "HourReport",
    "TelemetryPullReport",
    "normalize_labels",
    "placeholder_mask",
    "pull_telemetry",
    "telemetry_coverage",
    "wide_hour_table",
]

#: dcgm-exporter metric -> value column, in column order.
METRICS: tuple[tuple[str, str], ...] = (
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "energy_mj"),
    ("DCGM_FI_DEV_POWER_USAGE", "power_w"),
    ("DCGM_FI_DEV_GPU_UTIL", "gpu_util_pct"),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gr_engine_active"),
    ("DCGM_FI_DEV_FB_USED", "fb_used_mib"),
    ("DCGM_FI_DEV_FB_FREE", "fb_free_mib"),
    ("DCGM_FI_DEV_SM_CLOCK", "sm_clock_mhz"),
    ("DCGM_FI_DEV_GPU_TEMP", "gpu_temp_c"),
)
METRIC_COLUMNS: dict[str, str] = dict(METRICS)
_METRIC_NAMES = tuple(name for name, _ in METRICS)
_METRIC_INDEX = {name: i for i, name in enumerate(_METRIC_NAMES)}
ENERGY_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
_ENERGY = _METRIC_INDEX[ENERGY_METRIC]

#: DCGM's blank values (dcgm_structs.h: BLANK, NOT_FOUND, NOT_SUPPORTED,
#: NOT_PERMISSIONED), as the exporter reports them.
DCGM_INT64_BLANKS: tuple[int, ...] = tuple(range(0x7FFFFFFFFFFFFFF0, 0x7FFFFFFFFFFFFFF4))
DCGM_INT32_BLANKS: tuple[int, ...] = tuple(range(0x7FFFFFF0, 0x7FFFFFF4))
DCGM_FP64_BLANKS: tuple[float, ...] = tuple(140737488355328.0 + i for i in range(4))
_BLANKS_ALL = np.array(
    sorted({float(v) for v in DCGM_INT64_BLANKS + DCGM_INT32_BLANKS} | set(DCGM_FP64_BLANKS))
)
_BLANKS_NO_INT32 = np.array(sorted({float(v) for v in DCGM_INT64_BLANKS} | set(DCGM_FP64_BLANKS)))

#: ALLOCATION.md §1: a slice longer than 3 x the scrape interval is a gap.
GAP_LIMIT_FACTOR = 3.0
#: How far before each hour its first query reaches, for the previous sample.
LOOKBACK_S = 300
#: How far back a GPU's previous sample is looked for when the lookback has none.
MAX_LOOKBACK_S = 86_400
#: Concurrent queries, and hours fetched ahead of the one being written.
QUERY_WORKERS = 4
HOURS_IN_FLIGHT = 2
#: The longest query window: each hour is fetched whole before its file is written.
MAX_QUERY_WINDOW_S = 3600

_HOUR_MS = 3_600_000
_DATASET_FILE = "samples.parquet"
_MANIFEST_FILE = "_manifest.json"
_SCHEMA_VERSION = 1

_TS = pa.timestamp("us", tz="UTC")
TELEMETRY_SCHEMA = pa.schema(
    [
        pa.field("hour_start", _TS, nullable=False),
        pa.field("gpu_key", pa.string(), nullable=False),
        pa.field("hostname", pa.string()),
        pa.field("gpu_uuid", pa.string()),
        pa.field("gpu_index", pa.int32()),
        pa.field("mig_instance_id", pa.int32()),
        pa.field("mig_profile", pa.string()),
        pa.field("model_name", pa.string()),
        pa.field("pci_bus_id", pa.string()),
        pa.field("driver_version", pa.string()),
        pa.field("instance", pa.string()),
        pa.field("job", pa.string()),
        pa.field("ts", _TS, nullable=False),
        *(pa.field(column, pa.float64()) for _, column in METRICS),
        pa.field("placeholder_metrics", pa.list_(pa.string()), nullable=False),
        pa.field("counter_reset", pa.bool_(), nullable=False),
        pa.field("gap_before_s", pa.float64()),
        pa.field("gap", pa.bool_(), nullable=False),
        pa.field("repeated", pa.bool_(), nullable=False),
    ]
)
_ATTRIBUTES = (
    "hostname",
    "gpu_uuid",
    "gpu_index",
    "mig_instance_id",
    "mig_profile",
    "model_name",
    "pci_bus_id",
    "driver_version",
    "instance",
    "job",
)


# --------------------------------------------------------------------------- labels


def _label(labels: Mapping[str, str], name: str) -> str | None:
    """A label by exact name, else by case-insensitive name; empty counts as absent."""
    value = labels.get(name)
    if value:
        return value
    lowered = name.lower()
    for key in sorted(labels):
        if key.lower() == lowered and labels[key]:
            return labels[key]
    return None


def _instance_host(instance: str) -> str:
    """`host:9400` -> `host`, `[::1]:9400` -> `::1`, `scheme://host:port/x` -> `host`."""
    text = instance.split("://", 1)[-1].split("/", 1)[0]
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def normalize_labels(labels: Mapping[str, str]) -> dict[str, Any]:
    """dcgm-exporter labels of one series -> the identity columns of its GPU.

    `hostname` comes from `Hostname` or `hostname` (matched case-insensitively), else
    from the host part of `instance`. `gpu_key` is `<hostname>/<UUID>`, plus
    `/<GPU_I_ID>` for a MIG instance (ALLOCATION.md: hostname + GPU UUID; a MIG instance
    adds its instance id). `metric` is the series' `__name__` (None when absent).
    """
    instance = _label(labels, "instance")
    host = _label(labels, "Hostname")
    if host is None and instance is not None:
        host = _instance_host(instance) or None
    uuid = _label(labels, "UUID")
    mig_id = _label(labels, "GPU_I_ID")
    key = f"{host or ''}/{uuid or ''}"
    if mig_id is not None:
        key += f"/{mig_id}"
    return {
        "metric": labels.get("__name__") or None,
        "gpu_key": key,
        "hostname": host,
        "gpu_uuid": uuid,
        "gpu_index": _int_or_none(_label(labels, "gpu")),
        "mig_instance_id": _int_or_none(mig_id),
        "mig_profile": _label(labels, "GPU_I_PROFILE"),
        "model_name": _label(labels, "modelName"),
        "pci_bus_id": _label(labels, "pci_bus_id"),
        "driver_version": _label(labels, "DCGM_FI_DRIVER_VERSION"),
        "instance": instance,
        "job": _label(labels, "job"),
    }


def placeholder_mask(values: np.ndarray | Sequence[float], metric: str | None = None) -> np.ndarray:
    """True where a value is one of DCGM's blanks.

    The int32 family (2147483632..2147483635) is not checked for the energy counter:
    that field is int64 in DCGM and its mJ count passes 2^31 in normal operation.
    """
    array = np.asarray(values, dtype=np.float64)
    blanks = _BLANKS_NO_INT32 if metric == ENERGY_METRIC else _BLANKS_ALL
    return np.isin(array, blanks)


# ----------------------------------------------------------------------- the table


@dataclass
class _Chunk:
    """Samples of some series of one metric: labels per series, then flat arrays."""

    metric: int
    labels: list[dict[str, str]]
    counts: np.ndarray  # samples per series
    ts_ms: np.ndarray
    values: np.ndarray


@dataclass
class _Built:
    table: pa.Table
    samples: int
    placeholder_samples: int
    counter_resets: int
    gaps: int
    repeated: int
    max_gap_s: float | None
    gpu_keys: list[str]
    #: GPU keys whose first in-hour sample (or first valid energy) has no predecessor.
    needs_history: set[str]
    #: GPU key -> UUID label ("" when absent), for the keys seen.
    uuid_of: dict[str, str]
    #: (gpu_key, metric) fed by more than one distinct series.
    multi_series: list[tuple[str, str]]


def _series_key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


def _build(chunks: Sequence[_Chunk], hour_ms: int, lo_ms: int, gap_limit_s: float) -> _Built:
    """Wide rows of one hour from long samples in `[lo_ms, hour end)`, flags computed
    over everything fetched (so the hour's first rows see their predecessors)."""
    hi_ms = hour_ms + _HOUR_MS
    if not 0 <= hi_ms - lo_ms < 1 << 32:
        raise ValueError("telemetry: a window longer than 49 days does not fit the row keys")
    attrs: dict[str, dict[str, Any]] = {}
    seen_series: dict[tuple[str, int], set[tuple[tuple[str, str], ...]]] = {}
    series_keys: list[list[str]] = []
    for chunk in chunks:
        keys = []
        for labels in chunk.labels:
            norm = normalize_labels(labels)
            key = norm["gpu_key"]
            attrs.setdefault(key, norm)
            seen_series.setdefault((key, chunk.metric), set()).add(_series_key(labels))
            keys.append(key)
        series_keys.append(keys)
    ordered = sorted(attrs)
    code_of = {key: i for i, key in enumerate(ordered)}
    multi = sorted(
        (key, _METRIC_NAMES[m]) for (key, m), sets in seen_series.items() if len(sets) > 1
    )

    n_metrics = len(METRICS)
    codes_parts = []
    metric_parts = []
    ts_parts = []
    value_parts = []
    for chunk, keys in zip(chunks, series_keys, strict=True):
        if chunk.ts_ms.size == 0:
            continue
        series_codes = np.fromiter((code_of[k] for k in keys), dtype=np.int64, count=len(keys))
        codes_parts.append(np.repeat(series_codes, chunk.counts))
        metric_parts.append(np.full(chunk.ts_ms.size, chunk.metric, dtype=np.int64))
        ts_parts.append(chunk.ts_ms)
        value_parts.append(chunk.values)
    if codes_parts:
        codes = np.concatenate(codes_parts)
        metric = np.concatenate(metric_parts)
        ts = np.concatenate(ts_parts)
        values = np.concatenate(value_parts)
    else:
        codes = metric = ts = np.empty(0, dtype=np.int64)
        values = np.empty(0, dtype=np.float64)
    keep = (ts >= lo_ms) & (ts < hi_ms)
    if not keep.all():
        codes, metric, ts, values = codes[keep], metric[keep], ts[keep], values[keep]

    # One row per (GPU, timestamp), sorted by GPU key then time.
    row_keys, inverse = np.unique((codes << 32) | (ts - lo_ms), return_inverse=True)
    n = row_keys.size
    row_code = row_keys >> 32
    row_ts = (row_keys & 0xFFFFFFFF) + lo_ms
    raw = np.full((n, n_metrics), np.nan)
    present = np.zeros((n, n_metrics), dtype=bool)
    raw[inverse, metric] = values
    present[inverse, metric] = True
    placeholder = np.zeros_like(present)
    for j, name in enumerate(_METRIC_NAMES):
        placeholder[:, j] = present[:, j] & placeholder_mask(raw[:, j], name)
    valid = present & ~placeholder & ~np.isnan(raw)

    same_prev = np.zeros(n, dtype=bool)
    if n > 1:
        same_prev[1:] = row_code[1:] == row_code[:-1]
    gap_s = np.full(n, np.nan)
    if n > 1:
        gap_s[1:] = (row_ts[1:] - row_ts[:-1]) / 1000.0
    gap_s[~same_prev] = np.nan
    gap = same_prev & (gap_s > gap_limit_s)

    repeated = np.zeros(n, dtype=bool)
    if n > 1:
        now, before = raw[1:], raw[:-1]
        now_present, before_present = present[1:], present[:-1]
        equal = (now_present == before_present) & (
            ~now_present | (now == before) | (np.isnan(now) & np.isnan(before))
        )
        repeated[1:] = same_prev[1:] & equal.all(axis=1) & now_present.any(axis=1)

    index = np.arange(n)
    energy_ok = valid[:, _ENERGY]
    last_ok = np.maximum.accumulate(np.where(energy_ok, index, -1)) if n else index
    prev_ok = np.empty(n, dtype=np.int64)
    if n:
        prev_ok[0] = -1
        prev_ok[1:] = last_ok[:-1]
    has_prev_energy = prev_ok >= 0
    safe_prev = np.maximum(prev_ok, 0)
    has_prev_energy &= row_code[safe_prev] == row_code
    energy = raw[:, _ENERGY]
    counter_reset = energy_ok & has_prev_energy & (energy < energy[safe_prev])

    in_hour = row_ts >= hour_ms
    # GPUs whose first row (sorted by GPU, then time) is in the hour, or whose first
    # valid energy has no valid predecessor: their history must be looked up further.
    lacking = in_hour & (~same_prev | (energy_ok & ~has_prev_energy))
    needs_history = {ordered[c] for c in np.unique(row_code[lacking])}

    sel = np.nonzero(in_hour)[0]
    h_code = row_code[sel]
    h_ph = placeholder[sel]
    counts = h_ph.sum(axis=1)
    offsets = np.zeros(sel.size + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    names = np.asarray(_METRIC_NAMES, dtype=object)[np.nonzero(h_ph)[1]]
    placeholder_list = pa.ListArray.from_arrays(
        pa.array(offsets, type=pa.int32()), pa.array(names.tolist(), type=pa.string())
    )
    attr_rows = [attrs[key] for key in ordered]
    take = pa.array(h_code, type=pa.int64())
    columns: dict[str, pa.Array] = {
        "hour_start": pa.array(np.full(sel.size, hour_ms * 1000, dtype=np.int64)).cast(_TS),
        "gpu_key": pa.array(ordered, type=pa.string()).take(take),
    }
    for name in _ATTRIBUTES:
        kind = TELEMETRY_SCHEMA.field(name).type
        columns[name] = pa.array([row[name] for row in attr_rows], type=kind).take(take)
    columns["ts"] = pa.array(row_ts[sel] * 1000).cast(_TS)
    h_raw = raw[sel]
    h_valid = valid[sel]
    for j, (_, column) in enumerate(METRICS):
        columns[column] = pa.array(h_raw[:, j], mask=~h_valid[:, j], type=pa.float64())
    columns["placeholder_metrics"] = placeholder_list
    columns["counter_reset"] = pa.array(counter_reset[sel])
    h_gap_s = gap_s[sel]
    columns["gap_before_s"] = pa.array(h_gap_s, mask=np.isnan(h_gap_s), type=pa.float64())
    columns["gap"] = pa.array(gap[sel])
    columns["repeated"] = pa.array(repeated[sel])
    table = pa.Table.from_arrays(
        [columns[f.name] for f in TELEMETRY_SCHEMA], schema=TELEMETRY_SCHEMA
    )
    finite_gaps = h_gap_s[~np.isnan(h_gap_s)]
    return _Built(
        table=table,
        samples=int(present[sel].sum()),
        placeholder_samples=int(h_ph.sum()),
        counter_resets=int(counter_reset[sel].sum()),
        gaps=int(gap[sel].sum()),
        repeated=int(repeated[sel].sum()),
        max_gap_s=float(finite_gaps.max()) if finite_gaps.size else None,
        gpu_keys=[ordered[c] for c in np.unique(h_code)],
        needs_history=needs_history,
        uuid_of={key: attrs[key]["gpu_uuid"] or "" for key in ordered},
        multi_series=multi,
    )


def wide_hour_table(
    samples: pl.DataFrame, hour_start: datetime, *, scrape_interval_s: float = 15.0
) -> pa.Table:
    """The hour file's table from long samples: one row per sample with the series'
    labels as columns (`__name__`, `UUID`, `Hostname`, …), `ts_ms` and `value`.

    Samples before the hour (up to `MAX_LOOKBACK_S` back) serve as predecessors
    (resets, gaps) and are not output; the same code builds the files
    `pull_telemetry` writes.
    """
    hour_ms = _hour_ms(hour_start)
    label_cols = [c for c in samples.columns if c not in ("ts_ms", "value")]
    chunks: list[_Chunk] = []
    if samples.height:
        frame = samples.sort([*label_cols, "ts_ms"], nulls_last=True, maintain_order=True)
        for labels_tuple, part in frame.group_by(label_cols, maintain_order=True):
            labels = {
                k: str(v) for k, v in zip(label_cols, labels_tuple, strict=True) if v is not None
            }
            metric = _METRIC_INDEX.get(labels.get("__name__", ""))
            if metric is None:
                continue
            chunks.append(
                _Chunk(
                    metric=metric,
                    labels=[labels],
                    counts=np.array([part.height]),
                    ts_ms=part["ts_ms"].cast(pl.Int64).to_numpy(),
                    values=part["value"].cast(pl.Float64).to_numpy(),
                )
            )
    lo_ms = hour_ms
    if samples.height:
        earliest = int(samples["ts_ms"].min())  # type: ignore[arg-type]
        lo_ms = max(min(hour_ms, earliest), hour_ms - MAX_LOOKBACK_S * 1000)
    return _build(chunks, hour_ms, lo_ms, GAP_LIMIT_FACTOR * scrape_interval_s).table


# ----------------------------------------------------------------------- coverage


def telemetry_coverage(frame: pl.DataFrame, scrape_interval_s: float) -> pl.DataFrame:
    """Per GPU and hour: rows, distinct scrapes, expected scrapes, coverage and faults.

    `frame` has the hour files' columns (at least `gpu_key`, `hour_start`, `ts`,
    `placeholder_metrics`, `counter_reset`, `gap`, `gap_before_s`). Coverage is
    distinct scrape timestamps / (3600 / interval); it can exceed 1 when Prometheus
    scrapes faster than `scrape_interval_s` says.
    """
    if scrape_interval_s <= 0:
        raise InputError("telemetry coverage: scrape_interval_s must be more than 0")
    expected = 3600.0 / scrape_interval_s
    return (
        frame.group_by("gpu_key", "hour_start")
        .agg(
            rows=pl.len().cast(pl.Int64),
            scrapes=pl.col("ts").n_unique().cast(pl.Int64),
            placeholder_samples=pl.col("placeholder_metrics").list.len().sum().cast(pl.Int64),
            resets=pl.col("counter_reset").sum().cast(pl.Int64),
            gaps=pl.col("gap").sum().cast(pl.Int64),
            max_gap_s=pl.col("gap_before_s").max(),
        )
        .with_columns(
            expected_scrapes=pl.lit(expected, dtype=pl.Float64),
            coverage=pl.col("scrapes") / expected,
        )
        .select(
            "gpu_key",
            "hour_start",
            "rows",
            "scrapes",
            "expected_scrapes",
            "coverage",
            "placeholder_samples",
            "resets",
            "gaps",
            "max_gap_s",
        )
        .sort("gpu_key", "hour_start")
    )


# --------------------------------------------------------------------- parsing


_VALUES_KEY = re.compile(rb'"values"\s*:\s*\[\s*')
_VALUES_END = re.compile(rb"\]\s*\]")
_WHITESPACE = b" \t\r\n"


class _Malformed(Exception):
    """Why an answer is not what the API promises (turned into a ServiceError)."""


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _result_list(document: Any, result_type: str) -> list[Any]:
    if not isinstance(document, dict):
        raise _Malformed("not a JSON object")
    status = document.get("status")
    if status != "success":
        error = document.get("error")
        detail = f": {_first_line(str(error))}" if error else ""
        raise _Malformed(f"status {status!r}{detail}")
    data = document.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("result"), list):
        raise _Malformed("no data.result list")
    kind = data.get("resultType")
    if kind is not None and kind != result_type:
        raise _Malformed(f"resultType {kind!r}, expected {result_type!r}")
    result: list[Any] = data["result"]
    for item in result:
        if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
            raise _Malformed("a result without a metric object")
    return result


def _warnings(document: dict[str, Any]) -> list[str]:
    found = document.get("warnings")
    return [_first_line(str(w)) for w in found] if isinstance(found, list) else []


@dataclass
class _Matrix:
    labels: list[dict[str, str]]
    counts: np.ndarray
    ts_ms: np.ndarray
    values: np.ndarray
    warnings: list[str] = field(default_factory=list)


def _parse_matrix(body: bytes) -> _Matrix:
    """A range-vector answer -> labels per series and flat (ts_ms, value) arrays."""
    try:
        return _parse_matrix_fast(body)
    except _Malformed:
        pass  # not the usual shape: parse in full, which names what is wrong
    return _parse_matrix_slow(body)


def _parse_matrix_fast(body: bytes) -> _Matrix:
    pieces: list[bytes] = []
    contents: list[bytes] = []
    counts: list[int] = []
    pos = 0
    for match in _VALUES_KEY.finditer(body):
        start = match.end()
        if start < pos:
            raise _Malformed("overlapping values")
        if body[start : start + 1] == b"]":
            content, close_end = b"", start + 1
        else:
            close = _VALUES_END.search(body, start)
            if close is None:
                raise _Malformed("unterminated values")
            content, close_end = body[start : close.start() + 1], close.end()
        pieces.append(body[pos:start])
        pieces.append(b"]")
        pos = close_end
        if content:
            contents.append(content)
        counts.append(content.count(b"["))
    pieces.append(body[pos:])
    try:
        document = orjson.loads(b"".join(pieces))
    except orjson.JSONDecodeError as exc:
        raise _Malformed(f"not JSON ({exc})") from None
    result = _result_list(document, "matrix")
    if len(result) != len(counts) or any(item.get("values") != [] for item in result):
        raise _Malformed("unexpected layout")
    total = sum(counts)
    if total:
        text = (
            b",".join(contents)
            .translate(None, _WHITESPACE)
            .replace(b"],[", b"\n")
            .translate(None, b'[]"')
        )
        try:
            frame = pl.read_csv(
                io.BytesIO(text),
                has_header=False,
                schema={"t": pl.Float64, "v": pl.Float64},
            )
        except Exception as exc:  # polars raises several error types for bad input
            raise _Malformed(f"values not numeric ({type(exc).__name__})") from None
        if frame.height != total or frame.null_count().row(0) != (0, 0):
            raise _Malformed("values not [time, value] pairs")
        t = frame["t"].to_numpy()
        v = frame["v"].to_numpy()
    else:
        t = v = np.empty(0)
    return _Matrix(
        labels=[{str(k): str(val) for k, val in item["metric"].items()} for item in result],
        counts=np.asarray(counts, dtype=np.int64),
        ts_ms=np.rint(t * 1000.0).astype(np.int64),
        values=np.ascontiguousarray(v, dtype=np.float64),
        warnings=_warnings(document),
    )


def _parse_matrix_slow(body: bytes) -> _Matrix:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Malformed("not JSON") from None
    result = _result_list(document, "matrix")
    labels: list[dict[str, str]] = []
    counts: list[int] = []
    ts: list[float] = []
    values: list[float] = []
    for item in result:
        pairs = item.get("values", [])
        if not isinstance(pairs, list):
            raise _Malformed("values is not a list")
        try:
            for t, v in pairs:
                ts.append(float(t))
                values.append(float(v))
        except (TypeError, ValueError):
            raise _Malformed("values not numeric [time, value] pairs") from None
        labels.append({str(k): str(v) for k, v in item["metric"].items()})
        counts.append(len(pairs))
    return _Matrix(
        labels=labels,
        counts=np.asarray(counts, dtype=np.int64),
        ts_ms=np.rint(np.asarray(ts, dtype=np.float64) * 1000.0).astype(np.int64),
        values=np.asarray(values, dtype=np.float64),
        warnings=_warnings(document),
    )


def _parse_vector_labels(body: bytes) -> tuple[list[dict[str, str]], list[str]]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Malformed("not JSON") from None
    result = _result_list(document, "vector")
    labels = [{str(k): str(v) for k, v in item["metric"].items()} for item in result]
    return labels, _warnings(document)


# ----------------------------------------------------------------------- PromQL


def _promql_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _regex_literal(text: str) -> str:
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def _selector(job: str | None, uuids: Sequence[str] | None = None) -> str:
    matchers = []
    if job:
        matchers.append(f"job={_promql_string(job)}")
    if uuids is not None:
        matchers.append(f"UUID=~{_promql_string('|'.join(_regex_literal(u) for u in uuids))}")
    return "{" + ",".join(matchers) + "}"


def _discovery_query(job: str | None, range_ms: int) -> str:
    selector = _selector(job)
    inner = " or ".join(f"last_over_time({m}{selector}[{range_ms}ms])" for m in _METRIC_NAMES)
    return f"group by (UUID, GPU_I_ID, instance, Hostname, hostname) ({inner})"


# ----------------------------------------------------------------- HTTP client


def _display_url(url: str) -> str:
    """The URL without credentials, for messages and manifests."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def _connection_reason(exc: BaseException) -> str:
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return os_error_reason(current)
        for nested in (current.__cause__, current.__context__, getattr(current, "reason", None)):
            if isinstance(nested, BaseException):
                stack.append(nested)
        stack.extend(a for a in current.args if isinstance(a, BaseException))
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        message = errno.group(1).strip()
        return message[:1].lower() + message[1:]
    return _first_line(text) or type(exc).__name__


def _error_text(response: requests.Response) -> str:
    """`: <Prometheus' error>` from an error answer, or an excerpt of its body."""
    try:
        document = orjson.loads(response.content)
        if isinstance(document, dict) and document.get("error"):
            return f": {_first_line(str(document['error']))}"
    except orjson.JSONDecodeError:
        pass
    text = response.content[:200].decode("utf-8", "replace")
    return f": {_first_line(text)}" if text.strip() else ""


class _Cancelled(Exception):
    """The pull is being abandoned (another hour failed); nothing to report."""


class _Prometheus:
    """Prometheus' HTTP API through prometheus-api-client's session."""

    def __init__(self, settings: Settings) -> None:
        self.url = prometheus_url(settings)
        self.display_url = _display_url(self.url)
        auth = prometheus_auth(settings)
        session = requests.Session()
        session.verify = auth.verify
        # Retries are ours (backoff from settings, 5xx/429 only): urllib3's are off.
        self.client = PrometheusConnect(
            url=self.url,
            headers=dict(auth.headers),
            disable_ssl=not auth.verify,
            retry=Retry(total=0, raise_on_status=False),
            auth=auth.basic_auth,
            session=session,
            timeout=settings.prometheus.timeout_s,
            method="POST",
        )
        self.session = session
        self.headers = dict(auth.headers)
        if _is_loopback(self.url):
            self.headers["Accept-Encoding"] = "identity"  # gzip only costs CPU here
        self.timeout_s = settings.prometheus.timeout_s
        self.retries = settings.telemetry.retries
        self.backoff_s = settings.telemetry.backoff_s
        self.cancelled = threading.Event()

    def close(self) -> None:
        self.client.close()

    def post(self, path: str, data: dict[str, str], what: str) -> bytes:
        """POST a form to the API; the body of a 200 answer, else a ServiceError."""
        attempts = self.retries + 1
        reason = ""
        failing = False
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                if self.cancelled.wait(delay):
                    raise _Cancelled
            if self.cancelled.is_set():
                raise _Cancelled
            try:
                response = self.session.post(
                    f"{self.url}{path}",
                    data=data,
                    headers=self.headers,
                    auth=self.client.auth,
                    timeout=self.timeout_s,
                )
            except requests.Timeout:
                reason, failing = f"no answer within {self.timeout_s:g} s", False
                continue
            except requests.ConnectionError as exc:
                reason, failing = _connection_reason(exc), False
                continue
            except requests.RequestException as exc:
                raise ServiceError(
                    f"Prometheus at {self.display_url}: {what}: {_connection_reason(exc)}"
                ) from None
            status = response.status_code
            if status == 200:
                return response.content
            if status == 429 or status >= 500:
                reason, failing = f"HTTP {status}{_error_text(response)}", True
                continue
            if status in (401, 403):
                raise ServiceError(
                    f"Prometheus at {self.display_url} refused the credentials (HTTP {status}); "
                    "check GPULEDGER_PROMETHEUS__BEARER_TOKEN or __USERNAME/__PASSWORD"
                )
            hint = ""
            if status == 422:
                hint = " (lower telemetry.series_per_query or telemetry.query_window_s)"
            raise ServiceError(
                f"Prometheus at {self.display_url} rejected {what}: "
                f"HTTP {status}{_error_text(response)}{hint}"
            )
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if failing:
            raise ServiceError(
                f"Prometheus at {self.display_url} is failing: {reason} (after {tries})"
            )
        raise ServiceError(
            f"Prometheus at {self.display_url} is unreachable: {reason} (after {tries})"
        )

    def query(self, query: str, eval_ms: int, what: str) -> bytes:
        return self.post("/api/v1/query", {"query": query, "time": f"{eval_ms / 1000:.3f}"}, what)

    def malformed(self, what: str, why: str) -> ServiceError:
        return ServiceError(
            f"Prometheus at {self.display_url} answered {what} with a malformed response: {why}"
        )


# --------------------------------------------------------------------- reports


@dataclass(frozen=True)
class HourReport:
    """One hour pulled and written."""

    hour_start: datetime
    path: Path
    gpus: int
    rows: int
    samples: int  # metric samples in the hour, placeholders included
    placeholder_samples: int
    counter_resets: int
    gaps: int
    repeated: int
    max_gap_s: float | None
    queries: int
    fetch_s: float
    complete: bool  # False when the hour had not ended (plus a scrape) at pull time
    warnings: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.rows == 0


@dataclass(frozen=True)
class TelemetryPullReport:
    prometheus_url: str
    start: datetime
    end: datetime
    hours: tuple[HourReport, ...]
    gpus: int  # distinct GPU keys over the window
    elapsed_s: float
    warnings: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return sum(h.rows for h in self.hours)

    @property
    def samples(self) -> int:
        return sum(h.samples for h in self.hours)

    @property
    def placeholder_samples(self) -> int:
        return sum(h.placeholder_samples for h in self.hours)

    @property
    def counter_resets(self) -> int:
        return sum(h.counter_resets for h in self.hours)

    @property
    def gaps(self) -> int:
        return sum(h.gaps for h in self.hours)

    @property
    def empty_hours(self) -> tuple[datetime, ...]:
        return tuple(h.hour_start for h in self.hours if h.empty)


# ------------------------------------------------------------------ the pull


def _hour_ms(moment: datetime) -> int:
    return int(moment.astimezone(UTC).timestamp()) * 1000


def _utc(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise InputError(f"telemetry pull: {name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InputError(f"telemetry pull: {name} must carry a time zone (UTC), got {value}")
    return value.astimezone(UTC)


def _hours(start: datetime, end: datetime) -> list[datetime]:
    """Whole UTC hours overlapping [start, end)."""
    first = _utc(start, "start").replace(minute=0, second=0, microsecond=0)
    stop = _utc(end, "end")
    if stop <= _utc(start, "start"):
        raise InputError(f"telemetry pull: end ({stop}) must be after start ({start})")
    hours = []
    hour = first
    while hour < stop:
        hours.append(hour)
        hour += timedelta(hours=1)
    return hours


@dataclass
class _HourData:
    hour_start: datetime
    built: _Built
    queries: int
    fetch_s: float
    lookback_s: int
    warnings: list[str]


class _Reader:
    """Fetches whole hours: discovery, batches, windows, history lookups."""

    def __init__(self, settings: Settings, prom: _Prometheus, pool: ThreadPoolExecutor) -> None:
        telemetry = settings.telemetry
        self.prom = prom
        self.pool = pool
        self.job = telemetry.job
        self.series_per_query = telemetry.series_per_query
        self.window_ms = min(telemetry.query_window_s, MAX_QUERY_WINDOW_S) * 1000
        self.gap_limit_s = GAP_LIMIT_FACTOR * telemetry.scrape_interval_s

    def _discover(self, hour_ms: int) -> tuple[dict[str, set[str]], list[str]]:
        """UUID -> GPU keys (MIG instances) with any DCGM sample in the hour."""
        query = _discovery_query(self.job, _HOUR_MS)
        eval_ms = hour_ms + _HOUR_MS - 1
        what = f"the GPU discovery query for {_iso_ms(hour_ms)}"
        body = self.prom.query(query, eval_ms, what)
        try:
            labels, warnings = _parse_vector_labels(body)
        except _Malformed as exc:
            raise self.prom.malformed(what, str(exc)) from None
        gpus: dict[str, set[str]] = {}
        for item in labels:
            norm = normalize_labels(item)
            gpus.setdefault(norm["gpu_uuid"] or "", set()).add(norm["gpu_key"])
        return gpus, warnings

    def _batches(self, gpus: Mapping[str, set[str]]) -> list[tuple[str, ...]]:
        batches: list[tuple[str, ...]] = []
        current: list[str] = []
        size = 0
        for uuid in sorted(gpus):
            n = max(1, len(gpus[uuid]))
            if current and size + n > self.series_per_query:
                batches.append(tuple(current))
                current, size = [], 0
            current.append(uuid)
            size += n
        if current:
            batches.append(tuple(current))
        return batches

    def _fetch(self, metric: int, uuids: tuple[str, ...], lo_ms: int, hi_ms: int) -> _Chunk:
        name = _METRIC_NAMES[metric]
        range_ms = hi_ms - lo_ms
        query = f"{name}{_selector(self.job, uuids)}[{range_ms}ms]"
        shown = query if len(query) <= 160 else (f"{name}{{…{len(uuids)} GPUs…}}[{range_ms}ms]")
        what = f"query {shown} at {_iso_ms(hi_ms - 1)}"
        body = self.prom.query(query, hi_ms - 1, what)
        try:
            matrix = _parse_matrix(body)
        except _Malformed as exc:
            raise self.prom.malformed(what, str(exc)) from None
        ts = matrix.ts_ms
        keep = (ts >= lo_ms) & (ts < hi_ms)
        if keep.all():
            return _Chunk(metric, matrix.labels, matrix.counts, ts, matrix.values)
        series = np.repeat(np.arange(matrix.counts.size), matrix.counts)[keep]
        counts = np.bincount(series, minlength=matrix.counts.size)
        return _Chunk(metric, matrix.labels, counts, ts[keep], matrix.values[keep])

    def _run(self, jobs: list[tuple[int, tuple[str, ...], int, int]]) -> list[_Chunk]:
        futures: list[Future[_Chunk]] = [self.pool.submit(self._fetch, *job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def fetch_hour(self, hour_start: datetime) -> _HourData:
        began = time.perf_counter()
        hour_ms = _hour_ms(hour_start)
        gpus, warnings = self._discover(hour_ms)
        queries = 1
        lookback_s = LOOKBACK_S
        lo_ms = hour_ms - LOOKBACK_S * 1000
        chunks: list[_Chunk] = []
        if gpus:
            batches = self._batches(gpus)
            windows = []
            edge = hour_ms
            while edge < hour_ms + _HOUR_MS:
                nxt = min(edge + self.window_ms, hour_ms + _HOUR_MS)
                windows.append((lo_ms if edge == hour_ms else edge, nxt))
                edge = nxt
            jobs = [
                (m, batch, lo, hi)
                for lo, hi in windows
                for m in range(len(METRICS))
                for batch in batches
            ]
            queries += len(jobs)
            chunks = self._run(jobs)
        built = _build(chunks, hour_ms, lo_ms, self.gap_limit_s)
        # Predecessors further back, in doubling steps, for GPUs the lookback missed.
        missing = built.needs_history
        reach_s = LOOKBACK_S
        while missing and reach_s < MAX_LOOKBACK_S:
            farther_s = min(reach_s * 2, MAX_LOOKBACK_S)
            uuids: dict[str, set[str]] = {}
            for key in missing:
                uuids.setdefault(built.uuid_of[key], set()).add(key)
            step_lo = hour_ms - farther_s * 1000
            step_hi = hour_ms - reach_s * 1000
            deep_jobs = [
                (m, batch, step_lo, step_hi)
                for m in range(len(METRICS))
                for batch in self._batches(uuids)
            ]
            queries += len(deep_jobs)
            found = self._run(deep_jobs)
            reach_s = farther_s
            if any(c.ts_ms.size for c in found):
                chunks.extend(found)
                lo_ms = step_lo
                lookback_s = reach_s
                built = _build(chunks, hour_ms, lo_ms, self.gap_limit_s)
                missing = built.needs_history & missing
        if built.multi_series:
            key, metric = built.multi_series[0]
            more = len(built.multi_series) - 1
            warnings.append(
                f"{key} {metric} came from several series (a label changed, or the GPU is "
                f"scraped by several jobs: set telemetry.job)"
                + (f"; {more} more like it" if more else "")
            )
        return _HourData(
            hour_start=hour_start,
            built=built,
            queries=queries,
            fetch_s=time.perf_counter() - began,
            lookback_s=lookback_s,
            warnings=warnings,
        )


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _write_hour(lake: Lake, data: _HourData, prom: _Prometheus, settings: Settings) -> HourReport:
    directory = lake.telemetry_hour_dir(data.hour_start)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(directory)
    path = directory / _DATASET_FILE
    built = data.built
    write_parquet_atomic(built.table, path)
    pulled_at = datetime.now(UTC)
    hour_end = data.hour_start + timedelta(hours=1)
    complete = pulled_at >= hour_end + timedelta(seconds=settings.telemetry.scrape_interval_s)
    warnings = list(data.warnings)
    if not complete:
        warnings.append(
            f"hour {data.hour_start.isoformat()} had not ended when pulled: pull it again later"
        )
    report = HourReport(
        hour_start=data.hour_start,
        path=path,
        gpus=len(built.gpu_keys),
        rows=built.table.num_rows,
        samples=built.samples,
        placeholder_samples=built.placeholder_samples,
        counter_resets=built.counter_resets,
        gaps=built.gaps,
        repeated=built.repeated,
        max_gap_s=built.max_gap_s,
        queries=data.queries,
        fetch_s=data.fetch_s,
        complete=complete,
        warnings=tuple(warnings),
    )
    manifest = {
        "dataset": "telemetry/samples",
        "schema_version": _SCHEMA_VERSION,
        "window": {"start": data.hour_start.isoformat(), "end": hour_end.isoformat()},
        "lookback_s": data.lookback_s,
        "pulled_at": pulled_at.isoformat(),
        "complete": complete,
        "prometheus": {"url": prom.display_url, "job": settings.telemetry.job},
        "query_window_s": min(settings.telemetry.query_window_s, MAX_QUERY_WINDOW_S),
        "series_per_query": settings.telemetry.series_per_query,
        "scrape_interval_s": settings.telemetry.scrape_interval_s,
        "gap_limit_s": GAP_LIMIT_FACTOR * settings.telemetry.scrape_interval_s,
        "metrics": dict(METRICS),
        "counts": {
            "gpus": report.gpus,
            "rows": report.rows,
            "samples": report.samples,
            "placeholder_samples": report.placeholder_samples,
            "counter_resets": report.counter_resets,
            "gaps": report.gaps,
            "repeated": report.repeated,
            "queries": report.queries,
        },
        "max_gap_s": report.max_gap_s,
        "fetch_s": round(report.fetch_s, 3),
        "warnings": warnings,
    }
    write_json_atomic(manifest, directory / _MANIFEST_FILE)
    return report


def pull_telemetry(
    settings: Settings,
    start: datetime,
    end: datetime,
    *,
    on_hour: Callable[[HourReport], None] | None = None,
) -> TelemetryPullReport:
    """Pull the DCGM samples of the UTC hours overlapping [start, end) into the lake.

    Hours are written in order, each replacing its previous file atomically once
    fully fetched; `on_hour` is called after each. A failure raises a one-line
    ServiceError: hours already written stay written, the failing hour's previous
    file stays untouched.
    """
    hours = _hours(start, end)
    began = time.perf_counter()
    prom = _Prometheus(settings)
    lake = Lake(settings.lake_path)
    reports: list[HourReport] = []
    keys: set[str] = set()
    query_pool = ThreadPoolExecutor(QUERY_WORKERS, thread_name_prefix="telemetry-query")
    hour_pool = ThreadPoolExecutor(HOURS_IN_FLIGHT, thread_name_prefix="telemetry-hour")
    reader = _Reader(settings, prom, query_pool)
    pending: deque[tuple[datetime, Future[_HourData]]] = deque()
    upcoming = iter(hours)

    def submit_next() -> None:
        hour = next(upcoming, None)
        if hour is not None:
            pending.append((hour, hour_pool.submit(reader.fetch_hour, hour)))

    try:
        for _ in range(HOURS_IN_FLIGHT):
            submit_next()
        while pending:
            _, future = pending.popleft()
            data = future.result()
            submit_next()
            report = _write_hour(lake, data, prom, settings)
            keys.update(data.built.gpu_keys)
            reports.append(report)
            if on_hour is not None:
                on_hour(report)
    except BaseException:
        prom.cancelled.set()
        for _, future in pending:
            future.cancel()
        raise
    finally:
        hour_pool.shutdown(wait=True, cancel_futures=True)
        query_pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            prom.close()

    warnings: list[str] = []
    if reports and all(r.empty for r in reports):
        where = (
            f" for job={settings.telemetry.job!r} (check telemetry.job)"
            if (settings.telemetry.job)
            else ""
        )
        warnings.append(
            f"no DCGM samples in {hours[0].isoformat()} .. "
            f"{(hours[-1] + timedelta(hours=1)).isoformat()} at {prom.display_url}{where}"
        )
    elif any(r.empty for r in reports):
        empty = sum(1 for r in reports if r.empty)
        warnings.append(f"{empty} of {len(reports)} hours had no DCGM samples")
    return TelemetryPullReport(
        prometheus_url=prom.display_url,
        start=hours[0],
        end=hours[-1] + timedelta(hours=1),
        hours=tuple(reports),
        gpus=len(keys),
        elapsed_s=time.perf_counter() - began,
        warnings=tuple(warnings),
    )
