"""Benchmark: publishing the analysts' snapshot after an hourly run (issue 6).

No target was set; this measures what a snapshot costs on a demo-sized day. A synthetic
warehouse holds one day of marts shaped like the demo fleet's (32 GPUs, 8 tenants,
4 models; `fct_request_allocation` with --requests rows spread over the 24 hours, the
hourly marts at their real grains). Timed:
- `publish` of the day's last hour, as the hourly `analytics_snapshot` runs it: every
  hourly table's partition of that UTC day is rewritten, a catalog written and renamed;
- a full publish (every partition), as `gpuledger publish` does the first time;
- the baseline: plain DuckDB `COPY ... TO parquet` of the same day's rows of the same
  tables, the least any export of them costs.
Prints each as a median of --runs and hourly / baseline.

Usage: .venv/bin/python bench/publish.py [--requests 1380000] [--runs 3] [--keep]
Ends with one `RESULT key=value ...` line.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta

import duckdb

from ingest.settings import Settings
from pipelines.analytics.publish import PUBLISHED_TABLES, publish

DAY = datetime(2026, 3, 1, tzinfo=UTC)
HOURLY_TABLES = [t.name for t in PUBLISHED_TABLES if not t.monthly and t.source == "warehouse"]


def build_warehouse(path: Path, requests: int) -> None:
    """A day of marts at the demo fleet's grains, generated in DuckDB."""
    with duckdb.connect(str(path)) as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("CREATE SCHEMA marts")
        day = f"TIMESTAMPTZ '{DAY.isoformat()}'"
        con.execute(
            f"""
            CREATE TABLE marts.fct_request_allocation AS
            SELECT 'req-' || i AS request_id, 'tenant-' || (i % 8) AS tenant,
                   'model-' || (i % 4) AS model, 'NVIDIA H100 80GB HBM3' AS gpu_type,
                   1 + (i % 4 = 3)::INT * 3 AS gpu_count,
                   {day} + to_hours((i * 24 // {requests})::BIGINT) AS event_hour,
                   {day} + to_microseconds(i * 86400000000 // {requests}) AS arrival_ts,
                   {day} + to_microseconds(i * 86400000000 // {requests} + 4000000) AS end_ts,
                   'ok' AS status, 200 + i % 3000 AS prompt_tokens, 0 AS cached_prompt_tokens,
                   50 + i % 700 AS completion_tokens, 'separate' AS idle_policy,
                   random() * 900 AS energy_j, random() * 600 AS dynamic_energy_j,
                   0.0 AS idle_energy_j, random() * 4 AS occupied_gpu_s,
                   random() * 3 AS active_gpu_s, 1.0 AS telemetry_coverage,
                   false AS is_orphan, false AS energy_estimated, false AS crosses_gap
            FROM range({requests}) AS r(i)
            """
        )
        con.execute(
            f"""
            CREATE TABLE marts.fct_gpu_hourly AS
            SELECT 'node-' || (g // 8) || '/GPU-' || g AS gpu_key, 'GPU-' || g AS gpu_uuid,
                   'node-' || (g // 8) AS hostname, 'NVIDIA H100 80GB HBM3' AS gpu_model,
                   {day} + to_hours(h) AS hour_start, 'separate' AS idle_policy,
                   1.5e6 AS metered_j, 1.5e6 AS counter_j, 0.0 AS estimated_j,
                   0.0 AS unmeasured_s, 4e5 AS idle_j, 1.1e6 AS dynamic_j,
                   1.1e6 AS allocated_j, 1.1e6 AS allocated_dynamic_j,
                   0.0 AS allocated_idle_j, 4e5 AS idle_unallocated_j, 0.0 AS unattributed_j,
                   3600.0 AS covered_s, 3000.0 AS occupied_s, 600.0 AS idle_s,
                   2000.0 AS active_s, 0.0 AS gap_s, 0 AS counter_resets,
                   115.0 AS idle_power_w, 'configured' AS idle_source, 1800 AS requests
            FROM range(32) AS g(g), range(24) AS hh(h)
            """
        )
        con.execute(
            """
            CREATE TABLE marts.fct_tenant_usage_hourly AS
            SELECT tenant, model, gpu_type, event_hour, any_value(idle_policy) AS idle_policy,
                   count(*) AS requests, sum(prompt_tokens) AS prompt_tokens,
                   sum(cached_prompt_tokens) AS cached_prompt_tokens,
                   sum(completion_tokens) AS completion_tokens, sum(energy_j) AS energy_j,
                   sum(dynamic_energy_j) AS dynamic_energy_j, sum(idle_energy_j) AS idle_energy_j,
                   sum(occupied_gpu_s) AS occupied_gpu_s, sum(active_gpu_s) AS active_gpu_s,
                   0 AS orphan_requests
            FROM marts.fct_request_allocation GROUP BY ALL
            """
        )
        con.execute(
            "CREATE TABLE marts.dq_orphan_requests AS SELECT request_id, tenant, model, "
            "event_hour FROM marts.fct_request_allocation WHERE request_id LIKE '%77'"
        )
        con.execute(
            """
            CREATE TABLE marts.mart_efficiency_hourly AS
            SELECT 'model-' || (g % 4) AS model, gpu_model AS gpu_type, hour_start,
                   count(*) AS gpus, sum(metered_j) AS energy_j, sum(covered_s) AS covered_s
            FROM marts.fct_gpu_hourly, range(4) AS m(g) GROUP BY ALL
            """
        )
        con.execute(
            "CREATE TABLE marts.mart_data_quality AS SELECT hour_start, count(*) AS "
            "gpus_reporting FROM marts.fct_gpu_hourly GROUP BY ALL"
        )
        con.execute(
            "CREATE TABLE marts.mart_fleet_daily AS SELECT CAST(hour_start AS DATE) AS day, "
            "sum(metered_j) / 3.6e6 AS metered_kwh FROM marts.fct_gpu_hourly GROUP BY ALL"
        )


