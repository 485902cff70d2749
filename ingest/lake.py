"""The raw lake: Parquet files under one directory, read through a DuckDB catalog.

Why Parquet files and not tables in one DuckDB file: a DuckDB file admits one writing
process at a time, and ingestion scales out by running several consumers (one per set
of Kafka partitions) and several Dagster runs (one per hour) at once. Each writer here
owns its own files, so none waits for a shared lock; readers (dbt, analysts) see the
files through views in the warehouse (`ingest/catalog.py`).

Every file appears whole or not at all: it is written under a temporary name in its
final directory, flushed to disk, and renamed (an atomic replace on POSIX), and the
directory entry is flushed too. A process killed mid-write leaves only a temporary
file, which readers never match and writers delete on start.

Layout (`settings.lake_path`):

    usage/landing/topic=<topic>/partition=<p>/<first offset>-<last offset>.parquet
        every Kafka record exactly once, decoded, with quarantine reasons
    usage/events/topic=<topic>/hour=<YYYY-MM-DDTHH>/events.parquet
        (+ quarantine.parquet, _manifest.json)
        one row per event id whose time falls in the hour (first copy wins)
    telemetry/samples/hour=<YYYY-MM-DDTHH>/samples.parquet (+ _manifest.json)
        DCGM samples per GPU as scraped, with resets, gaps and placeholders marked
    billing/revenue/period=<YYYY-MM>/revenue.parquet
        what each period's invoices billed per tenant and model (pipelines/billing)
    reference/grid_intensity/table/grid_intensity.parquet
        the configured grid carbon intensity per UTC hour (ingest/grid_intensity.py)
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_SUFFIX = ".tmp"
#: `billing/revenue`: written by pipelines/billing/index.py, read by dbt.
_REVENUE_MONEY = pa.decimal128(18, 6)
REVENUE_SCHEMA = pa.schema(
    [
        ("period", pa.string()),
        ("tenant", pa.string()),
        ("model", pa.string()),
        ("currency", pa.string()),
        ("billed", _REVENUE_MONEY),
        ("invoice_status", pa.string()),
        ("invoice_number", pa.string()),
        ("written_at", pa.timestamp("us", tz="UTC")),
    ]
)

HOUR_FORMAT = "%Y-%m-%dT%H"


def hour_key(hour_start: datetime) -> str:
    """`2026-11-23T05` for the hour starting at 05:00 UTC."""
    return hour_start.astimezone(UTC).strftime(HOUR_FORMAT)


def parse_hour_key(key: str) -> datetime:
    return datetime.strptime(key, HOUR_FORMAT).replace(tzinfo=UTC)


class Lake:
    """Paths of the lake's datasets under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def usage_landing(self) -> Path:
        return self.root / "usage" / "landing"

    def landing_partition_dir(self, topic: str, partition: int) -> Path:
        return self.usage_landing / f"topic={topic}" / f"partition={partition:05d}"

    @property
    def usage_events(self) -> Path:
        return self.root / "usage" / "events"

    def usage_topic_dir(self, topic: str) -> Path:
        return self.usage_events / f"topic={topic}"

    def usage_hour_dir(self, topic: str, hour_start: datetime) -> Path:
        return self.usage_topic_dir(topic) / f"hour={hour_key(hour_start)}"

    @property
    def telemetry_samples(self) -> Path:
        return self.root / "telemetry" / "samples"

    def telemetry_hour_dir(self, hour_start: datetime) -> Path:
        return self.telemetry_samples / f"hour={hour_key(hour_start)}"

    @property
    def billing_revenue(self) -> Path:
        return self.root / "billing" / "revenue"

    @property
    def grid_intensity(self) -> Path:
        return self.root / "reference" / "grid_intensity"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it replaces `final` durably."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet_atomic(table: pa.Table, final: Path, *, compression: str = "zstd") -> None:
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression=compression)


def write_json_atomic(document: dict[str, Any], final: Path) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_tmp(directory: Path) -> int:
    """Delete temporary files a killed writer left behind; returns how many."""
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def ensure_empty_file(path: Path, schema: pa.Schema) -> None:
    """A zero-row file with the dataset's schema, so a glob over it always matches."""
    if not path.exists():
        write_parquet_atomic(schema.empty_table(), path)
