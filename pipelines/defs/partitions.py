"""The hourly partitions shared by the ingest domains (usage, telemetry).

One `HourlyPartitionsDefinition` so that a usage hour and a telemetry hour have the
same key (`2026-11-23-05:00` is 05:00–06:00 UTC) and one run can carry both.
`end_offset=0`: the newest partition is the last hour that has ended; the hour in
progress is not a partition yet.

Also here: turning a run's partition keys (one key, or a single-run backfill's range)
into the UTC window `[start, end)` that the ingest functions take.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from models.errors import InputError

__all__ = [
    "HOURLY_PARTITIONS",
    "PARTITIONS_START",
    "hour_partition_key",
    "hourly_asset",
    "partition_keys_between",
    "provisional_hours",
    "run_window",
    "window_of_keys",
]

#: The first hour any gpuledger fleet can have data for.
PARTITIONS_START = datetime(2024, 1, 1, tzinfo=UTC)

HOURLY_PARTITIONS = dg.HourlyPartitionsDefinition(
    start_date=PARTITIONS_START.strftime("%Y-%m-%d-%H:%M"),
    timezone="UTC",
    end_offset=0,
)


def hourly_asset(
    *, group_name: str, kinds: set[str], deps: Sequence[Any] | None = None
) -> Callable[[Any], Any]:
    """`dg.asset` on the hourly partitions, backfilled as one run.

    `backfill_policy` is beta in Dagster 1.13 and warns at import. A backfill of many
    hours as one run (one consume, one pass over the landing files) is intended, so the
    warning is silenced for this decorator only.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.asset(
            partitions_def=HOURLY_PARTITIONS,
            backfill_policy=dg.BackfillPolicy.single_run(),
            group_name=group_name,
            kinds=kinds,
            deps=deps,
        )


def hour_partition_key(hour_start: datetime) -> str:
    """`2026-11-23-05:00` for the hour starting at 05:00 UTC."""
    return hour_start.astimezone(UTC).strftime(HOURLY_PARTITIONS.fmt)


def window_of_keys(first_key: str, last_key: str) -> tuple[datetime, datetime]:
    """The UTC window `[start, end)` covered by the partitions first_key..last_key."""
    start = HOURLY_PARTITIONS.time_window_for_partition_key(first_key).start
    end = HOURLY_PARTITIONS.time_window_for_partition_key(last_key).end
    return start.astimezone(UTC), end.astimezone(UTC)


def run_window(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
) -> tuple[datetime, datetime] | None:
    """The window of the run's partition key or key range; None for an unpartitioned run
    (an asset check launched on its own from the UI)."""
    step = context.op_execution_context.get_step_execution_context()
    if not step.has_partitions:
        return None
    keys = step.partition_key_range
    return window_of_keys(keys.start, keys.end)


def partition_keys_between(start: datetime, end: datetime, *, open_hour: bool = False) -> list[str]:
    """Keys of the hours overlapping `[start, end)`; each must have ended already, except,
    with `open_hour`, the hour in progress (a provisional run: see `provisional_hours`)."""
    if start.tzinfo is None or end.tzinfo is None:
        raise InputError("ingest window: start and end must carry a time zone (UTC)")
    if end <= start:
        raise InputError(f"ingest window: end ({end.isoformat()}) must be after start")
    first = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if first < PARTITIONS_START:
        raise InputError(
            f"ingest window: start {start.isoformat()} is before the first partition "
            f"({PARTITIONS_START.isoformat()})"
        )
    keys = []
    hour = first
    while hour < end:
        keys.append(hour_partition_key(hour))
        hour += timedelta(hours=1)
    last_ended = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    if open_hour:
        last_ended += timedelta(hours=1)
    if hour > last_ended:
        raise InputError(
            f"ingest window: end {end.isoformat()} reaches into an hour that has not ended "
            f"(the newest partition ends at {last_ended.isoformat()})"
        )
    return keys


@contextlib.contextmanager
def provisional_hours() -> Iterator[None]:
    """Let Dagster see the hour in progress as a partition, for one provisional run.

    The live demo bills traffic minutes after it was served, inside the hour. Dagster's
    partitions end at the last hour that has ended (`end_offset=0`), so within this
    context the effective time is the end of the hour in progress. A provisional run
    covers what has arrived so far; the scheduled run after the hour ends replaces
    every row of it (each asset replaces its hours).
    """
    now = datetime.now(UTC)
    hour_end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    with dg.partition_loading_context(effective_dt=hour_end + timedelta(seconds=1)):
        yield


def definitions() -> dg.Definitions:
    """Nothing to register: the loader merges every module under `pipelines/defs/`."""
    return dg.Definitions()
