"""The gateway's in-flight tracker (ingest/gateway/app.py `Activity`): shares of each
GPU now, and request-seconds in flight since the start, which a live DCGM simulator
turns into power."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.gateway.app import Activity


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_shares_and_request_seconds_of_a_tensor_parallel_group() -> None:
    clock = Clock()
    activity = Activity(clock)
    solo = activity.begin(["A"])
    clock.now += 1.0
    group = activity.begin(["A", "B"])
    assert activity.inflight_by_gpu() == {"A": 1.5, "B": 0.5}
    clock.now += 2.0
    activity.end(solo)
    activity.end(solo)  # a second end of the same request changes nothing
    clock.now += 1.0
    activity.end(group)
    assert activity.inflight() == 0 and activity.inflight_by_gpu() == {}
    clock.now += 5.0
    assert activity.busy_seconds_by_gpu() == pytest.approx({"A": 3.0 + 1.5, "B": 1.5})


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 5), st.floats(0, 5), st.sampled_from([("A",), ("B",), ("A", "B")])),
        max_size=20,
    )
)
def test_request_seconds_are_each_requests_duration_over_its_gpus(
    requests: list[tuple[float, float, tuple[str, ...]]],
) -> None:
    """Overlapping requests in any order: each GPU's request-seconds = the sum of the
    durations of the requests on it, each divided by its group's size."""
    clock = Clock()
    activity = Activity(clock)
    events = []
    for i, (start, length, gpus) in enumerate(requests):
        events += [(start, 0, i, gpus), (start + length, 1, i, gpus)]  # ties: begin first
    tokens: dict[int, int] = {}
    base = clock.now
    for at, kind, i, gpus in sorted(events):
        clock.now = base + at
        if kind == 0:
            tokens[i] = activity.begin(gpus)
        else:
            activity.end(tokens[i])
    expected: dict[str, float] = {}
    for _, length, gpus in requests:
        for gpu in gpus:
            expected[gpu] = expected.get(gpu, 0.0) + length / len(gpus)
    busy = activity.busy_seconds_by_gpu()
    assert busy.keys() == expected.keys()
    for gpu, seconds in expected.items():
        assert busy[gpu] == pytest.approx(seconds, abs=1e-9)
    assert activity.inflight() == 0
