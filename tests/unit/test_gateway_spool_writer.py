"""The gateway's spool writer (ingest/gateway/app.py): a write in the caller's thread
when nothing else is being written, a group commit on its thread otherwise; either
way every event lands in the spool exactly once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ingest.gateway.app import SpoolWriter
from ingest.gateway.spool import Spool


class _HeldSpool(Spool):
    """A spool whose batch appends wait until released: a group commit under way."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.entered = threading.Event()
        self.release = threading.Event()

    def append_many(self, payloads: list[bytes]) -> list[int]:
        if len(payloads) and payloads[0].startswith(b"held"):
            self.entered.set()
            assert self.release.wait(10)
        return super().append_many(payloads)


def test_an_idle_writer_lets_the_caller_write_at_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    writer = SpoolWriter(spool)
    assert writer.write_if_idle(b"one") == 1
    assert writer.write_if_idle(b"two") == 2
    assert spool.pending() == [(1, b"one"), (2, b"two")]
    assert (writer.written, writer.batches) == (2, 2)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_if_idle(b"three")


def test_while_a_group_commit_is_under_way_the_caller_queues(tmp_path: Path) -> None:
    """Guards against two writers at once: the caller must not jump a batch in flight."""
    spool = _HeldSpool(tmp_path)
    notified: list[int] = []
    writer = SpoolWriter(spool, on_written=lambda: notified.append(1))
    first = writer.submit(b"held-1")
    assert spool.entered.wait(10)
    assert writer.write_if_idle(b"late") is None  # the thread is writing
    second = writer.submit(b"late")
    spool.release.set()
    assert (first.result(10), second.result(10)) == (1, 2)
    assert [p for _, p in spool.pending()] == [b"held-1", b"late"]
    writer.close()
    assert writer.written == 2 and notified


def test_callers_and_the_thread_together_write_every_event_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    writer = SpoolWriter(spool)
    sequences: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(60):
            payload = f"c{n}-{i}".encode()
            sequence = writer.write_if_idle(payload)
            if sequence is None:
                sequence = writer.submit(payload).result(10)
            with lock:
                sequences.append(sequence)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    writer.close()
    records = spool.pending()
    assert sorted(sequences) == [s for s, _ in records] == list(range(1, 241))
    assert sorted(p for _, p in records) == sorted(
        f"c{n}-{i}".encode() for n in range(4) for i in range(60)
    )
    assert writer.written == 240
