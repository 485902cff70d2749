"""Synthetic inputs for the allocation benchmark, written straight into a lake.

One fleet-hour at 1 s telemetry: `hosts` x 8 GPUs (the simulator's four node patterns,
cycled: H100 and A100 nodes with tensor-parallel replicas of 1, 2 and 4 GPUs), one
sample per GPU per second from `margin_s` before the hour to `margin_s` after it, and
`requests` usage events ending in the hour, each on one replica. Power follows the
load the requests put on each GPU (idle plus a saturating dynamic part), the energy
counter (mJ) integrates it, so the inputs look like a busy serving fleet; everything
is drawn from one seed with numpy and written with pyarrow in the ingest schemas
(`TELEMETRY_SCHEMA`, `EVENTS_SCHEMA`) to the lake's hour directories.

`write_inputs(lake_root, hour, requests=..., seed=...)` returns a summary dict.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ingest.lake import Lake, hour_key, write_parquet_atomic
from ingest.telemetry.schema import TELEMETRY_SCHEMA, TS_TYPE
from ingest.usage_hours import EVENTS_SCHEMA

GPUS_PER_HOST = 8
#: The simulator's node patterns (ingest/simulator/fleet.py): GPU type, replicas.
NODE_PATTERNS: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = (
    ("H100", (("llama-3.1-70b", 4), ("llama-3.1-70b", 4))),
    ("H100", (("llama-3.1-8b", 1), ("llama-3.1-8b", 1), ("qwen3-32b", 2), ("llama-3.1-70b", 4))),
    ("A100", (("llama-3.1-8b", 1),) * 2 + (("qwen3-14b", 1),) * 2 + (("qwen3-32b", 2),) * 2),
    ("A100", (("llama-3.1-70b", 4), ("qwen3-14b", 1), ("qwen3-14b", 1))),
)
GPU_NAMES = {"H100": "NVIDIA H100 80GB HBM3", "A100": "NVIDIA A100-SXM4-80GB"}
IDLE_W = {"H100": 115.0, "A100": 90.0}
#: Dynamic power at saturation (TDP 700 W / 400 W minus idle, a little headroom).
DYNAMIC_MAX_W = {"H100": 560.0, "A100": 290.0}
PCI_BUSES = ("18", "2A", "3A", "5D", "9A", "AB", "BA", "DB")
TENANTS = 8
US = 1_000_000


def _uuid_strings(rng: np.random.Generator, n: int) -> list[str]:
    out = []
    for _ in range(n):
        raw = rng.bytes(16).hex()
        out.append(f"GPU-{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}")
    return out


def fleet(hosts: int, seed: int) -> dict[str, Any]:
    """GPUs (per-GPU attribute arrays) and replicas (model, GPU indices)."""
    rng = np.random.default_rng(seed)
    n = hosts * GPUS_PER_HOST
    uuids = _uuid_strings(rng, n)
    hostnames, gpu_types, gpu_index = [], [], []
    replica_model: list[str] = []
    replica_gpus: list[list[int]] = []
    replica_host: list[str] = []
    for h in range(hosts):
        gpu_type, deployments = NODE_PATTERNS[h % len(NODE_PATTERNS)]
        hostname = f"gpu-node-{h:03d}"
        first = h * GPUS_PER_HOST
        for i in range(GPUS_PER_HOST):
            hostnames.append(hostname)
            gpu_types.append(gpu_type)
            gpu_index.append(i)
        at = first
        for model, tp in deployments:
            replica_model.append(model)
            replica_gpus.append(list(range(at, at + tp)))
            replica_host.append(hostname)
            at += tp
    return {
        "n": n,
        "uuids": uuids,
        "hostnames": hostnames,
        "gpu_types": gpu_types,
        "gpu_index": gpu_index,
        "gpu_keys": [f"{h}/{u}" for h, u in zip(hostnames, uuids, strict=True)],
        "replica_model": replica_model,
        "replica_gpus": replica_gpus,
        "replica_host": replica_host,
    }


def _requests(
    f: dict[str, Any], hour_us: int, n: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """`n` requests ending uniformly in the hour; replica chosen in proportion to its
    GPUs (every GPU carries about the same load)."""
    tp = np.array([len(g) for g in f["replica_gpus"]])
    replica = rng.choice(tp.size, size=n, p=tp / tp.sum())
    end = hour_us + rng.integers(0, 3600 * US, size=n)
    prefill_s = np.clip(rng.lognormal(np.log(0.15), 0.8, n), 0.02, 1.2)
    decode_s = np.clip(rng.lognormal(np.log(5.0), 0.6, n), 1.0, 20.0)
    prompt = np.maximum(1, np.round(prefill_s * rng.uniform(3_000, 12_000, n))).astype(np.int64)
    completion = np.maximum(1, np.round(decode_s * rng.uniform(20, 80, n))).astype(np.int64)
    cached = np.where(rng.random(n) < 0.3, np.floor(prompt * rng.uniform(0, 0.5, n)), 0).astype(
        np.int64
    )
    first_token = end - np.round(decode_s * US).astype(np.int64)
    arrival = first_token - np.round(prefill_s * US).astype(np.int64)
    order = np.argsort(end, kind="stable")
    return {
        "replica": replica[order],
        "arrival": arrival[order],
        "first_token": first_token[order],
        "end": end[order],
        "prompt": prompt[order],
        "completion": completion[order],
        "cached": cached[order],
        "tenant": rng.zipf(2.0, n)[order] % TENANTS,
    }


def _events_tables(
    f: dict[str, Any], r: dict[str, np.ndarray], topic: str, hour_us: int, partitions: int = 8
) -> dict[int, pa.Table]:
    n = r["end"].size
    replica = r["replica"]
    # gpu_uuids: a list per request, the replica's GPUs.
    rep_sizes = np.array([len(g) for g in f["replica_gpus"]], dtype=np.int32)
    rep_offsets = np.zeros(rep_sizes.size + 1, dtype=np.int64)
    np.cumsum(rep_sizes, out=rep_offsets[1:])
    rep_flat = np.concatenate([np.asarray(g) for g in f["replica_gpus"]])
    sizes = rep_sizes[replica]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    # Element j of request i is rep_flat[rep_offsets[replica[i]] + j].
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes)
    gpu_of_elem = rep_flat[np.repeat(rep_offsets[replica], sizes) + within]
    uuid_values = pa.array(f["uuids"], type=pa.string()).take(pa.array(gpu_of_elem))
    gpu_uuids = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), uuid_values)

    def ts(values: np.ndarray) -> pa.Array:
        return pa.array(values, type=pa.int64()).cast(TS_TYPE)

    partition = (np.arange(n) % partitions).astype(np.int32)
    offset = np.arange(n, dtype=np.int64) // partitions
    ids = pa.array([f"req-{i:09d}" for i in range(n)], type=pa.string())
    tenant_names = pa.array([f"tenant-{k:02d}" for k in range(TENANTS)], type=pa.string())
    models = pa.array(f["replica_model"], type=pa.string())
    hosts = pa.array(f["replica_host"], type=pa.string())
    take_rep = pa.array(replica)
    hour_start = (r["end"] // (3600 * US)) * (3600 * US)
    columns = {
        "hour_start": ts(hour_start),
        "event_id": ids,
        "tenant": tenant_names.take(pa.array(r["tenant"])),
        "model": models.take(take_rep),
        "model_version": pa.array(np.full(n, "2024-07"), type=pa.string()),
        "prompt_tokens": pa.array(r["prompt"]),
        "completion_tokens": pa.array(r["completion"]),
        "cached_prompt_tokens": pa.array(r["cached"]),
        "event_time": ts(r["end"]),
        "arrival_time": ts(r["arrival"]),
        "first_token_time": ts(r["first_token"]),
        "end_time": ts(r["end"]),
        "hostname": hosts.take(take_rep),
        "gpu_uuids": gpu_uuids,
        "status": pa.array(np.full(n, "ok"), type=pa.string()),
        "source": pa.array(np.full(n, "http://vllm.bench/v1"), type=pa.string()),
        "topic": pa.array(np.full(n, topic), type=pa.string()),
        "partition": pa.array(partition),
        "offset": pa.array(offset),
        "kafka_ts": ts(r["end"] + 5_000),
        "ingested_at": ts(r["end"] + 2 * US),
        "copies": pa.array(np.ones(n, dtype=np.int64)),
    }
    table = pa.Table.from_arrays([columns[fl.name] for fl in EVENTS_SCHEMA], schema=EVENTS_SCHEMA)
    out: dict[int, pa.Table] = {}
    for h in np.unique(hour_start):
        lo, hi = np.searchsorted(hour_start, [h, h + 1])  # sorted by end
        out[int(h)] = table.slice(int(lo), int(hi - lo))
    assert hour_us in out
    return out


def _telemetry_tables(
    f: dict[str, Any],
    r: dict[str, np.ndarray],
    hour_us: int,
    margin_s: int,
    rng: np.random.Generator,
) -> dict[int, pa.Table]:
    g = f["n"]
    t0 = hour_us - margin_s * US
    steps = 3600 + 2 * margin_s
    # Load per GPU-second: requests in flight (difference array over 1 s bins).
    rep_gpus = f["replica_gpus"]
    diff = np.zeros((g, steps + 1), dtype=np.float64)
    first_bin = np.clip((r["arrival"] - t0) // US, 0, steps)
    last_bin = np.clip((r["end"] - t0) // US + 1, 0, steps)
    for rep, gpus in enumerate(rep_gpus):
        sel = r["replica"] == rep
        a = np.bincount(first_bin[sel], minlength=steps + 1)
        b = np.bincount(last_bin[sel], minlength=steps + 1)
        for gi in gpus:
            diff[gi] += a - b
    load = np.cumsum(diff, axis=1)[:, :steps]
    types = f["gpu_types"]
    idle = np.array([IDLE_W[t] for t in types])[:, None]
    dyn_max = np.array([DYNAMIC_MAX_W[t] for t in types])[:, None]
    power = idle * rng.uniform(0.97, 1.03, (g, 1)) + dyn_max * (1 - np.exp(-load / 8.0))
    power = np.maximum(power + rng.normal(0, 4.0, power.shape), 20.0)
    activity = np.where(load > 0, np.clip(0.2 + load / 12.0, 0, 1), 0.0)
    activity = np.clip(activity + rng.normal(0, 0.02, activity.shape), 0, 1).round(4)
    # Samples at t0 + k s + a per-GPU scrape phase; counter = integral of power (mJ).
    phase = rng.integers(0, US, g)
    ts = t0 + phase[:, None] + np.arange(steps)[None, :] * US
    energy = rng.uniform(1e9, 5e9, (g, 1)) + np.concatenate(
        [np.zeros((g, 1)), np.cumsum(power[:, :-1] * 1000.0, axis=1)], axis=1
    )
    energy = np.floor(energy)
    hour_of = (ts // (3600 * US)) * (3600 * US)
    out: dict[int, pa.Table] = {}
    keys = pa.array(f["gpu_keys"], type=pa.string())
    attrs = {
        "hostname": pa.array(f["hostnames"], type=pa.string()),
        "gpu_uuid": pa.array(f["uuids"], type=pa.string()),
        "gpu_index": pa.array(f["gpu_index"], type=pa.int32()),
        "mig_instance_id": pa.nulls(g, type=pa.int32()),
        "mig_profile": pa.nulls(g, type=pa.string()),
        "model_name": pa.array([GPU_NAMES[t] for t in types], type=pa.string()),
        "pci_bus_id": pa.array(
            [f"00000000:{PCI_BUSES[i % 8]}:00.0" for i in f["gpu_index"]], type=pa.string()
        ),
        "driver_version": pa.array(["550.90.07"] * g, type=pa.string()),
        "instance": pa.array([f"{h}:9400" for h in f["hostnames"]], type=pa.string()),
        "job": pa.array(["dcgm-exporter"] * g, type=pa.string()),
    }
    order = np.argsort(np.array(f["gpu_keys"]), kind="stable")  # files sorted by GPU, time
    for h in np.unique(hour_of):
        mask = hour_of[order] == h
        rows_per_gpu = mask.sum(axis=1)
        gi = np.repeat(order, rows_per_gpu)
        take = pa.array(gi)

        def pick(a: np.ndarray, mask: np.ndarray = mask) -> np.ndarray:
            return a[order][mask]

        m = int(gi.size)
        fb_used = np.where(pick(load) > 0, 70_000.0, 1_024.0)
        columns: dict[str, pa.Array] = {
            "hour_start": pa.array(np.full(m, h, dtype=np.int64)).cast(TS_TYPE),
            "gpu_key": keys.take(take),
            **{name: arr.take(take) for name, arr in attrs.items()},
            "ts": pa.array(pick(ts)).cast(TS_TYPE),
            "energy_mj": pa.array(pick(energy)),
            "power_w": pa.array(pick(power).round(3)),
            "gpu_util_pct": pa.array((pick(activity) * 100).round()),
            "gr_engine_active": pa.array(pick(activity)),
            "fb_used_mib": pa.array(fb_used),
            "fb_free_mib": pa.array(81_559.0 - fb_used),
            "sm_clock_mhz": pa.array(np.where(pick(load) > 0, 1_980.0, 345.0)),
            "gpu_temp_c": pa.array(np.round(30 + pick(power) / 20)),
            "placeholder_metrics": pa.ListArray.from_arrays(
                pa.array(np.zeros(m + 1, dtype=np.int32)), pa.array([], type=pa.string())
            ),
            "counter_reset": pa.array(np.zeros(m, dtype=bool)),
            "gap_before_s": pa.array(np.ones(m)),
            "gap": pa.array(np.zeros(m, dtype=bool)),
            "repeated": pa.array(np.zeros(m, dtype=bool)),
        }
        out[int(h)] = pa.Table.from_arrays(
            [columns[fl.name] for fl in TELEMETRY_SCHEMA], schema=TELEMETRY_SCHEMA
        )
    return out


def write_inputs(
    lake_root: Path,
    hour: datetime,
    *,
    requests: int,
    topic: str,
    hosts: int = 32,
    margin_s: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """Write one fleet-hour of telemetry and `requests` events into the lake at
    `lake_root`; returns counts."""
    lake = Lake(lake_root)
    hour_us = int(hour.timestamp()) * US
    f = fleet(hosts, seed)
    rng = np.random.default_rng([seed, requests])
    r = _requests(f, hour_us, requests, rng)
    samples = 0
    for h, table in _telemetry_tables(f, r, hour_us, margin_s, rng).items():
        at = datetime.fromtimestamp(h / US, tz=UTC)
        write_parquet_atomic(table, lake.telemetry_hour_dir(at) / "samples.parquet")
        samples += table.num_rows
    events_in_hour = 0
    for h, table in _events_tables(f, r, topic, hour_us).items():
        at = datetime.fromtimestamp(h / US, tz=UTC)
        write_parquet_atomic(table, lake.usage_hour_dir(topic, at) / "events.parquet")
        if h == hour_us:
            events_in_hour = table.num_rows
    tp = np.array([len(g) for g in f["replica_gpus"]])
    dur_s = (r["end"] - r["arrival"]) / US
    return {
        "gpus": f["n"],
        "replicas": int(tp.size),
        "samples": samples,
        "samples_in_hour": f["n"] * 3600,
        "requests": requests,
        "events_in_hour": events_in_hour,
        "request_gpu_pairs": int(tp[r["replica"]].sum()),
        "mean_duration_s": float(dur_s.mean()),
        "hour": hour_key(hour),
        "window_end": hour_key(hour + timedelta(hours=1)),
    }
