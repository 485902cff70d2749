"""Fetching one whole hour of samples: GPU discovery, batches, windows, history.

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
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from ingest.settings import Settings
from ingest.telemetry.hour_table import (
    GAP_LIMIT_FACTOR,
    HOUR_MS,
    MAX_LOOKBACK_S,
    BuiltHour,
    Chunk,
    build_hour,
    hour_start_ms,
)
from ingest.telemetry.labels import normalize_labels
from ingest.telemetry.parsing import MalformedAnswer, parse_matrix, parse_vector_labels
from ingest.telemetry.prometheus_http import PrometheusClient
from ingest.telemetry.promql import discovery_query, series_selector
from ingest.telemetry.schema import METRIC_NAMES, METRICS

#: How far before each hour its first query reaches, for the previous sample.
LOOKBACK_S = 300
#: The longest query window: each hour is fetched whole before its file is written.
MAX_QUERY_WINDOW_S = 3600


@dataclass
class HourData:
    hour_start: datetime
    built: BuiltHour
    queries: int
    fetch_s: float
    lookback_s: int
    warnings: list[str]


class HourFetcher:
    """Fetches whole hours: discovery, batches, windows, history lookups."""

    def __init__(
        self, settings: Settings, prom: PrometheusClient, pool: ThreadPoolExecutor
    ) -> None:
        telemetry = settings.telemetry
        self.prom = prom
        self.pool = pool
        self.job = telemetry.job
        self.series_per_query = telemetry.series_per_query
        self.window_ms = min(telemetry.query_window_s, MAX_QUERY_WINDOW_S) * 1000
        self.gap_limit_s = GAP_LIMIT_FACTOR * telemetry.scrape_interval_s

    def _discover(self, hour_ms: int) -> tuple[dict[str, set[str]], list[str]]:
        """UUID -> GPU keys (MIG instances) with any DCGM sample in the hour."""
        query = discovery_query(self.job, HOUR_MS)
        eval_ms = hour_ms + HOUR_MS - 1
        what = f"the GPU discovery query for {_iso_ms(hour_ms)}"
        body = self.prom.query(query, eval_ms, what)
        try:
            labels, warnings = parse_vector_labels(body)
        except MalformedAnswer as exc:
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

    def _fetch(self, metric: int, uuids: tuple[str, ...], lo_ms: int, hi_ms: int) -> Chunk:
        name = METRIC_NAMES[metric]
        range_ms = hi_ms - lo_ms
        query = f"{name}{series_selector(self.job, uuids)}[{range_ms}ms]"
        shown = query if len(query) <= 160 else (f"{name}{{…{len(uuids)} GPUs…}}[{range_ms}ms]")
        what = f"query {shown} at {_iso_ms(hi_ms - 1)}"
        body = self.prom.query(query, hi_ms - 1, what)
        try:
            matrix = parse_matrix(body)
        except MalformedAnswer as exc:
            raise self.prom.malformed(what, str(exc)) from None
        ts = matrix.ts_ms
        keep = (ts >= lo_ms) & (ts < hi_ms)
        if keep.all():
            return Chunk(metric, matrix.labels, matrix.counts, ts, matrix.values)
        series = np.repeat(np.arange(matrix.counts.size), matrix.counts)[keep]
        counts = np.bincount(series, minlength=matrix.counts.size)
        return Chunk(metric, matrix.labels, counts, ts[keep], matrix.values[keep])

    def _run(self, jobs: list[tuple[int, tuple[str, ...], int, int]]) -> list[Chunk]:
        futures: list[Future[Chunk]] = [self.pool.submit(self._fetch, *job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def fetch_hour(self, hour_start: datetime) -> HourData:
        began = time.perf_counter()
        hour_ms = hour_start_ms(hour_start)
        gpus, warnings = self._discover(hour_ms)
        queries = 1
        lookback_s = LOOKBACK_S
        lo_ms = hour_ms - LOOKBACK_S * 1000
        chunks: list[Chunk] = []
        if gpus:
            batches = self._batches(gpus)
            windows = []
            edge = hour_ms
            while edge < hour_ms + HOUR_MS:
                nxt = min(edge + self.window_ms, hour_ms + HOUR_MS)
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
        built = build_hour(chunks, hour_ms, lo_ms, self.gap_limit_s)
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
                built = build_hour(chunks, hour_ms, lo_ms, self.gap_limit_s)
                missing = built.needs_history & missing
        if built.multi_series:
            key, metric = built.multi_series[0]
            more = len(built.multi_series) - 1
            warnings.append(
                f"{key} {metric} came from several series (a label changed, or the GPU is "
                f"scraped by several jobs: set telemetry.job)"
                + (f"; {more} more like it" if more else "")
            )
        return HourData(
            hour_start=hour_start,
            built=built,
            queries=queries,
            fetch_s=time.perf_counter() - began,
            lookback_s=lookback_s,
            warnings=warnings,
        )


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
