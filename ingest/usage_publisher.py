"""Publishing usage events to Kafka (structured-mode CloudEvents, keyed by event id).

Delivery is at least once: the producer retries, so a retried batch can be written
twice; the consumer deduplicates by event id (the key). Events are keyed by id so they
spread evenly over partitions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from ingest.endpoints import check_kafka, kafka_client_options
from ingest.settings import Settings
from models.errors import ServiceError

#: CloudEvents Kafka protocol binding, structured content mode.
CONTENT_TYPE_HEADER = ("content-type", b"application/cloudevents+json; charset=UTF-8")
_CHUNK = 20_000

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class PublishReport:
    topic: str
    published: int
    bytes: int


def ensure_topic(settings: Settings, topic: str | None = None) -> str:
    """Create the usage topic with the configured partitions if it does not exist."""
    name = topic or settings.kafka.topic
    existing = check_kafka(settings)  # fails fast, in one line, when Kafka is unreachable
    if name in existing:
        return name
    options = kafka_client_options(settings)
    where = options["bootstrap_servers"]
    try:
        admin = KafkaAdminClient(**options)
    except KafkaError as exc:
        raise ServiceError(
            f"Kafka at {where} is unreachable: {type(exc).__name__}: {exc}"
        ) from None
    try:
        if name not in admin.list_topics():
            topic_spec = NewTopic(
                name, num_partitions=settings.kafka.topic_partitions, replication_factor=1
            )
            # Created meanwhile by someone else: fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([topic_spec])
    except KafkaError as exc:
        raise ServiceError(
            f"Kafka at {where}: cannot create topic {name!r}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        admin.close()
    return name


def publish(
    settings: Settings,
    keys: Sequence[bytes],
    values: Sequence[bytes],
    *,
    topic: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> PublishReport:
    """Send every (key, value) and wait until the broker has acknowledged them all."""
    name = ensure_topic(settings, topic)
    options = kafka_client_options(settings)
    where = options["bootstrap_servers"]
    try:
        producer = KafkaProducer(
            **options,
            acks="all",
            linger_ms=20,
            batch_size=1 << 20,
            max_request_size=16 << 20,
            retries=10,
        )
    except KafkaError as exc:
        raise ServiceError(
            f"Kafka at {where} is unreachable: {type(exc).__name__}: {exc}"
        ) from None
    sent_bytes = 0
    headers = [CONTENT_TYPE_HEADER]
    try:
        for begin in range(0, len(values), _CHUNK):
            futures: list[Any] = []
            chunk_keys = keys[begin : begin + _CHUNK]
            chunk_values = values[begin : begin + _CHUNK]
            for key, value in zip(chunk_keys, chunk_values, strict=True):
                futures.append(producer.send(name, key=key, value=value, headers=headers))
                sent_bytes += len(value)
            producer.flush()
            failed = [f for f in futures if f.failed()]
            if failed:
                raise ServiceError(
                    f"Kafka at {where}: {len(failed)} of {len(futures)} events in a batch "
                    f"were not acknowledged on {name!r}: {failed[0].exception}"
                )
            if on_progress is not None:
                on_progress(len(futures))
    except KafkaError as exc:
        raise ServiceError(
            f"Kafka at {where}: publishing failed: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        producer.close(timeout=10)
    return PublishReport(topic=name, published=len(values), bytes=sent_bytes)
