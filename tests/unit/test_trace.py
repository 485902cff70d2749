"""Replaying a real request trace: reading it, checking it, and what the replay keeps."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from ingest.simulator import SimulationConfig, TraceColumns, default_fleet, read_trace, simulate
from models.errors import InputError

SHARED_TRACE = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "traces"
    / "mooncake_conversation.jsonl"
)


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mooncake_like(n: int = 50) -> list[dict[str, object]]:
    return [
        {
            "timestamp": i * 400,
            "input_length": 100 + 7 * i,
            "output_length": 20 + i,
            "hash_ids": [i],
        }
        for i in range(n)
    ]


def test_jsonl_with_mooncake_columns_by_default(tmp_path: Path) -> None:
    trace = read_trace(write_jsonl(tmp_path / "t.jsonl", mooncake_like()), TraceColumns())
    assert trace.arrival_s[1] == pytest.approx(0.4)
    assert trace.prompt_tokens[3] == 121
    assert trace.cached_tokens is None and trace.tenants is None


def test_csv_with_named_columns_iso_times_and_tenants(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "at,in,out,who,hit\n"
        "2026-11-23T00:00:00Z,500,50,acme,100\n"
        "2026-11-23T00:00:02.5Z,800,80,globex,0\n"
    )
    trace = read_trace(
        path,
        TraceColumns(
            time="at", time_unit="iso", prompt="in", completion="out", tenant="who", cached="hit"
        ),
    )
    assert list(trace.arrival_s - trace.arrival_s[0]) == [0.0, 2.5]
    assert list(trace.tenants) == ["acme", "globex"]  # type: ignore[arg-type]
    assert list(trace.cached_tokens) == [100, 0]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("content", "columns", "expected"),
    [
        (
            '{"ts": 0, "input_length": 5, "output_length": 1}\n',
            TraceColumns(),
            "missing column 'timestamp'; columns present: ts, input_length, output_length",
        ),
        (
            '{"timestamp": 0, "input_length": 5}\n',
            TraceColumns(),
            "missing column 'output_length'",
        ),
        (
            '{"timestamp": 0, "input_length": -5, "output_length": 1}\n',
            TraceColumns(),
            "column 'input_length': row 1 is missing or below 1",
        ),
        (
            '{"timestamp": "noon", "input_length": 5, "output_length": 1}\n',
            TraceColumns(),
            "column 'timestamp': expected numbers in ms",
        ),
        (
            '{"timestamp": 0, "input_length": 5.5, "output_length": 1}\n',
            TraceColumns(),
            "column 'input_length': expected whole token counts",
        ),
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1, "c": 9}\n',
            TraceColumns(cached="c"),
            "row 1 has more cached than prompt tokens",
        ),
        ("{not json\n", TraceColumns(), "cannot parse"),
    ],
)
def test_bad_traces_name_the_file_and_column(
    tmp_path: Path, content: str, columns: TraceColumns, expected: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as caught:
        read_trace(path, columns)
    assert str(path) in caught.value.message
    assert expected in caught.value.message
    assert "\n" not in caught.value.message


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_trace(tmp_path / "nope.jsonl", TraceColumns())
    odd = tmp_path / "trace.parquet"
    odd.write_bytes(b"PAR1")
    with pytest.raises(InputError, match=r"unknown format \.parquet"):
        read_trace(odd, TraceColumns())


def test_replay_keeps_every_request_and_its_lengths(tmp_path: Path) -> None:
    rows = mooncake_like(50)  # 50 requests over 19.6 s
    trace = read_trace(write_jsonl(tmp_path / "t.jsonl", rows), TraceColumns(), repeat=False)
    config = SimulationConfig(
        start=datetime(2026, 11, 23, tzinfo=UTC),
        duration_s=60,
        seed=4,
        trace=trace,
        workload=None,
    )
    result = simulate(default_fleet(1, 8, 3, 4), config)
    r = result.requests.sort("arrival_ts")
    assert r.height == 50
    arrivals = (r["arrival_ts"] - r["arrival_ts"][0]).dt.total_milliseconds().to_list()
    assert arrivals == [row["timestamp"] for row in rows]
    assert sorted(r["prompt_tokens"].to_list()) == sorted(int(row["input_length"]) for row in rows)  # type: ignore[call-overload]
    ok = r.filter(pl.col("status") == "ok")
    expected_out = {int(row["input_length"]): int(row["output_length"]) for row in rows}  # type: ignore[call-overload]
    assert all(
        expected_out[p] == c for p, c in ok.select("prompt_tokens", "completion_tokens").iter_rows()
    )
    # Tenants come from a seeded draw over the fleet's tenants.
    assert set(r["tenant"]) <= {t.id for t in default_fleet(1, 8, 3, 4).tenants}


def test_short_trace_is_tiled_to_fill_the_window(tmp_path: Path) -> None:
    trace = read_trace(write_jsonl(tmp_path / "t.jsonl", mooncake_like(50)), TraceColumns())
    config = SimulationConfig(
        start=datetime(2026, 11, 23, tzinfo=UTC), duration_s=100, seed=1, trace=trace
    )
    result = simulate(default_fleet(1, 8, 3, 1), config)
    # Span 19.6 s + one mean gap (0.4 s) = 20 s per copy: five copies in 100 s.
    assert result.requests.height == 250


def test_tenant_column_must_name_fleet_tenants(tmp_path: Path) -> None:
    rows = [dict(r, who="nobody") for r in mooncake_like(3)]
    trace = read_trace(write_jsonl(tmp_path / "t.jsonl", rows), TraceColumns(tenant="who"))
    config = SimulationConfig(start=datetime(2026, 11, 23, tzinfo=UTC), duration_s=10, trace=trace)
    with pytest.raises(InputError, match="tenants not in the fleet: nobody"):
        simulate(default_fleet(1, 8, 3, 0), config)


@pytest.mark.skipif(not SHARED_TRACE.is_file(), reason="../shared trace not beside the checkout")
def test_the_real_mooncake_hour_replays() -> None:
    trace = read_trace(SHARED_TRACE, TraceColumns(), repeat=False)
    config = SimulationConfig(
        start=datetime(2026, 11, 23, tzinfo=UTC), duration_s=3600, seed=0, trace=trace
    )
    result = simulate(default_fleet(4, 8, 8, 0), config)
    assert result.requests.height == 12_031
    assert result.requests["prompt_tokens"].sum() == int(trace.prompt_tokens.sum())
