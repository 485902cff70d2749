"""Consuming usage events from Kafka into the lake, exactly once per Kafka record.

Exactly once, across crashes: a landing file holds one partition's records from its
first to its last offset, and appears whole or not at all (written aside, flushed,
renamed). The consumer's position in a partition is therefore what the landing files
say — the last offset of the newest file plus one — stored in the same atomic step as
the rows it covers. Kafka group commits are made after each file for monitoring
only; a reset group, a rebalance or a SIGKILL at any point changes nothing: on start
the consumer deletes leftover temporary files and seeks every partition to its landed
position.

Scale-out: each consumer process takes a set of partitions and an exclusive lock per
partition (an advisory file lock in the partition's landing directory, released by
the kernel when the process dies), never a lock shared by all. Several processes —
one per set of partitions, or Dagster runs of different hours — ingest at once.

Throughput: the poll loop (pure Python in kafka-python) only collects records; a
writer thread decodes, checks and writes each batch in DuckDB, which runs outside the
GIL, so polling and writing overlap.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from ingest.endpoints import check_kafka, kafka_client_options
from ingest.lake import Lake, atomic_path, remove_stale_tmp
from ingest.settings import Settings
from ingest.usage_validation import BATCH_SCHEMA, BatchValidator, Policy
from models.errors import InputError, ServiceError

_FILE = re.compile(r"^(\d{20})-(\d{20})\.parquet$")
_TS = pa.timestamp("us", tz="UTC")


def landing_file_name(first_offset: int, last_offset: int) -> str:
    return f"{first_offset:020d}-{last_offset:020d}.parquet"


def landed_next_offset(directory: Path) -> int | None:
    """The next offset to read in a partition: after its newest landing file."""
    if not directory.is_dir():
        return None
    last = -1
    for entry in os.scandir(directory):
        match = _FILE.match(entry.name)
        if match:
            last = max(last, int(match.group(2)))
    return last + 1 if last >= 0 else None


#: Beside a topic's landing partitions: the Kafka topic id its offsets belong to.
TOPIC_ID_FILE = "topic_id"
_NO_TOPIC_ID = {"", "None", "00000000-0000-0000-0000-000000000000"}


def kafka_topic_id(options: dict[str, object], name: str) -> str | None:
    """The topic's id: Kafka (2.8 on) and Tansu give a topic a new UUID when it is
    created, so a topic deleted and created again under the same name, or one on a
    broker that lost its data (Tansu's in-memory store after a restart), has another.
    None when the broker reports none."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**options)
    try:
        described = admin.describe_topics([name])
    finally:
        admin.close()
    topic_id = str(described[0].get("topic_id")) if described else ""
    return None if topic_id in _NO_TOPIC_ID else topic_id


def check_topic_generation(lake: Lake, name: str, topic_id: str | None) -> None:
    """Refuse to read on from landed offsets that belong to an earlier topic of the
    same name: its offsets started again at 0, so "landed up to offset N" would skip
    the new topic's first N events without a word. The first ingest of a topic records
    its id; a broker that reports none is not checked."""
    if topic_id is None:
        return
    path = lake.usage_landing / f"topic={name}" / TOPIC_ID_FILE
    if path.is_file():
        landed = path.read_text(encoding="utf-8").strip()
        if landed and landed != topic_id:
            raise ServiceError(
                f"Kafka topic {name!r} is not the one the lake landed: its id is now "
                f"{topic_id}, the landed offsets belong to {landed} (the topic was "
                "deleted and created again, or the broker lost its data), so they no "
                "longer say what was read. Nothing was ingested. To ingest the new topic, "
                f"move {path.parent} aside (the hours already built keep their events) "
                "or publish to a new topic name."
            )
        return
    with atomic_path(path) as tmp:
        tmp.write_text(f"{topic_id}\n", encoding="utf-8")


def set_aside_landing_of_a_replaced_topic(settings: Settings, name: str) -> Path | None:
    """For a demo's own scratch lake: when the broker's topic `name` is not the one the
    lake landed (the local stack's in-memory Kafka restarted), move that topic's landing
    files aside (under `usage/landing-replaced/`), so the next ingest reads the new topic
    from its start. Returns where they went, or None when nothing had to move. Hours
    already built keep their events; a rebuild of one reads only the new topic."""
    lake = Lake(settings.lake_path)
    topic_dir = lake.usage_landing / f"topic={name}"
    landed_file = topic_dir / TOPIC_ID_FILE
    if not landed_file.is_file():
        return None
    landed = landed_file.read_text(encoding="utf-8").strip()
    current = None
    if name in check_kafka(settings):
        current = kafka_topic_id(kafka_client_options(settings), name)
    if current is None or current == landed:
        return None
    target = lake.root / "usage" / "landing-replaced" / f"topic={name}" / f"id={landed}"
    target.parent.mkdir(parents=True, exist_ok=True)
    topic_dir.rename(target)
    return target


def _read_registry(path: Path) -> list[dict[str, object]]:
    """The entries of a registry file (each with an `id`); problems name the file."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(
            f"tenant registry {path}: not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    except OSError as exc:
        raise InputError(f"tenant registry {path}: cannot read: {exc.strerror}") from None
    tenants = document.get("tenants") if isinstance(document, dict) else None
    if not isinstance(tenants, list):
        raise InputError(f"tenant registry {path}: expected a list under 'tenants'")
    entries: list[dict[str, object]] = []
    for i, entry in enumerate(tenants):
        tenant_id = entry.get("id") if isinstance(entry, dict) else entry
        if not isinstance(tenant_id, str) or not tenant_id:
            raise InputError(
                f"tenant registry {path}: tenants[{i}].id: expected a non-empty string"
            )
        entries.append(dict(entry) if isinstance(entry, dict) else {"id": tenant_id})
    return entries


def load_tenant_registry(settings: Settings) -> frozenset[str] | None:
    """Tenant ids from the registry file; None when there is no registry (all known)."""
    path = settings.tenants_path
    if not path.is_file():
        if settings.ingest.tenants_file is not None:
            raise InputError(f"tenant registry {path} does not exist")
        return None
    return frozenset(str(entry["id"]) for entry in _read_registry(path))


def register_tenants(settings: Settings, tenant_ids: list[str]) -> Path:
    """Add tenant ids to the registry file (created if absent), keeping every entry and
    field already there."""
    path = settings.tenants_path
    entries = _read_registry(path) if path.is_file() else []
    known = {entry["id"] for entry in entries}
    entries += [{"id": t} for t in dict.fromkeys(tenant_ids) if t not in known]
    with atomic_path(path) as tmp:
        tmp.write_text(
            "# Known tenants: usage events for any other subject are quarantined.\n"
            + yaml.safe_dump({"tenants": entries}, sort_keys=False)
        )
    return path


class PartitionLocks:
    """Exclusive per-partition locks (flock), held for the life of a consumer."""

    def __init__(
        self,
        directories: dict[int, Path],
        timeout_s: float,
        on_wait: Callable[[int], None] | None = None,
    ) -> None:
        self._handles: dict[int, int] = {}
        deadline = time.monotonic() + timeout_s
        try:
            for partition, directory in sorted(directories.items()):
                directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            os.close(fd)
                            raise ServiceError(
                                f"partition {partition} is being consumed by another process: "
                                f"waited {timeout_s:g} s for its lock {directory / '.lock'}"
                            ) from None
                        if on_wait is not None:
                            on_wait(partition)
                            on_wait = None  # say it once
                        time.sleep(0.05)
                self._handles[partition] = fd
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for fd in self._handles.values():
            with contextlib.suppress(OSError):
                os.close(fd)  # closing releases the flock
        self._handles.clear()


@dataclass
class _Pending:
    """Records polled but not yet written, per partition."""

    offsets: dict[int, list[int]] = field(default_factory=dict)
    timestamps: dict[int, list[int]] = field(default_factory=dict)
    keys: dict[int, list[bytes | None]] = field(default_factory=dict)
    values: dict[int, list[bytes]] = field(default_factory=dict)
    count: int = 0

    def add(self, partition: int, records: list) -> None:  # type: ignore[type-arg]
        offsets = self.offsets.setdefault(partition, [])
        timestamps = self.timestamps.setdefault(partition, [])
        keys = self.keys.setdefault(partition, [])
        values = self.values.setdefault(partition, [])
        offsets.extend([r.offset for r in records])
        timestamps.extend([r.timestamp for r in records])
        keys.extend([r.key for r in records])
        values.extend([r.value if r.value is not None else b"" for r in records])
        self.count += len(records)


@dataclass
class ConsumeStats:
    records: int = 0
    valid: int = 0
    quarantined: int = 0
    files: int = 0
    positions: dict[int, int] = field(default_factory=dict)  # next offset per partition
    latest_ts_ms: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ConsumeReport:
    topic: str
    partitions: tuple[int, ...]
    records: int
    valid: int
    quarantined: int
    files: int
    seconds: float
    positions: dict[int, int]
    stopped_because: str

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class StopWhen:
    """When `consume` returns. Unset conditions never fire; SIGTERM/stop_event always."""

    idle_s: float | None = 2.0  # caught up: past the end offsets and nothing new for this long
    max_records: int | None = None
    stop_event: threading.Event | None = None


class _Writer(threading.Thread):
    """Validates and lands batches handed over by the poll loop, in order."""

    def __init__(
        self, lake: Lake, topic: str, policy: Policy, consumer_id: str, stats: ConsumeStats
    ) -> None:
        super().__init__(name="landing-writer", daemon=True)
        self.lake = lake
        self.topic = topic
        self.policy = policy
        self.consumer_id = consumer_id
        self.stats = stats
        self.inbox: queue.Queue[_Pending | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.on_written: Callable[[int, int], None] | None = None  # (partition, next offset)

    def run(self) -> None:
        validator = BatchValidator(self.policy)
        try:
            while True:
                pending = self.inbox.get()
                if pending is None:
                    return
                self._write(validator, pending)
        except BaseException as exc:  # reported by the poll loop
            self.error = exc
        finally:
            validator.close()

    def _write(self, validator: BatchValidator, pending: _Pending) -> None:
        ingested_at = datetime.now(UTC)
        partitions = sorted(p for p, offsets in pending.offsets.items() if offsets)
        if not partitions:
            return
        # One validation for the whole batch (fewer round trips between threads), then
        # one file per partition, each covering a contiguous run of that partition.
        sizes = [len(pending.offsets[p]) for p in partitions]
        total = sum(sizes)
        batch = pa.table(
            {
                "topic": pa.repeat(pa.scalar(self.topic, pa.string()), total),
                "partition": pa.array(
                    np.repeat(np.asarray(partitions, np.int32), sizes), pa.int32()
                ),
                "offset": pa.array(
                    np.concatenate([np.asarray(pending.offsets[p], np.int64) for p in partitions])
                ),
                "kafka_ts": pa.array(
                    np.concatenate(
                        [np.asarray(pending.timestamps[p], np.int64) for p in partitions]
                    )
                    * 1000
                ).cast(_TS),
                "key": pa.array([k for p in partitions for k in pending.keys[p]], pa.binary()),
                "payload": pa.array(
                    [v for p in partitions for v in pending.values[p]], pa.binary()
                ),
            },
            schema=BATCH_SCHEMA,
        )
        landed = validator.validate(batch, ingested_at=ingested_at, consumer=self.consumer_id)
        start = 0
        for partition, size in zip(partitions, sizes, strict=True):
            part = landed.slice(start, size)
            start += size
            offsets = pending.offsets[partition]
            if part.column("offset")[0].as_py() != offsets[0] or (
                part.column("offset")[size - 1].as_py() != offsets[-1]
            ):
                raise RuntimeError("landing rows came back out of order; nothing was written")
            directory = self.lake.landing_partition_dir(self.topic, partition)
            final = directory / landing_file_name(offsets[0], offsets[-1])
            with atomic_path(final) as tmp:
                pq.write_table(part, tmp, compression="zstd")
            valid = part.column("quarantine_reason").null_count
            self.stats.records += size
            self.stats.valid += valid
            self.stats.quarantined += size - valid
            self.stats.files += 1
            self.stats.positions[partition] = offsets[-1] + 1
            self.stats.latest_ts_ms[partition] = max(pending.timestamps[partition])
            if self.on_written is not None:
                self.on_written(partition, offsets[-1] + 1)


def consume(
    settings: Settings,
    *,
    partitions: list[int] | None = None,
    stop: StopWhen | None = None,
    topic: str | None = None,
    on_progress: Callable[[ConsumeStats], None] | None = None,
    on_wait: Callable[[int], None] | None = None,
) -> ConsumeReport:
    """Consume `topic` (default: the usage topic) into the lake until `stop` says so."""
    stop = stop or StopWhen()
    name = topic or settings.kafka.topic
    available = check_kafka(settings)
    if name not in available:
        raise ServiceError(
            f"Kafka topic {name!r} does not exist (topics: {', '.join(available) or 'none'})"
        )
    lake = Lake(settings.lake_path)
    options = kafka_client_options(settings)
    where = options["bootstrap_servers"]
    try:
        topic_id = kafka_topic_id(options, name)
    except KafkaError as exc:
        raise ServiceError(
            f"Kafka at {where}: describing topic {name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    check_topic_generation(lake, name, topic_id)
    try:
        consumer = KafkaConsumer(
            **options,
            group_id=settings.ingest.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=16 << 20,
            max_poll_records=50_000,
            client_id=f"gpuledger-consumer-{socket.gethostname()}-{os.getpid()}",
        )
    except KafkaError as exc:
        raise ServiceError(
            f"Kafka at {where} is unreachable: {type(exc).__name__}: {exc}"
        ) from None
    locks: PartitionLocks | None = None
    writer: _Writer | None = None
    began = time.perf_counter()
    stats = ConsumeStats()
    reason = "stopped"
    try:
        all_partitions = sorted(consumer.partitions_for_topic(name) or [])
        chosen = sorted(set(partitions)) if partitions is not None else all_partitions
        unknown = sorted(set(chosen) - set(all_partitions))
        if unknown:
            raise InputError(
                f"--partitions: topic {name!r} has partitions {all_partitions[0]}-"
                f"{all_partitions[-1]}; no partition {', '.join(map(str, unknown))}"
            )
        directories = {p: lake.landing_partition_dir(name, p) for p in chosen}
        locks = PartitionLocks(directories, settings.ingest.lock_timeout_s, on_wait)
        tps = [TopicPartition(name, p) for p in chosen]
        consumer.assign(tps)
        beginning = consumer.beginning_offsets(tps)
        for tp in tps:
            remove_stale_tmp(directories[tp.partition])
            landed = landed_next_offset(directories[tp.partition])
            position = max(landed if landed is not None else 0, beginning[tp])
            consumer.seek(tp, position)
            stats.positions[tp.partition] = position
        end = consumer.end_offsets(tps)
        policy = Policy(
            max_prompt_tokens=settings.ingest.max_prompt_tokens,
            max_completion_tokens=settings.ingest.max_completion_tokens,
            max_future_s=settings.ingest.max_future_s,
            known_tenants=load_tenant_registry(settings),
        )
        consumer_id = f"{socket.gethostname()}:{os.getpid()}"
        writer = _Writer(lake, name, policy, consumer_id, stats)
        group_commit = _GroupCommitter(consumer, name)
        writer.on_written = group_commit.mark
        writer.start()
        reason = _poll_loop(consumer, writer, tps, end, settings, stop, stats, on_progress)
        writer.inbox.put(None)
        writer.join()
        if writer.error is not None:
            raise writer.error
        group_commit.commit()
    except KafkaError as exc:
        raise ServiceError(f"Kafka at {where}: consuming {name!r} failed: {exc}") from None
    finally:
        if writer is not None and writer.is_alive():
            with contextlib.suppress(queue.Full):
                writer.inbox.put_nowait(None)
            writer.join(timeout=60)
        consumer.close(autocommit=False)
        if locks is not None:
            locks.release()
    return ConsumeReport(
        topic=name,
        partitions=tuple(sorted(stats.positions)),
        records=stats.records,
        valid=stats.valid,
        quarantined=stats.quarantined,
        files=stats.files,
        seconds=time.perf_counter() - began,
        positions=dict(stats.positions),
        stopped_because=reason,
    )


def _poll_loop(
    consumer: KafkaConsumer,
    writer: _Writer,
    tps: list[TopicPartition],
    end: dict[TopicPartition, int],
    settings: Settings,
    stop: StopWhen,
    stats: ConsumeStats,
    on_progress: Callable[[ConsumeStats], None] | None,
) -> str:
    pending = _Pending()
    batch_started = time.monotonic()
    last_record = time.monotonic()
    polled = 0
    max_records = settings.ingest.batch_max_records
    max_age = settings.ingest.batch_max_s

    def hand_over() -> None:
        nonlocal pending, batch_started
        if pending.count:
            if writer.error is not None:
                raise writer.error
            writer.inbox.put(pending)  # blocks when the writer is two batches behind
            pending = _Pending()
        batch_started = time.monotonic()
        if on_progress is not None:
            on_progress(stats)

    def caught_up() -> bool:
        # Past the reported end offsets (Tansu under-reports them, so also quiet).
        return all(consumer.position(tp) >= end[tp] for tp in tps)

    while True:
        if writer.error is not None:
            raise writer.error
        if stop.stop_event is not None and stop.stop_event.is_set():
            hand_over()
            return "stop requested"
        if stop.max_records is not None and polled >= stop.max_records:
            hand_over()
            return "max records"
        batch = consumer.poll(timeout_ms=200)
        now = time.monotonic()
        for tp, records in batch.items():
            if stop.max_records is not None:
                records = records[: max(0, stop.max_records - polled)]
            polled += len(records)
            # batch_max_records is a maximum: a poll larger than the room left is split.
            while records:
                room = max_records - pending.count
                pending.add(tp.partition, records[:room])
                records = records[room:]
                if pending.count >= max_records:
                    hand_over()
        if batch:
            last_record = now
        if pending.count >= max_records or (now - batch_started) >= max_age:
            hand_over()
        if (
            not batch
            and stop.idle_s is not None
            and now - last_record >= stop.idle_s
            and caught_up()
        ):
            hand_over()
            return "caught up"


class _GroupCommitter:
    """Advisory group offsets: what monitoring tools show as this group's lag."""

    def __init__(self, consumer: KafkaConsumer, topic: str) -> None:
        self._consumer = consumer
        self._topic = topic
        self._positions: dict[int, int] = {}
        self._lock = threading.Lock()
        self.failed: str | None = None

    def mark(self, partition: int, next_offset: int) -> None:
        with self._lock:
            self._positions[partition] = next_offset

    def commit(self) -> None:
        with self._lock:
            offsets = {
                TopicPartition(self._topic, p): OffsetAndMetadata(o, "", -1)
                for p, o in self._positions.items()
            }
        if not offsets:
            return
        try:
            self._consumer.commit(offsets)
        except Exception as exc:  # advisory only: never fail ingestion over it
            self.failed = f"{type(exc).__name__}: {exc}"


def iter_landing_files(lake: Lake, topic: str) -> Iterator[Path]:
    root = lake.usage_landing / f"topic={topic}"
    if root.is_dir():
        yield from sorted(p for p in root.glob("partition=*/*.parquet") if _FILE.match(p.name))
