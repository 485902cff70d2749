"""The gateway's forwarder (ingest/gateway/forwarder.py) against a producer that fails:
events go out in spool order, each at least once, acknowledged only after success, and
nothing is lost across a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.gateway.forwarder import Forwarder
from ingest.gateway.spool import Spool
from ingest.settings import Settings
from ingest.usage_publisher import CONTENT_TYPE_HEADER
from tests.conftest import build_settings


class FakeFuture:
    def __init__(self, error: Exception | None) -> None:
        self.is_done = True
        self.exception = error

    def failed(self) -> bool:
        return self.exception is not None


class Broker:
    """What reached 'Kafka', and a script of failures, one entry per batch (or connection
    attempt): None = every send succeeds; k >= 0 = sends from the k-th on fail; negative =
    connecting fails (or, met at a batch's start, the whole batch fails)."""

    def __init__(self, fail_at: list[int | None] | None = None) -> None:
        self.log: list[tuple[str, bytes | None, bytes, list[Any]]] = []
        self.fail_at = list(fail_at or [])
        self.connects = 0

    def factory(self) -> FakeProducer:
        self.connects += 1
        plan = self.fail_at[0] if self.fail_at else None
        if plan is not None and plan < 0:
            self.fail_at.pop(0)
            raise ConnectionError("broker down")
        return FakeProducer(self)


class FakeProducer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sent_in_batch = 0
        self.fail_index: int | None = None
        self.closed = False

    def send(self, topic: str, *, key: bytes | None, value: bytes, headers: list[Any]) -> Any:
        assert not self.closed
        index = self.sent_in_batch
        if index == 0:
            plan = self.broker.fail_at.pop(0) if self.broker.fail_at else None
            self.fail_index = None if plan is None else max(plan, 0)
        self.sent_in_batch += 1
        if self.fail_index is not None and index >= self.fail_index:
            return FakeFuture(ConnectionError("not acknowledged"))
        self.broker.log.append((topic, key, value, headers))
        return FakeFuture(None)

    def flush(self, timeout: float | None = None) -> None:
        self.sent_in_batch = 0  # the next send starts a batch: the next plan entry

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def event_payload(i: int) -> bytes:
    return json.dumps({"id": f"req-{i}", "n": i}).encode()


def make_settings(tmp_path: Path, batch: int = 3) -> Settings:
    return build_settings(
        tmp_path / "state", gateway={"forward_batch": batch, "forward_retry_s": 0.01}
    )


def drive(forwarder: Forwarder, spool: Spool, max_attempts: int = 500) -> None:
    """What the thread does, synchronously: send batches until the spool is empty."""
    for _ in range(max_attempts):
        batch = spool.pending(limit=forwarder.batch)
        if not batch:
            return
        acked_before = spool.acked
        if not forwarder.send_batch(batch):
            assert spool.acked == acked_before  # nothing acknowledged on a failure
    raise AssertionError("the spool never emptied")


def first_deliveries(broker: Broker) -> list[bytes]:
    seen: set[bytes] = set()
    order = []
    for _, _, value, _ in broker.log:
        if value not in seen:
            seen.add(value)
            order.append(value)
    return order


def test_events_go_out_keyed_by_id_with_the_content_type(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    spool = Spool(settings.spool_path)
    spool.append_many([event_payload(i) for i in range(5)])
    broker = Broker()
    forwarder = Forwarder(settings, spool, producer_factory=broker.factory)
    drive(forwarder, spool)
    assert [v for _, _, v, _ in broker.log] == [event_payload(i) for i in range(5)]
    assert [k for _, k, _, _ in broker.log] == [f"req-{i}".encode() for i in range(5)]
    assert {t for t, _, _, _ in broker.log} == {settings.kafka.topic}
    assert all(h == [CONTENT_TYPE_HEADER] for _, _, _, h in broker.log)
    assert spool.pending_count == 0 and forwarder.forwarded == 5 and forwarder.kafka_up


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=25),
    batch=st.integers(min_value=1, max_value=6),
    plan=st.lists(st.one_of(st.none(), st.integers(min_value=-1, max_value=5)), max_size=30),
)
def test_any_failures_deliver_every_event_in_spool_order(
    tmp_path_factory: Any, n: int, batch: int, plan: list[int | None]
) -> None:
    tmp_path = tmp_path_factory.mktemp("fwd")
    settings = make_settings(tmp_path, batch)
    spool = Spool(settings.spool_path)
    payloads = [event_payload(i) for i in range(n)]
    spool.append_many(payloads)
    broker = Broker(plan)
    forwarder = Forwarder(settings, spool, producer_factory=broker.factory)
    drive(forwarder, spool)
    assert first_deliveries(broker) == payloads
    assert spool.pending_count == 0
    spool.close()


def test_nothing_is_lost_across_a_forwarder_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, batch=2)
    spool = Spool(settings.spool_path)
    spool.append_many([event_payload(i) for i in range(6)])
    broker = Broker([None, 1])  # the first batch goes, the second fails half-way
    forwarder = Forwarder(settings, spool, producer_factory=broker.factory)
    assert forwarder.send_batch(spool.pending(limit=2))
    assert not forwarder.send_batch(spool.pending(limit=2))
    assert forwarder.last_error is not None and not forwarder.kafka_up
    spool.close()  # the gateway stops here (a crash would do the same)

    again = Spool(settings.spool_path)
    assert again.pending_count == 4
    restarted = Forwarder(settings, again, producer_factory=broker.factory)
    drive(restarted, again)
    assert first_deliveries(broker) == [event_payload(i) for i in range(6)]


def test_the_thread_wakes_for_new_events_and_drains_on_stop(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, batch=100)
    spool = Spool(settings.spool_path)
    broker = Broker([-1, -1])  # down for two connection attempts, then up
    forwarder = Forwarder(settings, spool, producer_factory=broker.factory, idle_wait_s=30)
    forwarder.start()
    spool.append_many([event_payload(i) for i in range(3)])
    forwarder.wake()
    deadline = time.monotonic() + 5
    while spool.pending_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spool.pending_count == 0 and broker.connects == 3
    spool.append(event_payload(3))
    forwarder.stop(drain_timeout_s=5)
    assert first_deliveries(broker) == [event_payload(i) for i in range(4)]
    assert forwarder.counters()["pending"] == 0
