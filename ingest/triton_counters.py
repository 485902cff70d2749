"""Triton's own request counters, read from Prometheus, for revenue assurance.

How many requests each Triton server completed per model in a window `[start, end)`:
the increase of `nv_inference_request_success + nv_inference_request_failure`
(every version, every failure reason), from the samples as they were scraped.

Why the raw samples and not `increase()`: `increase()` extrapolates to the window's
edges (fractional requests) and a stepped range query fills gaps with stale samples
(DESIGN.md). So, like the telemetry reader, each metric is one range vector evaluated
as an instant query at `end - 1 ms`, reaching `LOOKBACK_S` before `start`; samples
outside `[start - LOOKBACK_S, end)` are dropped here, so Prometheus 2.x (closed range)
and 3.x (half-open) agree.

Per series (one per server, model, version and failure reason):
- the baseline is the last sample before `start`; a series with none within the
  lookback begins inside the window (the server started then) and counts from 0;
- every increase between consecutive samples adds up; a drop is a counter reset (the
  server process restarted), after which the new value is the increase;
- a request completed after the last scrape before `end` is counted in the next
  window (that is what the reconciliation's tolerance absorbs).

Series are attributed to the scrape target's `triton_server` label
(`register_triton_targets` sets it; it equals the server's identity in usage events'
`source`); a series without it falls back to its `instance` label, with a warning.

Errors name the Prometheus URL and the query; Prometheus unreachable is a
ServiceError (after the telemetry reader's retries and backoff).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl

from ingest.settings import Settings, TritonServerSettings
from ingest.stack import LocalStack
from ingest.stack.prometheus import register_scrape_target
from ingest.telemetry.parsing import MalformedAnswer, parse_matrix
from ingest.telemetry.prometheus_http import PrometheusClient
from ingest.telemetry.promql import series_selector
from models.errors import InputError, ServiceError

__all__ = [
    "LOOKBACK_S",
    "SERVER_LABEL",
    "TRITON_COUNT_SCHEMA",
    "TRITON_REQUEST_METRICS",
    "CounterIncrease",
    "TritonCounts",
    "counter_increase",
    "counts_from_series",
    "read_triton_counts",
    "register_triton_targets",
    "triton_counts_query",
    "triton_target_file_name",
]

#: Both counted per request; their sum is every request Triton completed.
TRITON_REQUEST_METRICS = ("nv_inference_request_success", "nv_inference_request_failure")
#: The scrape-target label naming the Triton server (as in usage events' `source`).
SERVER_LABEL = "triton_server"
#: How far before the window its baseline sample is looked for. A series whose previous
#: sample is older counts from 0 in the window (taken as a server start).
LOOKBACK_S = 900

TRITON_COUNT_SCHEMA = pl.Schema(
    {
        "server": pl.String(),
        "model": pl.String(),
        "triton_requests": pl.Int64(),
        "series": pl.Int64(),
        #: Series with no sample in the lookback before the window: counted from 0.
        "series_started": pl.Int64(),
        #: Counter drops (process restarts) seen inside the window.
        "resets": pl.Int64(),
    }
)


@dataclass(frozen=True)
class CounterIncrease:
    """One series' increase over a window."""

    increase: float
    had_baseline: bool
    resets: int
    samples: int  # inside the window


def counter_increase(
    ts_ms: Sequence[int], values: Sequence[float], start_ms: int, end_ms: int
) -> CounterIncrease:
    """The increase of one counter series over `[start_ms, end_ms)`.

    `ts_ms`/`values` are its samples in time order (any reach before the window);
    the last one before `start_ms` is the baseline, none means the series begins in
    the window (from 0); samples at or after `end_ms` are ignored; a drop is a reset.
    """
    if len(ts_ms) != len(values):
        raise InputError(f"counter samples: {len(ts_ms)} timestamps but {len(values)} values")
    previous: float | None = None
    had_baseline = False
    increase = 0.0
    resets = 0
    samples = 0
    last_ts: int | None = None
    for ts, value in zip(ts_ms, values, strict=True):
        if last_ts is not None and ts < last_ts:
            raise InputError(f"counter samples: timestamp {ts} after {last_ts} is out of order")
        last_ts = ts
        if ts >= end_ms:
            break
        if ts < start_ms:
            previous, had_baseline = value, True
            continue
        samples += 1
        if previous is None:
            increase += value  # began in the window: counted from 0
        elif value >= previous:
            increase += value - previous
        else:
            increase += value  # reset: the new process counted from 0
            resets += 1
        previous = value
    return CounterIncrease(increase, had_baseline, resets, samples)


def counts_from_series(
    labels: Sequence[dict[str, str]],
    samples: Sequence[tuple[Sequence[int], Sequence[float]]],
    start_ms: int,
    end_ms: int,
) -> tuple[pl.DataFrame, list[str]]:
    """Requests per (server, model) from counter series (labels with their samples),
    summed over versions, reasons and metrics; and warnings. Schema
    `TRITON_COUNT_SCHEMA`, sorted by server and model."""
    totals: dict[tuple[str, str], list[float]] = {}
    unlabelled: set[str] = set()
    for series_labels, (ts, values) in zip(labels, samples, strict=True):
        server = series_labels.get(SERVER_LABEL)
        if not server:
            server = series_labels.get("instance", "")
            unlabelled.add(server or "(no instance)")
        model = series_labels.get("model", "")
        result = counter_increase(ts, values, start_ms, end_ms)
        if result.samples == 0 and not result.had_baseline:
            continue
        acc = totals.setdefault((server, model), [0.0, 0, 0, 0])
        acc[0] += result.increase
        acc[1] += 1
        acc[2] += 0 if result.had_baseline else 1
        acc[3] += result.resets
    rows = [
        {
            "server": server,
            "model": model,
            "triton_requests": round(acc[0]),
            "series": int(acc[1]),
            "series_started": int(acc[2]),
            "resets": int(acc[3]),
        }
        for (server, model), acc in sorted(totals.items())
    ]
    warnings = []
    if unlabelled:
        warnings.append(
            f"Triton series without a {SERVER_LABEL} label, attributed to their instance: "
            + ", ".join(sorted(unlabelled))
        )
    return pl.DataFrame(rows, schema=TRITON_COUNT_SCHEMA), warnings


