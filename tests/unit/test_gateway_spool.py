"""The gateway's durable spool (ingest/gateway/spool.py): records come back in order
until acknowledged, survive a reopen, and a crash mid-write loses only the torn record."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.gateway.spool import Spool, SpoolCorrupt


def test_pending_until_acked_in_order_across_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    seqs = [spool.append(f"e{i}".encode()) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    spool.ack(2)
    spool.close()
    again = Spool(tmp_path)
    assert again.pending() == [(3, b"e2"), (4, b"e3"), (5, b"e4")]
    assert again.append(b"e5") == 6
    assert again.pending(limit=2) == [(3, b"e2"), (4, b"e3")]


def test_a_torn_tail_is_cut_and_nothing_before_it_is_lost(tmp_path: Path) -> None:
    """Guards against a crash mid-write making the whole spool unreadable."""
    spool = Spool(tmp_path)
    spool.append_many([b"one", b"two"])
    spool.close()
    [segment] = tmp_path.glob("*.seg")
    with segment.open("ab") as handle:
        handle.write(b"\x00\x00\x00\x09\x12")  # a header cut short
    again = Spool(tmp_path)
    assert again.pending() == [(1, b"one"), (2, b"two")]
    assert again.append(b"three") == 3
    assert [p for _, p in again.pending()] == [b"one", b"two", b"three"]


def test_a_bad_record_inside_the_spool_is_an_error_not_a_skip(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1)  # one record per segment
    spool.append_many([b"aaaa"])
    spool.append_many([b"bbbb"])
    spool.close()
    first = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt, match=r"offset 0: the record does not match"):
        Spool(tmp_path).pending()


def test_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1)
    for i in range(4):
        spool.append(bytes([i]))
    assert len(list(tmp_path.glob("*.seg"))) == 4
    spool.ack(3)
    assert len(list(tmp_path.glob("*.seg"))) == 1
    assert spool.pending() == [(4, b"\x03")]
    with pytest.raises(ValueError, match="only 4 records"):
        spool.ack(9)


@settings(max_examples=40, deadline=None)
@given(
    batches=st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=5), max_size=8),
    ack_at=st.integers(min_value=0, max_value=40),
    segment_bytes=st.sampled_from([1, 64, 1 << 20]),
)
def test_every_record_is_pending_exactly_once_until_acked(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[bytes]],
    ack_at: int,
    segment_bytes: int,
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    spool = Spool(directory, segment_bytes=segment_bytes)
    written = [p for batch in batches for p in batch]
    for batch in batches:
        spool.append_many(batch)
    ack = min(ack_at, len(written))
    if ack:
        spool.ack(ack)
    spool.close()
    reopened = Spool(directory, segment_bytes=segment_bytes)
    assert reopened.pending() == list(enumerate(written, start=1))[ack:]
    assert reopened.pending_count == len(written) - ack


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.lists(st.binary(max_size=30), min_size=1, max_size=4)),
            st.tuples(st.just("forward"), st.integers(min_value=1, max_value=6)),
            st.tuples(st.just("ack"), st.integers(min_value=0, max_value=30)),
            st.tuples(st.just("reopen"), st.none()),
        ),
        max_size=25,
    ),
    segment_bytes=st.sampled_from([1, 40, 1 << 20]),
)
def test_pending_follows_acks_as_a_forwarder_uses_it(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[str, object]],
    segment_bytes: int,
) -> None:
    """Guards the read cursor `pending` keeps between batches: whatever the interleaving
    of writes, handed-out batches, acks (of the batch's end or of any written record)
    and reopens, pending is exactly the unacknowledged records, in order."""
    directory = tmp_path_factory.mktemp("spool")
    spool = Spool(directory, segment_bytes=segment_bytes)
    written: list[bytes] = []
    acked = 0
    for op, arg in steps:
        if op == "append":
            assert isinstance(arg, list)
            spool.append_many(arg)
            written.extend(arg)
        elif op == "forward":  # what the forwarder does: a batch, then ack its end
            assert isinstance(arg, int)
            batch = spool.pending(limit=arg)
            assert batch == list(enumerate(written, start=1))[acked : acked + arg]
            if batch:
                spool.ack(batch[-1][0])
                acked = batch[-1][0]
        elif op == "ack":
            assert isinstance(arg, int)
            target = min(arg, len(written))
            spool.ack(target)
            acked = max(acked, target)
        else:
            spool.close()
            spool = Spool(directory, segment_bytes=segment_bytes)
        assert spool.pending() == list(enumerate(written, start=1))[acked:]
