"""Benchmark: ingestion into the lake — usage from Kafka, telemetry from Prometheus.

Targets (issue 3), on this 2-core machine:
- usage: sustained events/s from Kafka into durable raw storage (decoded, validated,
  fsync'ed landing files) >= 100,000/s, and >= 0.7 x a bare kafka-python poll loop
  over the same topic measured in the same run;
- telemetry: a day of a 256-GPU fleet scraped every 15 s pulled and written <= 60 s.

Usage: one fresh local stack; a simulated day of the demo fleet's usage events
(~1.4 M) is published once, then each run consumes the whole topic twice from the
start — a bare poll loop (no group, assigned partitions, nothing kept) and
`gpuledger`'s consumer into an empty lake — in alternating order. A scale-out run
starts two consumer processes on half the partitions each. Rates exclude the idle
time the consumer waits to be sure it is caught up.

Usage: .venv/bin/python bench/ingest.py [--runs 3] [--skip-telemetry]
Prints medians and ends with one `RESULT key=value ...` line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

# Run as `python bench/ingest.py`, Python puts bench/ first on sys.path, where this
# very file would shadow the `ingest` package: drop it, and load the sibling helper
# module by path.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]

import importlib.util

from kafka import KafkaConsumer, TopicPartition

from ingest.endpoints import kafka_client_options
from ingest.settings import Settings
from ingest.simulator import SimulationConfig, default_fleet, simulate
from ingest.simulator.delivery import event_payloads
from ingest.stack import LocalStack
from ingest.usage_consumer import StopWhen, consume, register_tenants
from ingest.usage_publisher import publish

_spec = importlib.util.spec_from_file_location("_telemetry", _BENCH_DIR / "_telemetry.py")
assert _spec is not None and _spec.loader is not None
_telemetry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_telemetry)
TARGET_PULL_S = _telemetry.TARGET_PULL_S
measure_telemetry_pull = _telemetry.measure_telemetry_pull

TARGET_EVENTS_PER_S = 100_000.0
TARGET_RATIO = 0.7
IDLE_S = 1.0
TOPIC = "bench.usage.v1"


def bare_poll(settings: Settings, expected: int) -> float:
    """Seconds for a plain kafka-python loop to poll `expected` records."""
    consumer = KafkaConsumer(
        **kafka_client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=16 << 20,
        max_poll_records=50_000,
    )
    tps = [TopicPartition(TOPIC, p) for p in sorted(consumer.partitions_for_topic(TOPIC) or [])]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen = 0
    began = time.perf_counter()
    while seen < expected:
        for records in consumer.poll(timeout_ms=1000).values():
            seen += len(records)
    elapsed = time.perf_counter() - began
    consumer.close()
    return elapsed


def ours(settings: Settings, lake: Path) -> tuple[int, float]:
    run = settings.model_copy(update={"lake_dir": lake})
    report = consume(run, topic=TOPIC, stop=StopWhen(idle_s=IDLE_S))
    return report.records, report.seconds - IDLE_S


def scale_out(settings: Settings, lake: Path) -> tuple[int, float]:
    """Two consumer processes, half the partitions each, into one lake."""
    env = {
        **os.environ,
        "GPULEDGER_STATE_DIR": str(settings.state_dir),
        "GPULEDGER_LAKE_DIR": str(lake),
        "GPULEDGER_KAFKA__TOPIC": TOPIC,
    }
    gpuledger = str(Path(sys.executable).parent / "gpuledger")
    began = time.perf_counter()
    procs = [
        subprocess.Popen(
            [gpuledger, "ingest", "usage", "--partitions", part, "--idle-s", str(IDLE_S)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part in ("0-3", "4-7")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"scale-out consumer failed: {err.strip()[-300:]}")
    elapsed = time.perf_counter() - began - IDLE_S - 1.0  # idle wait + interpreter start
    landed = sum(
        int(f.stem.split("-")[1]) - int(f.stem.split("-")[0]) + 1
        for f in lake.glob(f"usage/landing/topic={TOPIC}/partition=*/*.parquet")
    )
    return landed, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-telemetry", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuledger-bench-ingest-") as tmp:
        work = Path(tmp)
        settings = Settings(state_dir=work / "state", kafka={"topic": TOPIC, "topic_partitions": 8})
        stack = LocalStack(settings)
        stack.up()
        try:
            start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            result = simulate(
                default_fleet(4, 8, 8, 0),
                SimulationConfig(start=start - timedelta(days=1), duration_s=86400, seed=0),
            )
            register_tenants(settings, [t.id for t in result.fleet.spec.tenants])
            events = event_payloads(result)
            began = time.perf_counter()
            publish(settings, events["key"].to_list(), events["value"].to_list())
            print(
                f"published {events.height:,} events in {time.perf_counter() - began:.1f} s",
                flush=True,
            )
            n = events.height
            del events, result
            bare_rates, our_rates, scale_rates = [], [], []
            for i in range(args.runs):
                order = ("bare", "ours") if i % 2 == 0 else ("ours", "bare")
                for which in order:
                    if which == "bare":
                        bare_rates.append(n / bare_poll(settings, n))
                    else:
                        lake = work / f"lake-{i}"
                        landed, seconds = ours(settings, lake)
                        if landed != n:
                            raise RuntimeError(f"consumer landed {landed} of {n}")
                        our_rates.append(landed / seconds)
                        shutil.rmtree(lake)
                lake = work / f"lake-scale-{i}"
                landed, seconds = scale_out(settings, lake)
                if landed != n:
                    raise RuntimeError(f"scale-out landed {landed} of {n}")
                scale_rates.append(landed / seconds)
                shutil.rmtree(lake)
                print(
                    f"run {i + 1}/{args.runs}: bare poll {bare_rates[-1]:,.0f}/s, "
                    f"gpuledger consumer {our_rates[-1]:,.0f}/s "
                    f"({our_rates[-1] / bare_rates[-1]:.2f}x), "
                    f"2 processes {scale_rates[-1]:,.0f}/s",
                    flush=True,
                )
        finally:
            stack.down()
        bare = statistics.median(bare_rates)
        mine = statistics.median(our_rates)
        scaled = statistics.median(scale_rates)
        print(
            f"usage, median of {args.runs}: {mine:,.0f} events/s into the lake "
            f"(target {TARGET_EVENTS_PER_S:,.0f}), {mine / bare:.2f}x a bare poll loop at "
            f"{bare:,.0f}/s (target {TARGET_RATIO}); two processes {scaled:,.0f}/s"
        )
        telemetry: dict[str, float] = {}
        if not args.skip_telemetry:
            telemetry = measure_telemetry_pull(work, gpus=256, hours=24.0, pulls=args.runs)
            print(
                f"telemetry: {telemetry['samples']:,.0f} samples of 256 GPUs over a day pulled "
                f"and written in {telemetry['pull_s']:.1f} s (median of {args.runs}; target "
                f"<= {TARGET_PULL_S:.0f} s)"
            )
    fields = [
        f"events={n}",
        f"events_per_s={mine:.0f}",
        f"bare_poll_per_s={bare:.0f}",
        f"ratio={mine / bare:.2f}",
        f"scale_out_2proc_per_s={scaled:.0f}",
        f"usage_target_met={'yes' if mine >= TARGET_EVENTS_PER_S else 'no'}",
        f"ratio_target_met={'yes' if mine / bare >= TARGET_RATIO else 'no'}",
    ]
    if telemetry:
        fields += [
            f"telemetry_samples={telemetry['samples']:.0f}",
            f"telemetry_pull_s={telemetry['pull_s']:.1f}",
            f"telemetry_target_met={'yes' if telemetry['pull_s'] <= TARGET_PULL_S else 'no'}",
        ]
    print("RESULT " + " ".join([*fields, f"runs={args.runs}"]))


if __name__ == "__main__":
    main()
