"""Benchmark: pulling a simulated day of DCGM telemetry from Prometheus into the lake.

Target (issue): a day of a 256-GPU fleet scraped every 15 s (~11.8 M samples) pulled
and written in at most 60 s on the 2-core reference machine.

`measure_telemetry_pull` starts a fresh local stack in `work_dir`, simulates `hours`
of a fleet of `gpus` GPUs with a low request rate (the request load does not change
the telemetry volume: every GPU reports eight metrics at every scrape), loads the
telemetry with `deliver(..., to_kafka=False)`, then times `pull_telemetry` over the
window. Only the pull is timed; simulating and backfilling are set-up.

Usage: .venv/bin/python bench/_telemetry.py [--gpus 256] [--hours 24] [--seed 0]
Ends with one `RESULT key=value ...` line.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/_telemetry.py`, Python puts bench/ first on sys.path, where
# bench/ingest.py would shadow the `ingest` package.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]

import argparse
import math
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest.settings import Settings
from ingest.simulator import SimulationConfig, TelemetryConfig, default_fleet, simulate
from ingest.simulator.delivery import deliver
from ingest.stack import LocalStack
from ingest.telemetry import pull_telemetry

TARGET_PULL_S = 60.0
GPUS_PER_NODE = 8
#: Requests per second for the whole fleet: enough to keep the GPUs' telemetry
#: realistic, small enough that simulating a day stays quick.
BENCH_RATE_PER_S = 2.0


def measure_telemetry_pull(
    work_dir: Path, gpus: int = 256, hours: float = 24.0, seed: int = 0, pulls: int = 1
) -> dict[str, float]:
    """Simulate, load and pull `pulls` times (each replaces the previous files);
    returns samples, rows, the median pull_s and samples_per_s."""
    if gpus < 1 or hours <= 0:
        raise ValueError("gpus must be at least 1 and hours more than 0")
    state = work_dir / "telemetry-bench"
    if state.exists():
        shutil.rmtree(state)
    settings = Settings(state_dir=state)
    stack = LocalStack(settings)
    stack.up()
    try:
        # A past window on whole hours, ending at the last full hour.
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        start = end - timedelta(hours=math.ceil(hours))
        nodes = max(1, gpus // GPUS_PER_NODE)
        config = SimulationConfig(
            start=start,
            duration_s=hours * 3600,
            seed=seed,
            rate_per_s=BENCH_RATE_PER_S,
            telemetry=TelemetryConfig(hostname_label="mixed"),
        )
        began = time.perf_counter()
        result = simulate(
            default_fleet(nodes=nodes, gpus_per_node=min(gpus, GPUS_PER_NODE), tenants=8),
            config,
        )
        simulate_s = time.perf_counter() - began
        began = time.perf_counter()
        deliver(result, settings, state / "out", to_kafka=False)
        load_s = time.perf_counter() - began
        pull_end = datetime.fromtimestamp(math.ceil(result.horizon_end_ms / 3_600_000) * 3600, UTC)
        times = []
        for _ in range(max(1, pulls)):
            began = time.perf_counter()
            report = pull_telemetry(settings, start, pull_end)
            times.append(time.perf_counter() - began)
        pull_s = statistics.median(times)
        written = sum(h.path.stat().st_size for h in report.hours)
        return {
            "gpus": float(len(result.fleet.gpus)),
            "hours": float(len(report.hours)),
            "simulated_samples": float(result.telemetry.samples.height),
            "samples": float(report.samples),
            "rows": float(report.rows),
            "pull_s": pull_s,
            "samples_per_s": report.samples / pull_s if pull_s > 0 else 0.0,
            "simulate_s": simulate_s,
            "load_s": load_s,
            "parquet_bytes": float(written),
            "fetch_s_sum": sum(h.fetch_s for h in report.hours),
            "queries": float(sum(h.queries for h in report.hours)),
            "pulls": float(len(times)),
        }
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=256)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuledger-bench-telemetry-") as tmp:
        m = measure_telemetry_pull(Path(tmp), gpus=args.gpus, hours=args.hours, seed=args.seed)
    print(
        f"{int(m['gpus'])} GPUs, {int(m['hours'])} hours: simulated in {m['simulate_s']:.1f} s, "
        f"loaded into Prometheus in {m['load_s']:.1f} s"
    )
    print(
        f"pulled {int(m['samples']):,} samples ({int(m['rows']):,} rows, "
        f"{int(m['queries'])} queries, {m['parquet_bytes'] / 1e6:.1f} MB Parquet) in "
        f"{m['pull_s']:.1f} s = {m['samples_per_s']:,.0f} samples/s "
        f"(target <= {TARGET_PULL_S:.0f} s)"
    )
    if int(m["samples"]) != int(m["simulated_samples"]):
        print(f"WARNING: simulated {int(m['simulated_samples']):,} samples")
    print(
        "RESULT "
        f"telemetry_samples={int(m['samples'])} telemetry_pull_s={m['pull_s']:.1f} "
        f"telemetry_samples_per_s={m['samples_per_s']:.0f}"
    )


if __name__ == "__main__":
    main()