def baseline_copy(warehouse: Path, out: Path) -> float:
    """Plain COPY of the day's rows of every hourly table to Parquet."""
    began = time.perf_counter()
    with duckdb.connect(str(warehouse), read_only=True) as con:
        for table in PUBLISHED_TABLES:
            if table.name not in HOURLY_TABLES:
                continue
            target = out / f"{table.name}.parquet"
            con.execute(
                f"COPY (SELECT * FROM marts.{table.name}) TO '{target}' "
                "(FORMAT parquet, COMPRESSION zstd)"
            )
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_380_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="gpuledger-bench-publish-"))
    try:
        settings = Settings(state_dir=scratch / "state")
        settings.state_dir.mkdir(parents=True)
        began = time.perf_counter()
        build_warehouse(settings.warehouse_path, args.requests)
        print(
            f"warehouse: {args.requests:,} requests, built in {time.perf_counter() - began:.1f} s"
        )
        full, hourly, copy = [], [], []
        for run in range(args.runs):
            shutil.rmtree(settings.published_path, ignore_errors=True)
            began = time.perf_counter()
            publish(settings, tables=HOURLY_TABLES)
            full.append(time.perf_counter() - began)
            last = DAY + timedelta(hours=23)
            began = time.perf_counter()
            publish(settings, last, last + timedelta(hours=1), tables=HOURLY_TABLES)
            hourly.append(time.perf_counter() - began)
            out = scratch / f"copy-{run}"
            out.mkdir()
            copy.append(baseline_copy(settings.warehouse_path, out))
            print(
                f"run {run + 1}: full {full[-1]:.2f} s, hourly {hourly[-1]:.2f} s, "
                f"plain copy {copy[-1]:.2f} s"
            )
        full_s, hourly_s, copy_s = (statistics.median(x) for x in (full, hourly, copy))
        print(
            f"median of {args.runs}: hourly snapshot {hourly_s:.2f} s (the day's partitions "
            f"rewritten), full {full_s:.2f} s, plain copy {copy_s:.2f} s = "
            f"{hourly_s / copy_s:.2f} x"
        )
        print(
            f"RESULT requests={args.requests} hourly_s={hourly_s:.2f} full_s={full_s:.2f} "
            f"copy_s={copy_s:.2f} ratio_to_copy={hourly_s / copy_s:.2f}"
        )
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
