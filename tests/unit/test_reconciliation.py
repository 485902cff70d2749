"""The reconciliation rules: usage events against Triton's request counts."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from models.errors import InputError
from models.reconciliation import (
    EVENT_COUNTS_SCHEMA,
    EVENT_STATUSES,
    RECONCILIATION_SCHEMA,
    TRITON_COUNTS_SCHEMA,
    DriftRule,
    apply_rule,
    reconcile,
)

HOUR = datetime(2026, 11, 23, 5, tzinfo=UTC)


def events(*rows: tuple[str, str, str, int], hour: datetime = HOUR) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {"server": s, "model": m, "hour_start": hour, "status": st_, "events": n}
            for s, m, st_, n in rows
        ],
        schema=EVENT_COUNTS_SCHEMA,
    )


def triton(*rows: tuple[str, str, int], hour: datetime = HOUR) -> pl.DataFrame:
    return pl.DataFrame(
        [{"server": s, "model": m, "hour_start": hour, "triton_requests": n} for s, m, n in rows],
        schema=TRITON_COUNTS_SCHEMA,
    )


def test_matching_counts_of_every_status_are_not_flagged() -> None:
    rows = reconcile(
        events(
            ("a:8001", "llama", "ok", 90),
            ("a:8001", "llama", "error", 7),
            ("a:8001", "llama", "cancelled", 3),
        ),
        triton(("a:8001", "llama", 100)),
        DriftRule(),
    )
    expected = pl.DataFrame(
        [
            {
                "server": "a:8001",
                "model": "llama",
                "hour_start": HOUR,
                "events": 100,
                "events_ok": 90,
                "events_error": 7,
                "events_cancelled": 3,
                "triton_requests": 100,
                "triton_seen": True,
                "difference": 0,
                "drift_ratio": 0.0,
                "flagged": False,
                "reason": "match",
            }
        ],
        schema=RECONCILIATION_SCHEMA,
    )
    assert_frame_equal(rows, expected)


def test_missing_events_are_flagged_with_their_difference() -> None:
    rows = reconcile(
        events(("a:8001", "llama", "ok", 80)), triton(("a:8001", "llama", 100)), DriftRule()
    )
    row = rows.row(0, named=True)
    assert row["difference"] == -20
    assert row["drift_ratio"] == pytest.approx(0.2)
    assert row["flagged"]
    assert row["reason"] == "events missing"


def test_small_drift_is_within_tolerance() -> None:
    rows = reconcile(
        events(("a:8001", "llama", "ok", 99)), triton(("a:8001", "llama", 100)), DriftRule()
    )
    row = rows.row(0, named=True)
    assert not row["flagged"]
    assert row["reason"] == "events missing (within tolerance)"


def test_min_abs_drift_spares_quiet_hours() -> None:
    rule = DriftRule(drift_threshold=0.02, min_abs_drift=2)
    rows = reconcile(events(("a:8001", "llama", "ok", 3)), triton(("a:8001", "llama", 5)), rule)
    assert not rows["flagged"][0]  # 40 % drift, but only 2 requests apart


def test_each_side_alone_appears_full_outer() -> None:
    rows = reconcile(
        events(("a:8001", "llama", "ok", 5), ("b:8001", "mistral", "ok", 4)),
        triton(("a:8001", "llama", 5), ("c:8001", "llama", 6), ("b:8001", "mistral", 0)),
        DriftRule(),
    )
    by_server = {r["server"]: r for r in rows.iter_rows(named=True)}
    assert set(by_server) == {"a:8001", "b:8001", "c:8001"}
    assert by_server["c:8001"]["events"] == 0
    assert by_server["c:8001"]["reason"] == "events missing (none recorded)"
    assert by_server["b:8001"]["drift_ratio"] == math.inf
    assert by_server["b:8001"]["reason"] == "events without a Triton count"
    assert by_server["b:8001"]["flagged"]


def test_events_of_an_unscraped_server_say_so() -> None:
    rows = reconcile(events(("z:8001", "llama", "ok", 1)), triton(), DriftRule())
    row = rows.row(0, named=True)
    assert not row["triton_seen"] and row["triton_requests"] == 0
    assert row["reason"].startswith("events without a Triton counter")
    assert row["flagged"]


def test_both_sides_zero_is_a_match() -> None:
    rows = reconcile(events(), triton(("a:8001", "idle", 0)), DriftRule())
    row = rows.row(0, named=True)
    assert row["drift_ratio"] == 0.0 and not row["flagged"] and row["reason"] == "match"


def test_empty_inputs_give_no_rows() -> None:
    rows = reconcile(events(), triton(), DriftRule())
    assert rows.height == 0
    assert rows.schema == RECONCILIATION_SCHEMA


def test_an_unknown_status_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"unknown status \['timeout'\]"):
        reconcile(events(("a:8001", "llama", "timeout", 1)), triton(), DriftRule())


def test_a_negative_count_is_an_input_error() -> None:
    with pytest.raises(InputError, match="negative triton_requests"):
        reconcile(events(), triton(("a:8001", "llama", -1)), DriftRule())


def test_a_missing_column_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"event counts lacks columns \['status'\]"):
        reconcile(events().drop("status"), triton(), DriftRule())


def test_apply_rule_rejudges_stored_rows() -> None:
    rows = reconcile(
        events(("a:8001", "llama", "ok", 95)), triton(("a:8001", "llama", 100)), DriftRule()
    )
    assert rows["flagged"][0]
    relaxed = apply_rule(rows, DriftRule(drift_threshold=0.1))
    assert not relaxed["flagged"][0]
    assert relaxed["reason"][0] == "events missing (within tolerance)"


SERVERS = st.sampled_from(["a:8001", "b:8001", "c:8001"])
MODELS = st.sampled_from(["llama", "mistral"])
HOURS = st.integers(0, 2).map(lambda h: HOUR + timedelta(hours=h))
EVENT_ROWS = st.lists(
    st.tuples(SERVERS, MODELS, HOURS, st.sampled_from(EVENT_STATUSES), st.integers(0, 1000)),
    max_size=20,
)
TRITON_ROWS = st.lists(st.tuples(SERVERS, MODELS, HOURS, st.integers(0, 1000)), max_size=20)
RULES = st.builds(
    DriftRule,
    drift_threshold=st.floats(0, 1, allow_nan=False),
    min_abs_drift=st.integers(0, 50),
)


EventRow = tuple[str, str, datetime, str, int]
TritonRow = tuple[str, str, datetime, int]


def _frames(
    event_rows: list[EventRow],
    triton_rows: list[TritonRow],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (
        pl.DataFrame(event_rows, schema=EVENT_COUNTS_SCHEMA, orient="row"),
        pl.DataFrame(triton_rows, schema=TRITON_COUNTS_SCHEMA, orient="row"),
    )


@settings(max_examples=200, deadline=None)
@given(EVENT_ROWS, TRITON_ROWS, RULES)
def test_flagged_iff_the_rule_holds(
    event_rows: list[EventRow], triton_rows: list[TritonRow], rule: DriftRule
) -> None:
    rows = reconcile(*_frames(event_rows, triton_rows), rule)
    for row in rows.iter_rows(named=True):
        diff, requests = row["difference"], row["triton_requests"]
        assert diff == row["events"] - requests
        drift = abs(diff) / requests if requests else (0.0 if diff == 0 else math.inf)
        assert row["drift_ratio"] == pytest.approx(drift)
        expected = drift > rule.drift_threshold and abs(diff) > rule.min_abs_drift
        assert row["flagged"] == expected
        assert (row["reason"] == "match") == (diff == 0)
        assert row["reason"].endswith("(within tolerance)") == (diff != 0 and not expected)


@settings(max_examples=200, deadline=None)
@given(EVENT_ROWS, TRITON_ROWS, RULES)
def test_totals_and_keys_of_both_sides_are_preserved(
    event_rows: list[EventRow], triton_rows: list[TritonRow], rule: DriftRule
) -> None:
    event_frame, triton_frame = _frames(event_rows, triton_rows)
    rows = reconcile(event_frame, triton_frame, rule)
    assert rows["events"].sum() == sum(r[4] for r in event_rows)
    assert rows["triton_requests"].sum() == sum(r[3] for r in triton_rows)
    for status in EVENT_STATUSES:
        assert rows[f"events_{status}"].sum() == sum(r[4] for r in event_rows if r[3] == status)
    assert (
        rows["events"] == rows["events_ok"] + rows["events_error"] + rows["events_cancelled"]
    ).all()
    keys = {(r[0], r[1], r[2]) for r in event_rows} | {(r[0], r[1], r[2]) for r in triton_rows}
    assert set(rows.select("server", "model", "hour_start").iter_rows()) == keys
    assert rows.height == len(keys)
    seen = {(r[0], r[1], r[2]) for r in triton_rows}
    assert {
        k
        for k, s in zip(
            rows.select("server", "model", "hour_start").iter_rows(),
            rows["triton_seen"],
            strict=True,
        )
        if s
    } == seen


# The asset's and check's plain helpers.


def test_the_server_is_the_authority_of_a_triton_source() -> None:
    from pipelines.defs.assurance.assets import server_of_source

    sources = pl.DataFrame(
        {
            "source": [
                "triton://127.0.0.1:8001/v2/models/llama",
                "triton://gpu-node-3/v2/models/mistral",
                "https://api.example/v1/chat",
            ]
        }
    )
    servers = sources.select(server_of_source(pl.col("source")))["source"].to_list()
    assert servers == ["127.0.0.1:8001", "gpu-node-3", "https://api.example/v1/chat"]


def test_the_check_description_names_the_threshold_and_the_drifting_rows() -> None:
    from pipelines.defs.assurance.checks import describe_drift

    rule = DriftRule()
    rows = reconcile(
        events(("a:8001", "llama", "ok", 170), ("b:8001", "llama", "ok", 50)),
        triton(("a:8001", "llama", 200), ("b:8001", "llama", 50)),
        rule,
    )
    text = describe_drift(rows, rule)
    assert text.startswith("1 of 2 server/model/hour rows drift")
    assert "drift above 2.00% of Triton's count" in text
    assert "a:8001 llama 2026-11-23T05: events 170 vs Triton 200 (difference -30" in text
    assert "b:8001" not in text
    assert describe_drift(rows.filter(pl.col("server") == "b:8001"), rule).startswith(
        "all 1 server/model/hour rows within the threshold"
    )


def test_the_assurance_schedule_reconciles_the_hour_the_usage_schedule_built(
    tmp_path: Path,
) -> None:
    import dagster as dg

    from pipelines.defs.assurance import assurance_hourly_schedule
    from pipelines.defs.resources import GpuledgerSettings
    from tests.conftest import build_settings

    context = dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 24, 10, 40, tzinfo=UTC),
        resources={"gpuledger": GpuledgerSettings.pinned(build_settings(tmp_path / "state"))},
    )
    request = assurance_hourly_schedule(context)
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == "2026-11-24-09:00"
