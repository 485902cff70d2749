"""From landed Kafka records to one row per usage event per hour (first copy wins).

The landing files hold every Kafka record once; the same event can still be there
several times (a producer retry, a redelivery, a replay). For each hour this step:
- keeps, per event id, the first copy (earliest Kafka timestamp, then partition,
  then offset) if its event time falls in the hour;
- counts later copies with the same content as duplicates;
- quarantines later copies with different content as `conflicting_duplicate`,
  referencing the copy that was kept;
- carries the landing quarantine (invalid events) of the hour along;
- writes `events.parquet`, `quarantine.parquet` and `_manifest.json` for the hour,
  each replacing the previous one atomically (re-running an hour is idempotent).

The manifest records, per Kafka partition, the landing position the hour was built
from. An event for the hour that lands beyond those positions is late: `late_events`
lists the hours that have some, so they can be built again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import polars as pl
import pyarrow as pa

from ingest.lake import Lake, hour_key, parse_hour_key, write_json_atomic, write_parquet_atomic
from ingest.settings import Settings
from ingest.usage_consumer import iter_landing_files
from ingest.usage_validation import LANDING_SCHEMA
from models.errors import InputError

_TS = pa.timestamp("us", tz="UTC")

EVENTS_SCHEMA = pa.schema(
    [
        ("hour_start", _TS),
        ("event_id", pa.string()),
        ("tenant", pa.string()),
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_prompt_tokens", pa.int64()),
        ("event_time", _TS),
        ("arrival_time", _TS),
        ("first_token_time", _TS),
        ("end_time", _TS),
        ("hostname", pa.string()),
        ("gpu_uuids", pa.list_(pa.string())),
        ("status", pa.string()),
        ("source", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("kafka_ts", _TS),
        ("ingested_at", _TS),
        ("copies", pa.int64()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("hour_start", _TS),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("event_id", pa.string()),
        ("tenant", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("kafka_ts", _TS),
        ("ingested_at", _TS),
        ("payload", pa.binary()),
        ("kept_partition", pa.int32()),
        ("kept_offset", pa.int64()),
    ]
)

#: The columns that make up an event's content: copies equal in all of them are one
#: event delivered twice; copies that differ conflict.
CONTENT_COLUMNS = (
    "source",
    "event_time",
    "tenant",
    "model",
    "model_version",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "arrival_time",
    "first_token_time",
    "end_time",
    "hostname",
    "gpu_uuids",
    "status",
)


@dataclass(frozen=True)
class HourReport:
    hour: datetime
    events: int
    duplicates: int
    conflicts: int
    quarantined: int
    late_incorporated: int
    prompt_tokens: int
    completion_tokens: int
    watermark_passed: bool
    seconds: float

    @property
    def duplicate_rate(self) -> float:
        total = self.events + self.duplicates + self.conflicts
        return self.duplicates / total if total else 0.0

    @property
    def quarantine_rate(self) -> float:
        total = self.events + self.duplicates + self.conflicts + self.quarantined
        return (self.conflicts + self.quarantined) / total if total else 0.0


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    if start.tzinfo is None or end.tzinfo is None:
        raise InputError("hours: start and end must carry a time zone (UTC)")
    first = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hours = []
    hour = first
    while hour < end:
        hours.append(hour)
        hour += timedelta(hours=1)
    return hours


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def _landing_snapshot(lake: Lake, topic: str) -> tuple[list[str], dict[int, int]]:
    """The landing files to read, and per partition the position they reach."""
    files: list[str] = []
    positions: dict[int, int] = {}
    for path in iter_landing_files(lake, topic):
        files.append(str(path))
        partition = int(path.parent.name.split("=")[1])
        last = int(path.stem.split("-")[1])
        positions[partition] = max(positions.get(partition, 0), last + 1)
    return files, positions


def _register_landing(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    if files:
        # The directory names (topic=…, partition=…) are not columns: the files carry
        # their own typed ones, and hive detection would shadow them with strings.
        con.execute(
            "CREATE OR REPLACE TEMP VIEW landing AS SELECT * FROM "
            f"read_parquet({files!r}, hive_partitioning = false)"
        )
    else:
        con.register("empty_landing", LANDING_SCHEMA.empty_table())
        con.execute("CREATE OR REPLACE TEMP VIEW landing AS SELECT * FROM empty_landing")


def read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    document: dict[str, Any] = orjson.loads(path.read_bytes())
    return document


def materialize_usage_hours(
    settings: Settings,
    start: datetime,
    end: datetime,
    *,
    topic: str | None = None,
    on_hour: Callable[[HourReport], None] | None = None,
    now: datetime | None = None,
) -> list[HourReport]:
    """Build the hours in [start, end) from what has landed so far."""
    name = topic or settings.kafka.topic
    lake = Lake(settings.lake_path)
    hours = hours_between(start, end)
    if not hours:
        return []
    files, positions = _landing_snapshot(lake, name)
    con = _connect()
    _register_landing(con, files)
    window_start, window_end = hours[0], hours[-1] + timedelta(hours=1)
    content = ", ".join(CONTENT_COLUMNS)
    # Every copy of every id that has a copy in the window: the first copy may lie
    # outside it (then the event belongs to another hour).
    con.execute(
        f"""
        CREATE TEMP TABLE copies AS
        WITH ids AS (
            SELECT DISTINCT event_id FROM landing
            WHERE quarantine_reason IS NULL
              AND event_time >= $start AND event_time < $end
        )
        SELECT l.*,
            row_number() OVER w AS copy_no,
            count(*) OVER (PARTITION BY l.event_id) AS copies,
            first_value(struct_pack({content})) OVER w AS kept_content,
            first_value(l.partition) OVER w AS kept_partition,
            first_value(l."offset") OVER w AS kept_offset,
            first_value(l.event_time) OVER w AS kept_time
        FROM landing l JOIN ids USING (event_id)
        WHERE l.quarantine_reason IS NULL
        WINDOW w AS (PARTITION BY l.event_id ORDER BY l.kafka_ts, l.partition, l."offset"
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
        """,
        {"start": window_start, "end": window_end},
    )
    watermark = timedelta(seconds=settings.ingest.lateness_watermark_s)
    current = now or datetime.now(UTC)
    reports = []
    for hour in hours:
        began = time.perf_counter()
        params = {"start": hour, "end": hour + timedelta(hours=1)}
        events = con.sql(
            """
            SELECT $start AS hour_start, event_id, tenant, model, model_version,
                prompt_tokens, completion_tokens, cached_prompt_tokens, event_time,
                arrival_time, first_token_time, end_time, hostname, gpu_uuids, status,
                source, topic, partition, "offset", kafka_ts, ingested_at, copies
            FROM copies
            WHERE copy_no = 1 AND event_time >= $start AND event_time < $end
            ORDER BY event_time, event_id
            """,
            params=params,
        ).to_arrow_table()
        later = con.sql(
            f"""
            SELECT struct_pack({content}) IS NOT DISTINCT FROM kept_content AS same,
                event_id, tenant, topic, partition, "offset", kafka_ts, ingested_at, payload,
                kept_partition, kept_offset
            FROM copies
            WHERE copy_no > 1 AND kept_time >= $start AND kept_time < $end
            """,
            params=params,
        ).pl()
        duplicates = int(later["same"].sum()) if later.height else 0
        conflicts = later.filter(~pl.col("same"))
        quarantine = con.sql(
            """
            SELECT $start AS hour_start, quarantine_reason AS reason,
                quarantine_detail AS detail, event_id, tenant, topic, partition, "offset",
                kafka_ts, ingested_at, payload,
                NULL::INTEGER AS kept_partition, NULL::BIGINT AS kept_offset
            FROM landing
            WHERE quarantine_reason IS NOT NULL
              AND CASE WHEN quarantine_reason = 'future_event_time' OR event_time IS NULL
                       THEN kafka_ts ELSE event_time END >= $start
              AND CASE WHEN quarantine_reason = 'future_event_time' OR event_time IS NULL
                       THEN kafka_ts ELSE event_time END < $end
            ORDER BY partition, "offset"
            """,
            params=params,
        ).to_arrow_table()
        conflict_rows = pa.table(
            {
                "hour_start": pa.repeat(pa.scalar(hour, _TS), conflicts.height),
                "reason": pa.repeat(pa.scalar("conflicting_duplicate"), conflicts.height),
                "detail": pa.array(
                    [
                        f"usage event {row['event_id']}: content differs from the copy kept "
                        f"at partition {row['kept_partition']} offset {row['kept_offset']}"
                        for row in conflicts.iter_rows(named=True)
                    ],
                    pa.string(),
                ),
                **{
                    c: conflicts[c].to_arrow()
                    for c in (
                        "event_id",
                        "tenant",
                        "topic",
                        "partition",
                        "offset",
                        "kafka_ts",
                        "ingested_at",
                        "payload",
                        "kept_partition",
                        "kept_offset",
                    )
                },
            }
        ).cast(QUARANTINE_SCHEMA)
        all_quarantine = pa.concat_tables([quarantine.cast(QUARANTINE_SCHEMA), conflict_rows])
        directory = lake.usage_hour_dir(name, hour)
        previous = read_manifest(directory / "_manifest.json")
        late = _count_late(events, previous)
        write_parquet_atomic(events.cast(EVENTS_SCHEMA), directory / "events.parquet")
        write_parquet_atomic(all_quarantine, directory / "quarantine.parquet")
        prompt = (
            pl.from_arrow(events.select(["prompt_tokens"]))["prompt_tokens"].sum()
            if events.num_rows
            else 0
        )  # type: ignore[index]
        completion = (
            pl.from_arrow(events.select(["completion_tokens"]))["completion_tokens"].sum()  # type: ignore[index]
            if events.num_rows
            else 0
        )
        report = HourReport(
            hour=hour,
            events=events.num_rows,
            duplicates=duplicates,
            conflicts=conflicts.height,
            quarantined=quarantine.num_rows,
            late_incorporated=late,
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
            watermark_passed=current >= hour + timedelta(hours=1) + watermark,
            seconds=time.perf_counter() - began,
        )
        write_json_atomic(
            {
                "hour": hour_key(hour),
                "topic": name,
                "materialized_at": current.isoformat(),
                "positions": {str(p): o for p, o in sorted(positions.items())},
                "events": report.events,
                "duplicates": report.duplicates,
                "conflicts": report.conflicts,
                "quarantined": report.quarantined,
                "late_incorporated": report.late_incorporated,
                "prompt_tokens": report.prompt_tokens,
                "completion_tokens": report.completion_tokens,
                "watermark_passed": report.watermark_passed,
            },
            directory / "_manifest.json",
        )
        reports.append(report)
        if on_hour is not None:
            on_hour(report)
    con.close()
    return reports


def _count_late(events: pa.Table, previous: dict[str, Any] | None) -> int:
    """Events of this build that landed beyond the previous build's positions."""
    if previous is None or events.num_rows == 0:
        return 0
    positions = {int(p): int(o) for p, o in previous.get("positions", {}).items()}
    frame = pl.from_arrow(events.select(["partition", "offset"]))
    assert isinstance(frame, pl.DataFrame)
    beyond = frame.with_columns(
        pl.col("partition").replace_strict(positions, default=0).alias("built_to")
    ).filter(pl.col("offset") >= pl.col("built_to"))
    return beyond.height


def late_events(settings: Settings, *, topic: str | None = None) -> pl.DataFrame:
    """Per built hour: events for it that landed after it was built (and are new ids)."""
    name = topic or settings.kafka.topic
    lake = Lake(settings.lake_path)
    built: dict[datetime, dict[int, int]] = {}
    topic_dir = lake.usage_topic_dir(name)
    if topic_dir.is_dir():
        for manifest_path in sorted(topic_dir.glob("hour=*/_manifest.json")):
            manifest = read_manifest(manifest_path)
            if manifest is None or manifest.get("topic") != name:
                continue
            hour = parse_hour_key(manifest["hour"])
            built[hour] = {int(p): int(o) for p, o in manifest["positions"].items()}
    empty = pl.DataFrame(schema={"hour_start": pl.Datetime("us", "UTC"), "late_events": pl.Int64})
    if not built:
        return empty
    files, _ = _landing_snapshot(lake, name)
    if not files:
        return empty
    con = _connect()
    _register_landing(con, files)
    con.register(
        "built",
        pa.table(
            {
                "hour_start": pa.array([h for h, ps in built.items() for _ in ps], _TS),
                "partition": pa.array([p for ps in built.values() for p in ps], pa.int32()),
                "built_to": pa.array([o for ps in built.values() for o in ps.values()], pa.int64()),
            }
        ),
    )
    hours = pa.array(list(built), _TS)
    con.register("built_hours", pa.table({"hour_start": hours}))
    known = [str(lake.usage_hour_dir(name, h) / "events.parquet") for h in built]
    known = [k for k in known if Path(k).is_file()]
    if known:
        con.execute(
            "CREATE TEMP VIEW known AS SELECT event_id FROM "
            f"read_parquet({known!r}, hive_partitioning = false)"
        )
    else:
        con.execute("CREATE TEMP VIEW known AS SELECT NULL::VARCHAR AS event_id WHERE false")
    result = con.sql(
        """
        SELECT h.hour_start, count(DISTINCT l.event_id) AS late_events
        FROM landing l
        JOIN built_hours h
          ON l.event_time >= h.hour_start AND l.event_time < h.hour_start + INTERVAL 1 HOUR
        LEFT JOIN built b ON b.hour_start = h.hour_start AND b.partition = l.partition
        WHERE l.quarantine_reason IS NULL
          AND l."offset" >= coalesce(b.built_to, 0)
          AND l.event_id NOT IN (SELECT event_id FROM known)
        GROUP BY h.hour_start
        ORDER BY h.hour_start
        """
    ).pl()
    con.close()
    return result.with_columns(pl.col("late_events").cast(pl.Int64))
