"""Property test of the allocation (ALLOCATION.md §6) on random fleets, end to end.

Each example draws a small fleet — hosts of H100, A100 or unconfigured GPUs split into
tensor-parallel groups of 1, 2 or 4, plus sometimes a host that reports no telemetry —
its DCGM samples (scrape jitter, gaps past the gap limit, counter resets, counters and
power missing as DCGM placeholders, repeated collections, GPUs whose telemetry starts
late or stops early) and its requests (overlapping each other and the hour boundaries,
some with no token). It writes them as raw lake files in the ingest schemas, runs
`allocate` (dbt build) over a two-hour window with an idle policy drawn from the three,
and then:

- `check_invariants` passes: energy and time close per GPU-hour, every usage event is
  billed exactly once;
- the metered energy of every GPU-hour, recomputed here from the raw samples (counter
  increase, else the power integral, gaps by the configured rule, cut at hours pro
  rata), equals `marts.fct_gpu_hourly.metered_j`;
- the tokens billed per tenant in `fct_request_allocation` equal the raw events';
- requests only on GPUs with no telemetry are orphans (zero energy, reason
  `gpu_not_in_telemetry`); requests inside their GPUs' telemetry are not.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from ingest.catalog import connect
from ingest.lake import Lake, write_parquet_atomic
from ingest.settings import Settings
from ingest.telemetry.schema import ENERGY_METRIC, TELEMETRY_SCHEMA
from ingest.usage_hours import EVENTS_SCHEMA
from pipelines.allocation import allocate, check_invariants
from tests.conftest import build_settings

US = 1_000_000
HOUR_US = 3600 * US
WINDOW_START = datetime(2024, 1, 1, tzinfo=UTC)
WINDOW_END = WINDOW_START + timedelta(hours=2)
START_US = int(WINDOW_START.timestamp()) * US
END_US = int(WINDOW_END.timestamp()) * US
SCRAPE_S = 15.0
#: AllocationConfig's default gap limit: 3 x the 15 s scrape interval.
GAP_LIMIT_S = 45.0
GPU_MODELS = {
    "H100": ("NVIDIA H100 80GB HBM3", 115.0),
    "A100": ("NVIDIA A100-SXM4-80GB", 90.0),
    "L4": ("NVIDIA L4", 30.0),  # not configured: the default idle power applies
}
SERVED_MODELS = ("llama-3.1-8b", "qwen3-14b", "llama-3.1-70b", "some-unlisted-model")
TENANTS = ("acme", "globex", "initech")
RELATIVE = 1e-9
ABSOLUTE = 1e-6


@dataclass(frozen=True)
class Gpu:
    key: str
    uuid: str
    hostname: str
    index: int
    kind: str
    #: False: the GPU never reports (its requests are orphans).
    reports: bool


@dataclass
class Fleet:
    gpus: list[Gpu]
    replicas: list[tuple[str, list[int]]]
    idle_policy: str
    gap_energy: str
    min_fit_slices: int
    min_idle_slices: int
    requests: int
    gap_rate: float
    reset_rate: float
    missing_rate: float
    repeat_rate: float
    partial_coverage: bool
    seed: int


@st.composite
def fleets(draw: st.DrawFn, idle_policy: str) -> Fleet:
    gpus: list[Gpu] = []
    replicas: list[tuple[str, list[int]]] = []
    hosts = draw(st.integers(1, 3))
    ghost_host = draw(st.booleans())
    for h in range(hosts + int(ghost_host)):
        reports = h < hosts
        size = draw(st.sampled_from((1, 2, 4)))
        kind = draw(st.sampled_from(sorted(GPU_MODELS)))
        hostname = f"node-{h}" if reports else "ghost-node"
        first = len(gpus)
        for i in range(size):
            uuid = f"GPU-{h:02d}{i:02d}-{'x' if not reports else 'a'}"
            gpus.append(Gpu(f"{hostname}/{uuid}", uuid, hostname, i, kind, reports))
        at = 0
        while at < size:
            tp = draw(st.sampled_from([k for k in (1, 2, 4) if at + k <= size]))
            model = draw(st.sampled_from(SERVED_MODELS))
            replicas.append((model, list(range(first + at, first + at + tp))))
            at += tp
    return Fleet(
        gpus=gpus,
        replicas=replicas,
        idle_policy=idle_policy,
        gap_energy=draw(st.sampled_from(("power_integral", "counter"))),
        min_fit_slices=draw(st.sampled_from((10, 200))),
        min_idle_slices=draw(st.sampled_from((2, 20))),
        requests=draw(st.integers(5, 60)),
        gap_rate=draw(st.sampled_from((0.0, 0.02, 0.1))),
        reset_rate=draw(st.sampled_from((0.0, 0.005, 0.05))),
        missing_rate=draw(st.sampled_from((0.0, 0.02, 0.1))),
        repeat_rate=draw(st.sampled_from((0.0, 0.05))),
        partial_coverage=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# --- Raw inputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    request_id: str
    tenant: str
    model: str
    gpus: tuple[int, ...]
    arrival_us: int
    first_token_us: int | None
    end_us: int
    prompt: int
    cached: int
    completion: int


def draw_requests(fleet: Fleet, rng: np.random.Generator) -> list[Request]:
    out = []
    for i in range(fleet.requests):
        model, gpus = fleet.replicas[int(rng.integers(len(fleet.replicas)))]
        arrival = START_US + int(rng.integers(-600 * US, 7300 * US))
        prefill = 0 if rng.random() < 0.1 else int(rng.integers(1, 3 * US))
        long = rng.random() < 0.1
        decode = int(rng.integers(600 * US, 2400 * US)) if long else int(rng.integers(0, 90 * US))
        no_token = rng.random() < 0.05
        prompt = int(rng.integers(1, 8000))
        out.append(
            Request(
                request_id=f"req-{i:04d}",
                tenant=TENANTS[int(rng.integers(len(TENANTS)))],
                model=model,
                gpus=tuple(gpus),
                arrival_us=arrival,
                first_token_us=None if no_token else arrival + prefill,
                end_us=arrival + prefill + decode,
                prompt=prompt,
                cached=int(rng.integers(0, prompt + 1)) if rng.random() < 0.3 else 0,
                completion=0 if no_token else int(rng.integers(1, 2000)),
            )
        )
    return out


def telemetry_rows(
    fleet: Fleet, gpu: Gpu, requests: list[Request], rng: np.random.Generator
) -> list[dict[str, Any]]:
    """One GPU's samples: ~15 s scrapes with jitter and gaps; power follows the load; the
    counter (mJ) integrates power and restarts near 0 on a reset; placeholders null a
    metric and name it; a repeated collection copies the previous sample's values."""
    start = START_US - int(rng.integers(0, 600 * US))
    stop = END_US + int(rng.integers(0, 600 * US))
    if fleet.partial_coverage and rng.random() < 0.5:
        if rng.random() < 0.5:
            start = START_US + int(rng.integers(0, 5400 * US))  # starts late
        else:
            stop = START_US + int(rng.integers(1800 * US, 7200 * US))  # stops early
    mine = [r for r in requests if fleet.gpus.index(gpu) in r.gpus]
    model_name, idle_w = GPU_MODELS[gpu.kind]
    counter = float(rng.uniform(1e9, 5e9))
    rows: list[dict[str, Any]] = []
    t = start
    previous: dict[str, Any] | None = None
    while t < stop:
        load = sum(1 for r in mine if r.arrival_us <= t < r.end_us)
        power = idle_w * float(rng.uniform(0.9, 1.1)) + 60.0 * load * float(rng.uniform(0.5, 1))
        activity = min(1.0, 0.3 * load)
        row: dict[str, Any] = {
            "hour_start": (t // HOUR_US) * HOUR_US,
            "gpu_key": gpu.key,
            "hostname": gpu.hostname,
            "gpu_uuid": gpu.uuid,
            "gpu_index": gpu.index,
            "mig_instance_id": None,
            "mig_profile": None,
            "model_name": model_name,
            "pci_bus_id": f"00000000:{gpu.index:02X}:00.0",
            "driver_version": "550.90.07",
            "instance": f"{gpu.hostname}:9400",
            "job": "dcgm-exporter",
            "ts": t,
            "energy_mj": math.floor(counter),
            "power_w": round(power, 3),
            "gpu_util_pct": round(activity * 100),
            "gr_engine_active": activity if rng.random() > 0.2 else None,
            "fb_used_mib": 1024.0,
            "fb_free_mib": 80_000.0,
            "sm_clock_mhz": 1980.0,
            "gpu_temp_c": 40.0,
            "placeholder_metrics": [],
            "counter_reset": False,
            "gap_before_s": None,
            "gap": False,
            "repeated": False,
        }
        if rng.random() < fleet.missing_rate:
            row["energy_mj"] = None
            row["placeholder_metrics"] = [ENERGY_METRIC]
        if rng.random() < fleet.missing_rate / 2:
            row["power_w"] = None
            row["placeholder_metrics"] = [*row["placeholder_metrics"], "DCGM_FI_DEV_POWER_USAGE"]
        if previous is not None and rng.random() < fleet.repeat_rate:
            # dcgm-exporter served its last collection again: same values, flagged.
            row = {**previous, "ts": t, "hour_start": row["hour_start"], "repeated": True}
        if previous is not None:
            row["gap_before_s"] = (t - previous["ts"]) / US
            row["gap"] = row["gap_before_s"] > GAP_LIMIT_S
        rows.append(row)
        if not row["repeated"]:
            previous = row
        step = int(rng.uniform(SCRAPE_S - 1, SCRAPE_S + 1) * US)
        if rng.random() < fleet.gap_rate:
            step = int(rng.uniform(50, 900) * US)
        counter += power * step / 1000.0  # W * us / 1000 = mJ
        if rng.random() < fleet.reset_rate:
            counter = float(rng.uniform(0, 1e6))
        t += step
    return rows


def event_rows(requests: list[Request], fleet: Fleet, topic: str) -> list[dict[str, Any]]:
    rows = []
    for n, r in enumerate(requests):
        rows.append(
            {
                "hour_start": (r.end_us // HOUR_US) * HOUR_US,
                "event_id": r.request_id,
                "tenant": r.tenant,
                "model": r.model,
                "model_version": "2024-07",
                "prompt_tokens": r.prompt,
                "completion_tokens": r.completion,
                "cached_prompt_tokens": r.cached,
                "event_time": r.end_us,
                "arrival_time": r.arrival_us,
                "first_token_time": r.first_token_us,
                "end_time": r.end_us,
                "hostname": fleet.gpus[r.gpus[0]].hostname,
                "gpu_uuids": [fleet.gpus[g].uuid for g in r.gpus],
                "status": "ok",
                "source": "http://vllm.test/v1",
                "topic": topic,
                "partition": n % 4,
                "offset": n // 4,
                "kafka_ts": r.end_us + 5_000,
                "ingested_at": r.end_us + 2 * US,
                "copies": 1,
            }
        )
    return rows


def write_by_hour(
    rows: list[dict[str, Any]], schema: pa.Schema, directory: Callable[[datetime], Path], name: str
) -> None:
    hours: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        hours[row["hour_start"]].append(row)
    for hour_us, chunk in hours.items():
        table = pa.Table.from_pylist(chunk, schema=schema)
        hour = datetime.fromtimestamp(hour_us / US, tz=UTC)
        write_parquet_atomic(table, directory(hour) / name)


# --- Independent recomputation ----------------------------------------------------------


def metered_per_gpu_hour(
    telemetry: list[dict[str, Any]], gap_energy: str
) -> dict[tuple[str, int], float]:
    """ALLOCATION.md §1 from the raw samples: slices between consecutive distinct samples;
    the counter's increase, or the power integral where the counter is missing or went
    back (or over a gap, unless gap_energy is `counter`), nothing where both are missing;
    cut at hour boundaries pro rata; summed per GPU-hour of the window."""
    by_gpu: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in telemetry:
        if not row["repeated"]:
            by_gpu[row["gpu_key"]].append(row)
    metered: dict[tuple[str, int], float] = defaultdict(float)
    for key, rows in by_gpu.items():
        rows.sort(key=lambda r: r["ts"])
        for a, b in itertools.pairwise(rows):
            duration_s = (b["ts"] - a["ts"]) / US
            gap = duration_s > GAP_LIMIT_S
            held = (
                a["energy_mj"] is not None
                and b["energy_mj"] is not None
                and b["energy_mj"] >= a["energy_mj"]
            )
            p0 = a["power_w"] if a["power_w"] is not None else b["power_w"]
            p1 = b["power_w"] if b["power_w"] is not None else a["power_w"]
            if held and (not gap or gap_energy == "counter"):
                energy_j = (b["energy_mj"] - a["energy_mj"]) / 1000.0
            elif p0 is not None:
                energy_j = (p0 + p1) / 2.0 * duration_s
            else:
                energy_j = 0.0
            hour = (a["ts"] // HOUR_US) * HOUR_US
            while hour < b["ts"]:
                lo, hi = max(a["ts"], hour), min(b["ts"], hour + HOUR_US)
                if START_US <= hour < END_US:
                    metered[(key, hour)] += energy_j * (hi - lo) / (b["ts"] - a["ts"])
                hour += HOUR_US
    return dict(metered)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= RELATIVE * max(abs(a), abs(b)) + ABSOLUTE


def span_of(telemetry: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    spans: dict[str, tuple[int, int]] = {}
    for row in telemetry:
        if row["repeated"]:
            continue
        lo, hi = spans.get(row["gpu_uuid"], (row["ts"], row["ts"]))
        spans[row["gpu_uuid"]] = (min(lo, row["ts"]), max(hi, row["ts"]))
    return spans


def describe(fleet: Fleet, requests: list[Request], telemetry: list[dict[str, Any]]) -> None:
    """What the example exercises (`pytest --hypothesis-show-statistics`)."""
    event(f"idle policy {fleet.idle_policy}")
    if any(len(gpus) > 1 for _, gpus in fleet.replicas):
        event("tensor-parallel groups")
    if any(not fleet.gpus[g].reports for r in requests for g in r.gpus):
        event("requests on GPUs without telemetry")
    if any(r.end_us // HOUR_US != r.arrival_us // HOUR_US for r in requests):
        event("requests crossing an hour")
    if any(row["energy_mj"] is None for row in telemetry):
        event("missing counters")
    if any(row["gap"] for row in telemetry):
        event("gaps")
    if any(row["repeated"] for row in telemetry):
        event("repeated collections")
    last: dict[str, float] = {}
    for row in telemetry:
        if row["energy_mj"] is not None and not row["repeated"]:
            if row["energy_mj"] < last.get(row["gpu_key"], -1.0):
                event("counter resets")
            last[row["gpu_key"]] = row["energy_mj"]


# --- The property -----------------------------------------------------------------------


def run_example(fleet: Fleet, state_dir: Path) -> None:
    settings: Settings = build_settings(state_dir)
    topic = settings.kafka.topic
    (state_dir / "allocation.yaml").write_text(
        yaml.safe_dump(
            {
                "idle_policy": fleet.idle_policy,
                "gap_energy": fleet.gap_energy,
                "min_fit_slices": fleet.min_fit_slices,
                "min_idle_slices": fleet.min_idle_slices,
            }
        )
    )
    rng = np.random.default_rng(fleet.seed)
    requests = draw_requests(fleet, rng)
    telemetry = [
        row
        for gpu in fleet.gpus
        if gpu.reports
        for row in telemetry_rows(fleet, gpu, requests, rng)
    ]
    lake = Lake(settings.lake_path)
    write_by_hour(telemetry, TELEMETRY_SCHEMA, lake.telemetry_hour_dir, "samples.parquet")
    write_by_hour(
        event_rows(requests, fleet, topic),
        EVENTS_SCHEMA,
        lambda hour: lake.usage_hour_dir(topic, hour),
        "events.parquet",
    )

    describe(fleet, requests, telemetry)

    run = allocate(settings, WINDOW_START, WINDOW_END)
    assert run.success, [(n.name, n.status, n.message) for n in run.failures] or run.log[-3000:]

    report = check_invariants(settings, WINDOW_START, WINDOW_END)
    assert report.passed, (
        report.energy_failures[:5],
        report.time_failures[:5],
        report.token_failures[:5],
    )

    in_window = [r for r in requests if START_US <= (r.end_us // HOUR_US) * HOUR_US < END_US]
    with connect(settings) as con:
        hourly = con.sql(
            "select gpu_key, epoch_us(hour_start), metered_j, idle_policy, allocated_idle_j "
            "from marts.fct_gpu_hourly"
        ).fetchall()
        billed = con.sql(
            "select request_id, tenant, prompt_tokens, completion_tokens, energy_j, is_orphan, "
            "idle_policy from marts.fct_request_allocation"
        ).fetchall()
        reasons = dict(
            con.sql("select request_id, reason from marts.dq_orphan_requests").fetchall()
        )

    # Metered energy per GPU-hour, recomputed from the raw samples.
    expected = metered_per_gpu_hour(telemetry, fleet.gap_energy)
    actual = {(key, hour): metered for key, hour, metered, _, _ in hourly}
    assert set(actual) == set(expected)
    wrong = {k: (actual[k], expected[k]) for k in expected if not close(actual[k], expected[k])}
    assert not wrong, wrong
    assert {policy for _, _, _, policy, _ in hourly} <= {fleet.idle_policy}
    if fleet.idle_policy == "separate":
        assert all(idle == 0 for *_, idle in hourly)

    # Tokens per tenant: every event of the window's hours billed once.
    raw_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in in_window:
        raw_tokens[r.tenant][0] += 1
        raw_tokens[r.tenant][1] += r.prompt
        raw_tokens[r.tenant][2] += r.completion
    billed_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for _, tenant, prompt, completion, *_ in billed:
        billed_tokens[tenant][0] += 1
        billed_tokens[tenant][1] += prompt
        billed_tokens[tenant][2] += completion
    assert billed_tokens == raw_tokens
    assert {row[6] for row in billed} <= {fleet.idle_policy}

    # Orphans: no telemetry at all -> zero energy, gpu_not_in_telemetry; a request inside
    # its GPUs' telemetry (and the window) is allocated.
    by_id = {row[0]: row for row in billed}
    spans = span_of(telemetry)
    for r in in_window:
        uuids = [fleet.gpus[g].uuid for g in r.gpus]
        _, _, _, _, energy_j, is_orphan, _ = by_id[r.request_id]
        if not any(fleet.gpus[g].reports for g in r.gpus):
            assert is_orphan and energy_j == 0, r
            assert reasons[r.request_id] == "gpu_not_in_telemetry", r
        elif (
            r.end_us > r.arrival_us
            and r.arrival_us >= START_US
            and all(u in spans and spans[u][0] <= r.arrival_us < spans[u][1] for u in uuids)
        ):
            assert not is_orphan, r
            assert r.request_id not in reasons, r
    assert {rid for rid, row in by_id.items() if row[5]} == set(reasons)


# `share` (the policy with the most arithmetic) runs by default; the other two are the
# opt-in `slow` suite: the default run checks `separate` on every real pipeline run
# (allocation_invariants in tests/integration/test_efficiency_marts.py and others).
@pytest.mark.parametrize(
    "idle_policy",
    [
        pytest.param("separate", marks=pytest.mark.slow),
        pytest.param("absorb", marks=pytest.mark.slow),
        "share",
    ],
)
@settings(
    max_examples=2,
    deadline=None,
    derandomize=True,
    # Each example is a dbt build (~10 s): shrinking would take many minutes. A failure
    # prints its Fleet, seed included, which reproduces it.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_allocation_invariants_hold_on_random_fleets(
    idle_policy: str, data: st.DataObject, tmp_path: Path
) -> None:
    fleet = data.draw(fleets(idle_policy), label="fleet")
    with tempfile.TemporaryDirectory(dir=tmp_path) as state_dir:
        run_example(fleet, Path(state_dir) / "state")
