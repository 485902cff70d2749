"""Benchmark: drafting and finalizing a month of invoices (issue 5).

No target was set; this measures what a month costs. A synthetic warehouse holds
`marts.fct_tenant_usage_hourly` for March 2026 (every tenant uses every model on both
GPU types in every hour, seeded), and the rate card is the example card with every
tenant on one of its three plans. Timed, each on a fresh invoice store:
`draft_period` (read the rows, rate, render PDF/CSV/JSON/FOCUS, write every draft)
and `finalize_period` (the same, plus the billed rows, watermarks and the ledger).
(The request mart is empty: the watermark query finalize makes per tenant costs
more on a real one.) For scale, the same run times a plain DuckDB aggregate of the
same rows per tenant (the least any billing of them must read) and prints
draft / aggregate.

Usage: .venv/bin/python bench/invoice.py [--tenants 200] [--runs 3] [--seed 0] [--keep]
Ends with one `RESULT key=value ...` line.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/invoice.py`, Python puts bench/ first on sys.path, where
# bench/ingest.py would shadow the `ingest` package.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime

import duckdb
import numpy as np
import polars as pl

from ingest.catalog import ensure_catalog
from ingest.settings import Settings
from pipelines.billing.cycle import draft_period, finalize_period
from pipelines.cli.invoice import example_card_text

PERIOD = "2026-03"
MODELS = ("llama-3.1-8b", "qwen3-14b", "qwen3-32b", "llama-3.1-70b")
GPUS = ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")
PLANS = ("default", "enterprise", "dedicated")


def usage_frame(tenants: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    hours = pl.datetime_range(
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 3, 31, 23, tzinfo=UTC),
        interval="1h",
        eager=True,
        time_zone="UTC",
    )
    grid = (
        pl.DataFrame({"tenant": [f"t{i:04d}" for i in range(tenants)]})
        .join(pl.DataFrame({"model": MODELS}), how="cross")
        .join(pl.DataFrame({"gpu_type": GPUS}), how="cross")
        .join(pl.DataFrame({"event_hour": hours}), how="cross")
    )
    n = grid.height
    requests = rng.integers(1, 400, n)
    prompt = requests * rng.integers(200, 2000, n)
    completion = requests * rng.integers(50, 600, n)
    return grid.with_columns(
        idle_policy=pl.lit("separate"),
        requests=pl.Series(requests, dtype=pl.Int64),
        prompt_tokens=pl.Series(prompt, dtype=pl.Int64),
        cached_prompt_tokens=pl.Series(prompt * rng.integers(0, 60, n) // 100, dtype=pl.Int64),
        completion_tokens=pl.Series(completion, dtype=pl.Int64),
        energy_j=pl.Series(completion * rng.uniform(0.05, 4.0, n)),
        occupied_gpu_s=pl.Series(rng.uniform(1, 3600, n)),
    ).with_columns(
        dynamic_energy_j=pl.col("energy_j"),
        idle_energy_j=pl.lit(0.0),
        active_gpu_s=pl.col("occupied_gpu_s") * 0.8,
        orphan_requests=pl.lit(0, dtype=pl.Int64),
    )


def card_text(tenants: int) -> str:
    text = example_card_text()
    head, _ = text.split("tenants:\n", 1)
    lines = ["tenants:"]
    for i in range(tenants):
        lines.append(f"  t{i:04d}: {{plan: {PLANS[i % len(PLANS)]}}}")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpuledger-bench-invoice-"))
    frame = usage_frame(args.tenants, args.seed)
    print(f"{frame.height:,} hourly usage rows: {args.tenants} tenants x 4 models x 2 GPU types")
    drafts, finals, aggregates = [], [], []
    try:
        for run in range(args.runs):
            state = work / f"run{run}"
            settings = Settings(state_dir=state)
            ensure_catalog(settings)
            with duckdb.connect(str(settings.warehouse_path)) as con:
                con.execute("create schema if not exists marts")
                con.register("usage", frame)
                con.execute("create or replace table marts.fct_tenant_usage_hourly as from usage")
                # Finalize records Kafka watermarks from the request mart; the bench has
                # no requests, so that query runs on an empty table.
                con.execute(
                    "create or replace table marts.fct_request_allocation (request_id varchar,"
                    " tenant varchar, model varchar, gpu_type varchar,"
                    " event_hour timestamptz)"
                )
            settings.rate_card_path.write_text(card_text(args.tenants))
            began = time.perf_counter()
            with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
                con.sql(
                    "select tenant, model, gpu_type, sum(prompt_tokens), sum(completion_tokens),"
                    " sum(cached_prompt_tokens), sum(occupied_gpu_s), sum(energy_j) "
                    "from marts.fct_tenant_usage_hourly group by all"
                ).fetchall()
            aggregates.append(time.perf_counter() - began)
            began = time.perf_counter()
            drafted = draft_period(settings, PERIOD)
            drafts.append(time.perf_counter() - began)
            began = time.perf_counter()
            finalized = finalize_period(settings, PERIOD)
            finals.append(time.perf_counter() - began)
            assert len(drafted.invoices) == len(finalized.invoices) == args.tenants
            print(
                f"run {run + 1}: aggregate {aggregates[-1]:.2f} s, draft {drafts[-1]:.1f} s, "
                f"finalize {finals[-1]:.1f} s ({len(finalized.invoices)} invoices)"
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    draft_s = statistics.median(drafts)
    final_s = statistics.median(finals)
    scan_s = statistics.median(aggregates)
    per_invoice_ms = 1000 * draft_s / args.tenants
    print(
        f"median of {args.runs}: draft {draft_s:.1f} s ({per_invoice_ms:.0f} ms per tenant), "
        f"finalize {final_s:.1f} s, plain aggregate {scan_s:.2f} s, "
        f"draft / aggregate = {draft_s / scan_s:.0f}"
    )
    print(
        f"RESULT rows={frame.height} tenants={args.tenants} draft_s={draft_s:.2f} "
        f"finalize_s={final_s:.2f} per_tenant_ms={per_invoice_ms:.0f} scan_s={scan_s:.3f} "
        f"ratio_to_scan={draft_s / scan_s:.0f}"
    )


if __name__ == "__main__":
    main()
