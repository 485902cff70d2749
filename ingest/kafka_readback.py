"""Reading a topic back from the beginning to its end, without a consumer group.

Used to check what a run published (the demo, tests). The billing consumer with its
exactly-once bookkeeping is a different component; this one commits nothing.

The end is where the log goes quiet, not the broker's reported end offset: Tansu
0.6.0 (the local stack's broker) answers ListOffsets(latest) with the last record
batch's base offset + 1, short of the true log end by that batch's size minus one.
Reading stops once every partition is past the reported end and a poll brings nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from ingest.endpoints import check_kafka, kafka_client_options
from ingest.settings import Settings
from models.errors import ServiceError


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = -1


def read_topic(
    settings: Settings,
    topic: str | None = None,
    *,
    on_progress: Callable[[int], None] | None = None,
    poll_timeout_s: float = 30.0,
) -> Iterator[Record]:
    """Every record of `topic` up to the end offsets seen when reading starts."""
    name = topic or settings.kafka.topic
    topics = check_kafka(settings)
    if name not in topics:
        return
    options = kafka_client_options(settings)
    where = options["bootstrap_servers"]
    try:
        consumer = KafkaConsumer(
            **options,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=16 << 20,
            max_poll_records=10_000,
        )
    except KafkaError as exc:
        raise ServiceError(
            f"Kafka at {where} is unreachable: {type(exc).__name__}: {exc}"
        ) from None
    try:
        # A fresh consumer may not have the topic's metadata yet (a topic created a
        # moment ago): ask for it until its partitions are known.
        deadline = time.monotonic() + poll_timeout_s
        known = consumer.partitions_for_topic(name)
        while not known and time.monotonic() < deadline:
            consumer.topics()  # a metadata request
            known = consumer.partitions_for_topic(name)
            if not known:
                time.sleep(0.1)
        partitions = [TopicPartition(name, p) for p in sorted(known or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)

        def past_end() -> bool:
            return all(consumer.position(tp) >= end[tp] for tp in partitions)

        while True:
            quiet_ms = 1000 if past_end() else int(poll_timeout_s * 1000)
            batch = consumer.poll(timeout_ms=quiet_ms)
            if not batch:
                if past_end():
                    return
                raise ServiceError(
                    f"Kafka at {where}: no records for {poll_timeout_s:.0f} s while reading "
                    f"{name!r} before its end offsets"
                )
            count = 0
            for tp, records in batch.items():
                for record in records:
                    count += 1
                    yield Record(
                        tp.partition,
                        record.offset,
                        record.key,
                        record.value,
                        tuple(record.headers or ()),
                        record.timestamp,
                    )
            if on_progress is not None:
                on_progress(count)
    except KafkaError as exc:
        raise ServiceError(f"Kafka at {where}: reading {name!r} failed: {exc}") from None
    finally:
        consumer.close()
