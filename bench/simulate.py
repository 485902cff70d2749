"""Benchmark: a simulated day of the 32-GPU demo fleet, generated, published and loaded.

Target (issue 2): at least 1 M requests generated and loaded in under 2 minutes here.

Each run starts a fresh local stack (Tansu + Prometheus) in a temporary directory,
then times `simulate` and `deliver` (events to Kafka beside telemetry into
Prometheus), exactly as `gpuledger simulate` does. Baselines, measured in the same run
on the same data:
- publishing: a bare kafka-python producer loop sending the same keys and payloads;
- loading: promtool alone turning the same OpenMetrics files into blocks.

Usage: .venv/bin/python bench/simulate.py [--runs 3] [--hours 24] [--seed 0]
Prints medians over the runs and ends with one `RESULT key=value ...` line.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kafka import KafkaProducer

from ingest.endpoints import kafka_client_options
from ingest.settings import Settings
from ingest.simulator import SimulationConfig, default_fleet, simulate
from ingest.simulator.delivery import deliver, event_payloads
from ingest.stack import LocalStack
from ingest.telemetry_backfill import create_blocks, write_openmetrics

TARGET_WALL_S = 120.0


@dataclass
class Run:
    requests: int
    samples: int
    simulate_s: float
    deliver_s: float
    publish_s: float
    backfill_s: float
    baseline_publish_s: float
    baseline_promtool_s: float

    @property
    def wall_s(self) -> float:
        return self.simulate_s + self.deliver_s


def one_run(index: int, hours: float, seed: int, work: Path) -> Run:
    state = work / f"run{index}"
    settings = Settings(state_dir=state)
    stack = LocalStack(settings)
    stack.up()
    try:
        start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        config = SimulationConfig(
            start=start - timedelta(hours=hours), duration_s=hours * 3600, seed=seed
        )
        spec = default_fleet(4, 8, 8, seed)
        began = time.perf_counter()
        result = simulate(spec, config)
        simulate_s = time.perf_counter() - began
        began = time.perf_counter()
        report = deliver(result, settings, state / "out")
        deliver_s = time.perf_counter() - began
        assert report.published is not None and report.backfill is not None

        # Baseline 1: a bare producer loop over the same payloads, to a fresh topic.
        events = event_payloads(result)
        keys, values = events["key"].to_list(), events["value"].to_list()
        producer = KafkaProducer(**kafka_client_options(settings), linger_ms=20, batch_size=1 << 20)
        began = time.perf_counter()
        for key, value in zip(keys, values, strict=True):
            producer.send("bench.baseline", key=key, value=value)
        producer.flush()
        baseline_publish_s = time.perf_counter() - began
        producer.close()

        # Baseline 2: promtool alone on the same OpenMetrics files.
        files = [state / "om" / f"part-{i}.om.txt" for i in range(2)]
        files[0].parent.mkdir(parents=True)
        write_openmetrics(result.telemetry, files)
        began = time.perf_counter()
        create_blocks(files, state / "om" / "blocks")
        baseline_promtool_s = time.perf_counter() - began
        return Run(
            requests=result.requests.height,
            samples=report.backfill.samples,
            simulate_s=simulate_s,
            deliver_s=deliver_s,
            publish_s=report.publish_s,
            backfill_s=report.backfill_s,
            baseline_publish_s=baseline_publish_s,
            baseline_promtool_s=baseline_promtool_s,
        )
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="gpuledger-bench-") as tmp:
        for i in range(args.runs):
            run = one_run(i, args.hours, args.seed + i, Path(tmp))
            runs.append(run)
            print(
                f"run {i + 1}/{args.runs}: {run.requests:,} requests, {run.samples:,} samples; "
                f"simulate {run.simulate_s:.1f} s + deliver {run.deliver_s:.1f} s "
                f"(publish {run.publish_s:.1f} s | telemetry {run.backfill_s:.1f} s) "
                f"= {run.wall_s:.1f} s; bare producer {run.baseline_publish_s:.1f} s, "
                f"bare promtool {run.baseline_promtool_s:.1f} s",
                flush=True,
            )

    def median(values: list[float]) -> float:
        return statistics.median(values)

    wall = median([r.wall_s for r in runs])
    events_per_s = median([r.requests / r.publish_s for r in runs])
    baseline_events_per_s = median([r.requests / r.baseline_publish_s for r in runs])
    samples_per_s = median([r.samples / r.backfill_s for r in runs])
    baseline_samples_per_s = median([r.samples / r.baseline_promtool_s for r in runs])
    requests = int(median([float(r.requests) for r in runs]))
    print(
        f"median of {len(runs)}: {requests:,} requests generated and loaded in {wall:.1f} s "
        f"(target < {TARGET_WALL_S:.0f} s); {events_per_s:,.0f} events/s published "
        f"({events_per_s / baseline_events_per_s:.2f}x a bare producer loop); "
        f"{samples_per_s:,.0f} samples/s loaded ({samples_per_s / baseline_samples_per_s:.2f}x "
        f"promtool alone)"
    )
    print(
        "RESULT "
        f"requests={requests} wall_s={wall:.1f} target_wall_s={TARGET_WALL_S:.0f} "
        f"simulate_s={median([r.simulate_s for r in runs]):.1f} "
        f"events_per_s={events_per_s:.0f} baseline_events_per_s={baseline_events_per_s:.0f} "
        f"publish_ratio={events_per_s / baseline_events_per_s:.2f} "
        f"samples_per_s={samples_per_s:.0f} baseline_samples_per_s={baseline_samples_per_s:.0f} "
        f"load_ratio={samples_per_s / baseline_samples_per_s:.2f} runs={len(runs)} "
        f"pass={'yes' if wall < TARGET_WALL_S and requests >= 1_000_000 else 'no'}"
    )


if __name__ == "__main__":
    main()
