"""The gateway's forwarder: spooled usage events to Kafka, in order, at least once.

A thread loops: take up to `forward_batch` pending events from the spool, send each to
the usage topic in spool order (key = event id, value = the event JSON, the CloudEvents
content-type header), flush, check every send succeeded, then acknowledge the last one
in the spool. Any failure — Kafka down, a send refused, a flush timing out — closes the
producer, waits `forward_retry_s` and starts over from the first unacknowledged event
with a new producer (and `ensure_topic`: a restarted in-memory broker has lost the
topic). Events may reach Kafka twice; consumers deduplicate by event id.

`max_in_flight_requests_per_connection=1` keeps a partition's order through producer
retries; `acks="all"` makes an acknowledgement mean the broker has it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ingest.gateway.spool import Spool
from ingest.settings import Settings

__all__ = ["Forwarder", "Producer", "kafka_producer_factory"]

log = logging.getLogger("gpuledger.gateway.forwarder")


class Producer(Protocol):
    """What the forwarder uses of kafka-python's KafkaProducer."""

    def send(
        self, topic: str, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> Any: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


def kafka_producer_factory(settings: Settings) -> Callable[[], Producer]:
    """A factory of real producers: checks the topic exists (creating it), then connects."""

    def connect() -> Producer:
        from kafka import KafkaProducer

        from ingest.endpoints import kafka_client_options
        from ingest.usage_publisher import ensure_topic

        ensure_topic(settings)
        options = kafka_client_options(settings)
        timeout_ms = options["request_timeout_ms"]
        producer: Producer = KafkaProducer(
            **options,
            acks="all",
            max_in_flight_requests_per_connection=1,
            retries=3,
            linger_ms=5,
            max_block_ms=timeout_ms,
            max_request_size=16 << 20,
        )
        return producer

    return connect


def _event_key(payload: bytes) -> bytes | None:
    try:
        event_id = json.loads(payload).get("id")
    except (ValueError, AttributeError):
        return None
    return event_id.encode() if isinstance(event_id, str) else None


class Forwarder:
    """Forwards the spool's pending events to `settings.kafka.topic`; see the module doc."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        *,
        producer_factory: Callable[[], Producer] | None = None,
        idle_wait_s: float = 1.0,
        linger_s: float = 0.05,
    ) -> None:
        from ingest.usage_publisher import CONTENT_TYPE_HEADER

        self.settings = settings
        self.spool = spool
        self.topic = settings.kafka.topic
        self.batch = settings.gateway.forward_batch
        self.retry_s = settings.gateway.forward_retry_s
        self.flush_timeout_s = max(5.0, settings.kafka.request_timeout_s * 3)
        self._factory = producer_factory or kafka_producer_factory(settings)
        self._headers = [CONTENT_TYPE_HEADER]
        self._idle_wait_s = idle_wait_s
        self._linger_s = linger_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._resumed = threading.Event()
        self._resumed.set()
        self._batch_lock = threading.Lock()
        self._drain_deadline: float | None = None
        self._producer: Producer | None = None
        self._thread: threading.Thread | None = None
        self.forwarded = 0
        self.attempts = 0
        self.failures = 0
        self.last_error: str | None = None
        self.kafka_up = False

    # -- control -----------------------------------------------------------------------

    def start(self) -> Forwarder:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gateway-forwarder", daemon=True)
            self._thread.start()
        return self

    def wake(self) -> None:
        """New events are in the spool."""
        self._wake.set()

    def pause(self) -> None:
        """Hold new events in the spool (say, for a Kafka maintenance window); returns
        once no batch is in flight, so everything forwarded so far is on the broker."""
        self._resumed.clear()
        with self._batch_lock:
            pass

    def resume(self) -> None:
        self._resumed.set()
        self._wake.set()

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Send what can be sent within `drain_timeout_s`, then stop (the rest stays in
        the spool for the next start)."""
        self._drain_deadline = time.monotonic() + drain_timeout_s
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(drain_timeout_s + self.flush_timeout_s + 5.0)
        self._close_producer()

    @property
    def pending(self) -> int:
        return self.spool.pending_count

    def counters(self) -> dict[str, Any]:
        return {
            "forwarded": self.forwarded,
            "pending": self.pending,
            "attempts": self.attempts,
            "failures": self.failures,
            "last_error": self.last_error,
            "kafka_up": self.kafka_up,
        }

    # -- the loop ------------------------------------------------------------------------

    def _draining_over(self) -> bool:
        return (
            self._stop.is_set()
            and self._drain_deadline is not None
            and time.monotonic() >= self._drain_deadline
        )

    def _sleep(self, seconds: float) -> None:
        """Wait `seconds`, less when stopping and the drain deadline comes first."""
        if self._drain_deadline is not None:
            seconds = min(seconds, max(0.0, self._drain_deadline - time.monotonic()))
        self._wake.wait(seconds) if not self._stop.is_set() else time.sleep(seconds)

    def _run(self) -> None:
        while not self._draining_over():
            if not self._resumed.is_set() and not self._stop.is_set():
                self._resumed.wait(0.2)
                continue
            try:
                batch = self.spool.pending(limit=self.batch)
            except Exception as exc:  # a corrupt spool: say so, never skip a record
                self._failed(f"reading the spool failed: {exc}")
                self._sleep(self.retry_s)
                continue
            if not batch:
                if self._stop.is_set():
                    break
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                # Let events gather for a moment: one send, flush and spool ack per
                # batch instead of per request keeps this thread off the GIL that the
                # request path needs (bench/gateway.py).
                if not self._stop.is_set():
                    self._stop.wait(self._linger_s)
                continue
            with self._batch_lock:
                sent = self._resumed.is_set() and self.send_batch(batch)
            if sent:
                continue
            if not self._resumed.is_set():
                continue
            self._sleep(self.retry_s)
        self._close_producer()

    def send_batch(self, batch: list[tuple[int, bytes]]) -> bool:
        """Send one batch in order; acknowledge it in the spool when all succeeded."""
        self.attempts += 1
        try:
            if self._producer is None:
                self._producer = self._factory()
            producer = self._producer
            futures = [
                producer.send(
                    self.topic, key=_event_key(payload), value=payload, headers=self._headers
                )
                for _, payload in batch
            ]
            producer.flush(timeout=self.flush_timeout_s)
            for future in futures:
                if not getattr(future, "is_done", True):
                    raise TimeoutError("a send was not acknowledged before the flush timed out")
                if future.failed():
                    raise future.exception or RuntimeError("a send failed")
        except Exception as exc:  # kafka-python's errors share no useful base class
            self._failed(f"{type(exc).__name__}: {exc}")
            self._close_producer()
            return False
        self.spool.ack(batch[-1][0])
        self.forwarded += len(batch)
        if not self.kafka_up:
            log.info("forwarding usage events to Kafka topic %s", self.topic)
        self.kafka_up = True
        return True

    def _failed(self, reason: str) -> None:
        self.failures += 1
        if self.kafka_up or reason != self.last_error:
            log.warning(
                "usage events wait in the spool (%d pending): Kafka: %s; retrying every %g s",
                self.spool.pending_count,
                reason,
                self.retry_s,
            )
        self.last_error = reason
        self.kafka_up = False

    def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=1.0)
            except Exception as exc:  # closing a broken producer is best effort
                log.debug("closing the Kafka producer failed: %s", exc)
