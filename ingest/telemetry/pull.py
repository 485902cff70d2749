"""`pull_telemetry`: the UTC hours of a window, fetched ahead and written in order.

Up to `HOURS_IN_FLIGHT` hours are fetched (by `hour_fetch`, `QUERY_WORKERS` queries at
a time) while the previous one is written (by `hour_files`). A failure cancels the
hours in flight and raises: hours already written stay written.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from ingest.lake import Lake
from ingest.settings import Settings
from ingest.telemetry.hour_fetch import HourData, HourFetcher
from ingest.telemetry.hour_files import write_hour
from ingest.telemetry.prometheus_http import PrometheusClient
from ingest.telemetry.reports import HourReport, TelemetryPullReport
from models.errors import InputError

#: Concurrent queries, and hours fetched ahead of the one being written.
QUERY_WORKERS = 4
HOURS_IN_FLIGHT = 2


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
    prom = PrometheusClient(settings)
    lake = Lake(settings.lake_path)
    reports: list[HourReport] = []
    keys: set[str] = set()
    query_pool = ThreadPoolExecutor(QUERY_WORKERS, thread_name_prefix="telemetry-query")
    hour_pool = ThreadPoolExecutor(HOURS_IN_FLIGHT, thread_name_prefix="telemetry-hour")
    reader = HourFetcher(settings, prom, query_pool)
    pending: deque[tuple[datetime, Future[HourData]]] = deque()
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
            report = write_hour(lake, data, prom, settings)
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