def triton_counts_query(metric: str, job: str, range_ms: int) -> str:
    return f"{metric}{series_selector(job)}[{range_ms}ms]"


@dataclass(frozen=True)
class TritonCounts:
    """What `read_triton_counts` found for one window."""

    start: datetime
    end: datetime
    prometheus_url: str
    job: str
    counts: pl.DataFrame  # TRITON_COUNT_SCHEMA
    queries: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def total_requests(self) -> int:
        return int(self.counts["triton_requests"].sum())


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def read_triton_counts(
    settings: Settings,
    start: datetime,
    end: datetime,
    *,
    job: str | None = None,
    lookback_s: int = LOOKBACK_S,
) -> TritonCounts:
    """Requests each (triton_server, model) completed in `[start, end)`, from the
    Prometheus of `settings` (job `settings.reconciliation.triton_job` unless given)."""
    if start.tzinfo is None or end.tzinfo is None:
        raise InputError("Triton counters: start and end must carry a time zone (UTC)")
    if end <= start:
        raise InputError(f"Triton counters: end ({end.isoformat()}) must be after start")
    job = job or settings.reconciliation.triton_job
    start_ms = round(start.timestamp() * 1000)
    end_ms = round(end.timestamp() * 1000)
    reach_ms = start_ms - lookback_s * 1000
    range_ms = end_ms - reach_ms
    prom = PrometheusClient(settings)
    labels: list[dict[str, str]] = []
    samples: list[tuple[Sequence[int], Sequence[float]]] = []
    queries: list[str] = []
    warnings: list[str] = []
    try:
        for metric in TRITON_REQUEST_METRICS:
            query = triton_counts_query(metric, job, range_ms)
            queries.append(query)
            what = f"query {query} at {_iso_ms(end_ms - 1)}"
            try:
                body = prom.query(query, end_ms - 1, what)
                matrix = parse_matrix(body)
            except MalformedAnswer as exc:
                raise prom.malformed(what, str(exc)) from None
            except ServiceError as exc:
                if what in exc.message:
                    raise
                raise ServiceError(
                    f"{exc.message}; reading Triton's request counters with {what}"
                ) from None
            warnings.extend(matrix.warnings)
            offsets = [0, *matrix.counts.cumsum().tolist()]
            for i, series_labels in enumerate(matrix.labels):
                lo, hi = offsets[i], offsets[i + 1]
                ts = matrix.ts_ms[lo:hi]
                keep = ts >= reach_ms
                labels.append(series_labels)
                samples.append((ts[keep].tolist(), matrix.values[lo:hi][keep].tolist()))
    finally:
        prom.close()
    counts, found = counts_from_series(labels, samples, start_ms, end_ms)
    return TritonCounts(
        start=start.astimezone(UTC),
        end=end.astimezone(UTC),
        prometheus_url=prom.display_url,
        job=job,
        counts=counts,
        queries=queries,
        warnings=warnings + found,
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def triton_target_file_name(server_name: str) -> str:
    """`triton-127.0.0.1_8001`: the file_sd file (without `.json`) of one server."""
    return "triton-" + _UNSAFE.sub("_", server_name)


def _target(server: TritonServerSettings) -> tuple[str, dict[str, str]]:
    """host:port and labels of a server's metrics endpoint."""
    if not server.metrics_url:
        raise InputError(
            f"gateway.servers: server {server.server_name!r} has no metrics_url "
            "(e.g. http://host:8002/metrics): Prometheus cannot scrape its counters"
        )
    parts = urlsplit(server.metrics_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(
            f"gateway.servers: server {server.server_name!r}: metrics_url "
            f"{server.metrics_url!r} is not an http(s)://host:port/path URL"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(
            f"gateway.servers: server {server.server_name!r}: metrics_url "
            f"{server.metrics_url!r} has a bad port"
        ) from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    labels = {
        SERVER_LABEL: server.server_name,
        "__metrics_path__": parts.path or "/metrics",
        "__scheme__": parts.scheme,
    }
    return f"{host}:{port}", labels


def register_triton_targets(
    settings: Settings,
    servers: Iterable[TritonServerSettings] | None = None,
    *,
    stack: LocalStack | None = None,
) -> list[Path]:
    """Register each Triton server's metrics endpoint with the local stack's
    Prometheus (file_sd, job `triton`, label `triton_server`); the default servers
    are `settings.gateway.servers`; `stack` is the local stack whose Prometheus
    scrapes them (default: the settings' own). Returns the files written; Prometheus picks them
    up within seconds, without a restart."""
    chosen = list(settings.gateway.servers if servers is None else servers)
    targets = [(server, *_target(server)) for server in chosen]  # all valid, or none written
    directory = (stack or LocalStack(settings)).prometheus.triton_targets_dir
    return [
        register_scrape_target(
            directory, triton_target_file_name(server.server_name), [address], labels
        )
        for server, address, labels in targets
    ]
