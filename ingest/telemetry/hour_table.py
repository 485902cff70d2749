"""The wide table of one hour: one row per GPU per scrape timestamp, flags computed.

Flags (ALLOCATION.md §1):
- `counter_reset`: the energy counter is below this GPU's previous valid energy value;
- `gap_before_s` / `gap`: seconds since this GPU's previous scrape, and whether that
  exceeds the gap limit (3 x `telemetry.scrape_interval_s`);
- `repeated`: every metric equals the previous scrape's (dcgm-exporter collects every
  30 s while Prometheus scrapes every 15 s, so a scrape can repeat a collection);
- `placeholder_metrics`: the metrics that reported a DCGM blank (`placeholders`); their
  value columns are null. A NaN sample is also left null.

Samples before the hour are the predecessors of its first rows (for resets and gaps);
they are used for the flags and not output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from ingest.telemetry.labels import normalize_labels
from ingest.telemetry.placeholders import placeholder_mask
from ingest.telemetry.schema import (
    ENERGY_METRIC,
    METRIC_INDEX,
    METRIC_NAMES,
    METRICS,
    TELEMETRY_SCHEMA,
    TS_TYPE,
)

#: ALLOCATION.md §1: a slice longer than 3 x the scrape interval is a gap.
GAP_LIMIT_FACTOR = 3.0
#: How far back a GPU's previous sample is looked for when the lookback has none.
MAX_LOOKBACK_S = 86_400

HOUR_MS = 3_600_000
_ENERGY = METRIC_INDEX[ENERGY_METRIC]
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


def hour_start_ms(moment: datetime) -> int:
    return int(moment.astimezone(UTC).timestamp()) * 1000


@dataclass
class Chunk:
    """Samples of some series of one metric: labels per series, then flat arrays."""

    metric: int
    labels: list[dict[str, str]]
    counts: np.ndarray  # samples per series
    ts_ms: np.ndarray
    values: np.ndarray


@dataclass
class BuiltHour:
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


def build_hour(chunks: Sequence[Chunk], hour_ms: int, lo_ms: int, gap_limit_s: float) -> BuiltHour:
    """Wide rows of one hour from long samples in `[lo_ms, hour end)`, flags computed
    over everything fetched (so the hour's first rows see their predecessors)."""
    hi_ms = hour_ms + HOUR_MS
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
        (key, METRIC_NAMES[m]) for (key, m), sets in seen_series.items() if len(sets) > 1
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
    for j, name in enumerate(METRIC_NAMES):
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
    names = np.asarray(METRIC_NAMES, dtype=object)[np.nonzero(h_ph)[1]]
    placeholder_list = pa.ListArray.from_arrays(
        pa.array(offsets, type=pa.int32()), pa.array(names.tolist(), type=pa.string())
    )
    attr_rows = [attrs[key] for key in ordered]
    take = pa.array(h_code, type=pa.int64())
    columns: dict[str, pa.Array] = {
        "hour_start": pa.array(np.full(sel.size, hour_ms * 1000, dtype=np.int64)).cast(TS_TYPE),
        "gpu_key": pa.array(ordered, type=pa.string()).take(take),
    }
    for name in _ATTRIBUTES:
        kind = TELEMETRY_SCHEMA.field(name).type
        columns[name] = pa.array([row[name] for row in attr_rows], type=kind).take(take)
    columns["ts"] = pa.array(row_ts[sel] * 1000).cast(TS_TYPE)
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
    return BuiltHour(
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
    hour_ms = hour_start_ms(hour_start)
    label_cols = [c for c in samples.columns if c not in ("ts_ms", "value")]
    chunks: list[Chunk] = []
    if samples.height:
        frame = samples.sort([*label_cols, "ts_ms"], nulls_last=True, maintain_order=True)
        for labels_tuple, part in frame.group_by(label_cols, maintain_order=True):
            labels = {
                k: str(v) for k, v in zip(label_cols, labels_tuple, strict=True) if v is not None
            }
            metric = METRIC_INDEX.get(labels.get("__name__", ""))
            if metric is None:
                continue
            chunks.append(
                Chunk(
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
    return build_hour(chunks, hour_ms, lo_ms, GAP_LIMIT_FACTOR * scrape_interval_s).table
