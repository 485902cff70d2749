"""The usage consumer against a real Tansu broker: exactly once per Kafka record.

Every test has its own topic (a unique name on the session's broker), its own consumer
group and its own lake. The consumer runs in process (`consume`) where only the result
matters, and as the real `gpuledger ingest usage` subprocess where processes are
killed, stopped or run side by side.

Tansu under-reports the log end (ListOffsets(latest) answers the last batch's base
offset + 1), so no test decides "everything was consumed" from end offsets: each one
compares what landed with what it produced.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from ingest.catalog import in_memory
from ingest.lake import TMP_SUFFIX, Lake
from ingest.settings import Settings
from ingest.simulator import SimulationConfig, default_fleet, simulate
from ingest.simulator.delivery import event_payloads
from ingest.usage_consumer import (
    StopWhen,
    consume,
    iter_landing_files,
    landed_next_offset,
    register_tenants,
)
from ingest.usage_hours import late_events, materialize_usage_hours
from ingest.usage_publisher import ensure_topic, publish
from tests.conftest import RunningStack, build_settings

pytestmark = pytest.mark.integration

GPULEDGER = Path(sys.executable).parent / "gpuledger"
#: Simulated events lie in the past (the policy quarantines events > 24 h ahead).
SIM_START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
PARTITIONS = 4


# -- helpers ---------------------------------------------------------------------------


def unique_topic(name: str) -> str:
    return f"test.usage.{name}.{uuid.uuid4().hex[:10]}"


def make_settings(
    local_stack: RunningStack, state_dir: Path, topic: str, **ingest: Any
) -> Settings:
    return build_settings(
        state_dir,
        kafka={
            "bootstrap_servers": local_stack.kafka_bootstrap,
            "topic": topic,
            "topic_partitions": PARTITIONS,
        },
        # A group per test: committed offsets of one test never meet another's.
        ingest={"consumer_group": f"gpuledger-test-{topic}", **ingest},
    )


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `gpuledger` subprocess reading the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GPULEDGER_")}
    env.update(
        {
            "GPULEDGER_STATE_DIR": str(settings.state_dir),
            "GPULEDGER_KAFKA__BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
            "GPULEDGER_KAFKA__TOPIC": settings.kafka.topic,
            "GPULEDGER_KAFKA__TOPIC_PARTITIONS": str(settings.kafka.topic_partitions),
            "GPULEDGER_INGEST__CONSUMER_GROUP": settings.ingest.consumer_group,
            "GPULEDGER_INGEST__BATCH_MAX_RECORDS": str(settings.ingest.batch_max_records),
            "GPULEDGER_INGEST__BATCH_MAX_S": str(settings.ingest.batch_max_s),
            "NO_COLOR": "1",
            **extra,
        }
    )
    return env


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_consumer_outlives_its_test() -> Iterator[None]:
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def start_consumer(settings: Settings, *args: str, **env: str) -> subprocess.Popen[str]:
    """`gpuledger ingest usage ARGS` as a subprocess (killed after the test if alive)."""
    proc = subprocess.Popen(
        [str(GPULEDGER), "ingest", "usage", *args],
        env=cli_env(settings, **env),
        cwd=settings.state_dir,  # no ./gpuledger.toml is found from here
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _STARTED.append(proc)
    return proc


def simulated_events(rate_per_s: float, duration_s: float, seed: int) -> pl.DataFrame:
    """Valid v1 events of a simulated fleet: columns key, value, tenant, end_ts."""
    fleet = default_fleet(nodes=2, gpus_per_node=4, tenants=4, seed=seed)
    result = simulate(
        fleet,
        SimulationConfig(start=SIM_START, duration_s=duration_s, seed=seed, rate_per_s=rate_per_s),
    )
    return event_payloads(result)


def fmt_ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def shift_ts(text: str, seconds: float) -> str:
    return fmt_ts(datetime.fromisoformat(text) + timedelta(seconds=seconds))


def mutate(payload: bytes, kind: str, settings: Settings) -> bytes:
    """A bad variant of a valid payload; `kind` names how it is bad."""
    event = orjson.loads(payload)
    data = event["data"]
    if kind == "truncated_json":
        return payload[: len(payload) // 2]
    if kind == "not_utf8":
        return b'{"specversion":"1.0","id":"\xff\xfe\xfa"}'
    if kind == "json_array":
        return orjson.dumps([event])
    if kind == "extra_field":
        event["billing_override"] = True
    elif kind == "missing_field":
        del data["hostname"]
    elif kind == "negative_tokens":
        data["prompt_tokens"] = -5
    elif kind == "absurd_tokens":
        data["prompt_tokens"] = settings.ingest.max_prompt_tokens + 1
    elif kind == "end_before_arrival":
        data["arrival_time"] = shift_ts(data["end_time"], 60)
        data["first_token_time"] = None
        data["completion_tokens"] = 0
    elif kind == "future_event_time":
        ahead = (datetime.now(UTC) - datetime.fromisoformat(event["time"])).total_seconds()
        ahead += 3 * 86_400  # three days after now
        event["time"] = shift_ts(event["time"], ahead)
        for name in ("arrival_time", "first_token_time", "end_time"):
            if data[name] is not None:
                data[name] = shift_ts(data[name], ahead)
    elif kind == "unknown_tenant":
        event["subject"] = "tenant-nobody-registered"
    else:
        raise AssertionError(kind)
    return orjson.dumps(event)


#: Bad inputs, with the reason the consumer must give them.
BAD_KINDS = {
    "truncated_json": "invalid_json",
    "not_utf8": "invalid_json",
    "json_array": "invalid_json",
    "extra_field": "schema_violation",
    "missing_field": "schema_violation",
    "negative_tokens": "negative_tokens",
    "absurd_tokens": "absurd_tokens",
    "end_before_arrival": "end_before_arrival",
}


def landing(settings: Settings) -> pl.DataFrame:
    """`raw.usage_landing`, in (partition, offset) order."""
    con = in_memory(settings)
    try:
        return con.sql('SELECT * FROM raw.usage_landing ORDER BY partition, "offset"').pl()
    finally:
        con.close()


def token_checksum(rows: Sequence[tuple[str, int, int]]) -> str:
    """Order-independent: sha256 over the sorted (event id, prompt, completion) rows."""
    digest = hashlib.sha256()
    for event_id, prompt, completion in sorted(rows):
        digest.update(f"{event_id}|{prompt}|{completion}\n".encode())
    return digest.hexdigest()


def produced_rows(values: Sequence[bytes]) -> list[tuple[str, int, int]]:
    rows = []
    for value in values:
        event = orjson.loads(value)
        rows.append(
            (event["id"], event["data"]["prompt_tokens"], event["data"]["completion_tokens"])
        )
    return rows


def landed_rows(frame: pl.DataFrame) -> list[tuple[str, int, int]]:
    valid = frame.filter(pl.col("quarantine_reason").is_null())
    return list(valid.select("event_id", "prompt_tokens", "completion_tokens").iter_rows())


def assert_exactly_once(frame: pl.DataFrame, produced: int) -> dict[int, int]:
    """Every record once: (partition, offset) unique and contiguous from 0 per partition."""
    assert frame.height == produced, f"landed {frame.height} rows, produced {produced}"
    assert frame.select("partition", "offset").is_duplicated().sum() == 0
    per_partition = {}
    for (partition,), part in frame.group_by(["partition"]):
        offsets = part["offset"].sort().to_list()
        assert offsets == list(range(len(offsets))), f"partition {partition}: gaps or not from 0"
        per_partition[int(partition)] = len(offsets)  # type: ignore[call-overload]
    return per_partition


def assert_file_chain(settings: Settings, topic: str) -> int:
    """Landing files per partition: named by their rows' offsets, each after the last."""
    lake = Lake(settings.lake_path)
    files = list(iter_landing_files(lake, topic))
    by_partition: dict[str, list[Path]] = {}
    for path in files:
        by_partition.setdefault(path.parent.name, []).append(path)
    for name, paths in by_partition.items():
        expected_first = 0
        for path in sorted(paths):
            first, last = (int(x) for x in path.stem.split("-"))
            assert first == expected_first, f"{name}/{path.name}: expected first {expected_first}"
            offsets = pl.read_parquet(path, columns=["offset"])["offset"].to_list()
            assert offsets == list(range(first, last + 1)), path
            expected_first = last + 1
        directory = paths[0].parent
        assert landed_next_offset(directory) == expected_first
    return len(files)


def temp_files(settings: Settings) -> list[Path]:
    return sorted(Lake(settings.lake_path).usage_landing.rglob(f"*{TMP_SUFFIX}"))


def group_committed(settings: Settings, topic: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=settings.ingest.consumer_group,
        enable_auto_commit=False,
    )
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        consumer.close(autocommit=False)


def reset_group_to_start(settings: Settings, topic: str) -> None:
    """What an operator's `--reset-offsets --to-earliest` does: commit 0 everywhere."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=settings.ingest.consumer_group,
        enable_auto_commit=False,
    )
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        consumer.commit({tp: OffsetAndMetadata(0, "", -1) for tp in tps})
    finally:
        consumer.close(autocommit=False)


def hours_of(frame: pl.DataFrame) -> tuple[datetime, datetime]:
    first = frame["end_ts"].min()
    last = frame["end_ts"].max()
    assert isinstance(first, datetime) and isinstance(last, datetime)
    start = first.replace(minute=0, second=0, microsecond=0)
    end = last.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return start, end


def consume_all(settings: Settings, **kwargs: Any) -> Any:
    return consume(settings, stop=StopWhen(idle_s=1.5), **kwargs)


# -- crash safety ----------------------------------------------------------------------


@dataclass
class KillLog:
    runs: int = 0
    killed: int = 0  # still running when the SIGKILL came
    exited: int = 0  # finished (or failed) before it
    aimed: int = 0  # killed on sight of a temporary landing file, not at random
    left_temp_files: int = 0  # killed mid-write: a temporary file left behind
    landed_after_kill: list[int] = field(default_factory=list)  # records in the lake
    files_after_kill: list[int] = field(default_factory=list)


class Trickle(threading.Thread):
    """A producer publishing chunk after chunk while consumers are being killed."""

    def __init__(
        self, settings: Settings, keys: list[bytes], values: list[bytes], chunk: int, pause_s: float
    ) -> None:
        super().__init__(name="trickle-producer", daemon=True)
        self.settings, self.keys, self.values = settings, keys, values
        self.chunk, self.pause_s = chunk, pause_s
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for begin in range(0, len(self.values), self.chunk):
                end = begin + self.chunk
                publish(self.settings, self.keys[begin:end], self.values[begin:end])
                time.sleep(self.pause_s)
        except BaseException as exc:  # reported by the test
            self.error = exc


def landed_records(settings: Settings, topic: str) -> tuple[int, int]:
    """(records, files) in the landing files, from their names alone."""
    files = list(iter_landing_files(Lake(settings.lake_path), topic))
    records = 0
    for path in files:
        first, last = (int(x) for x in path.stem.split("-"))
        records += last - first + 1
    return records, len(files)


def test_sigkill_at_random_moments_lands_every_record_exactly_once(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    """28 consumer processes SIGKILLed (21 at random moments, 7 the moment they write
    a file) while a producer keeps publishing, then one run to the end: every record
    landed once, nothing lost.

    A third of the events is on the topic before the first consumer starts; the rest
    arrives in chunks while consumers are killed, so that kills find consumers in the
    middle of batches and of file writes (a poll takes everything already on the topic
    at once, so a topic filled in advance is landed by the first run in a second).
    """
    topic = unique_topic("crash")
    settings = make_settings(
        local_stack, tmp_path / "state", topic, batch_max_records=500, batch_max_s=0.05
    )
    events = simulated_events(rate_per_s=17.0, duration_s=1800, seed=11)
    bad_base = events.tail(320)
    good = events.head(events.height - 320)
    kinds = list(BAD_KINDS)
    bad_keys = [f"bad-{i:04d}".encode() for i in range(bad_base.height)]
    bad_values = [
        mutate(v, kinds[i % len(kinds)], settings)
        for i, v in enumerate(bad_base["value"].to_list())
    ]
    # Interleave: a bad payload after every ~90 good ones.
    keys: list[bytes] = []
    values: list[bytes] = []
    good_keys, good_values = good["key"].to_list(), good["value"].to_list()
    step = len(good_values) // len(bad_values)
    for i, (bk, bv) in enumerate(zip(bad_keys, bad_values, strict=True)):
        keys += [*good_keys[i * step : (i + 1) * step], bk]
        values += [*good_values[i * step : (i + 1) * step], bv]
    keys += good_keys[len(bad_values) * step :]
    values += good_values[len(bad_values) * step :]
    assert len(values) == events.height
    upfront = len(values) // 3
    publish(settings, keys[:upfront], values[:upfront])
    trickle = Trickle(settings, keys[upfront:], values[upfront:], chunk=1000, pause_s=1.5)
    trickle.start()

    rng = random.Random(20261124)
    log = KillLog()
    landing_root = Lake(settings.lake_path).usage_landing
    for run in range(28):
        proc = start_consumer(settings, "--idle-s", "2")
        if run % 4 == 3:
            # Aimed: killed the moment a landing file is being written (a write takes
            # milliseconds, so random moments rarely find one).
            log.aimed += 1
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline and proc.poll() is None:
                if any(landing_root.glob(f"topic=*/partition=*/*{TMP_SUFFIX}")):
                    break
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.2, 2.5))
        log.runs += 1
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            log.killed += 1
        else:
            log.exited += 1
        _, err = proc.communicate(timeout=30)
        assert proc.returncode in (0, -signal.SIGKILL), err
        log.left_temp_files += bool(temp_files(settings))
        records, files = landed_records(settings, topic)
        log.landed_after_kill.append(records)
        log.files_after_kill.append(files)
    trickle.join(timeout=120)
    assert trickle.error is None, trickle.error
    assert not trickle.is_alive()
    final = start_consumer(settings, "--idle-s", "2")
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    summary = (
        f"{len(values)} records ({len(bad_values)} invalid); {log.runs} runs: "
        f"{log.killed} SIGKILLed ({log.aimed} aimed at a file write), {log.exited} exited "
        f"first, {log.left_temp_files} kills "
        f"left a temporary file; records landed after each kill: {log.landed_after_kill}; "
        f"landing files after each kill: {log.files_after_kill}; checksum of the valid "
        f"events' (id, prompt, completion): {token_checksum(produced_rows(good_values))}; "
        "final run: "
        f"{' '.join(out.split())}"
    )
    print(summary)

    frame = landing(settings)
    per_partition = assert_exactly_once(frame, len(values))
    assert len(per_partition) == PARTITIONS, summary
    files = assert_file_chain(settings, topic)
    assert temp_files(settings) == [], summary
    assert log.killed >= 20, summary
    assert log.left_temp_files >= 1, summary  # some kills hit a write, and were cleaned up
    # Kills landed mid-run: after most of them the lake held some but not all files.
    mid_run = sum(0 < n < files for n in log.files_after_kill)
    assert mid_run >= 10, summary

    # The valid events, checksummed over id and token counts.
    assert token_checksum(landed_rows(frame)) == token_checksum(produced_rows(good_values))
    valid = frame.filter(pl.col("quarantine_reason").is_null())
    assert valid.height == len(good_values)
    assert sorted(valid["key"].to_list()) == sorted(good_keys)
    # The invalid payloads: all quarantined, byte for byte, with the expected reason.
    quarantined = frame.filter(pl.col("quarantine_reason").is_not_null())
    assert quarantined.height == len(bad_values)
    got = {
        key: (payload, reason)
        for key, payload, reason in quarantined.select(
            "key", "payload", "quarantine_reason"
        ).iter_rows()
    }
    for i, (key, value) in enumerate(zip(bad_keys, bad_values, strict=True)):
        assert got[key] == (value, BAD_KINDS[kinds[i % len(kinds)]]), key


def test_a_batch_holds_at_most_batch_max_records(local_stack: RunningStack, tmp_path: Path) -> None:
    """Regression: a poll (up to 50 000 records, every partition's fetch) was once added
    whole before the size check, so a batch held whatever the broker returned."""
    topic = unique_topic("batchmax")
    settings = make_settings(local_stack, tmp_path / "state", topic, batch_max_records=500)
    events = simulated_events(rate_per_s=3.0, duration_s=1200, seed=13)
    publish(settings, events["key"].to_list(), events["value"].to_list())
    assert consume_all(settings).records == events.height
    # One batch: one validation, one `ingested_at`, one file per partition.
    batches = landing(settings).group_by("ingested_at").len()["len"].sort().to_list()
    assert max(batches) <= 500, f"{events.height} records in batches of {batches}"


# -- redelivery, re-runs, conflicts ----------------------------------------------------


def test_redelivered_events_land_twice_and_count_once(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    topic = unique_topic("redelivery")
    settings = make_settings(local_stack, tmp_path / "state", topic)
    events = simulated_events(rate_per_s=2.0, duration_s=1200, seed=3)
    keys, values = events["key"].to_list(), events["value"].to_list()
    n = len(values)
    publish(settings, keys, values)
    first = consume_all(settings)
    assert first.records == n
    # The advisory group offsets reached the landed positions...
    committed = group_committed(settings, topic)
    assert sum(o or 0 for o in committed.values()) == n, committed
    # ... and an operator resets them to the start while the producer redelivers.
    reset_group_to_start(settings, topic)
    assert group_committed(settings, topic) == dict.fromkeys(range(PARTITIONS), 0)
    publish(settings, keys, values)
    second = consume_all(settings)
    assert second.records == n  # only the new copies: positions come from the files

    frame = landing(settings)
    assert_exactly_once(frame, 2 * n)
    copies = frame.group_by("event_id").len()
    assert copies.height == n and copies["len"].to_list() == [2] * n

    start, end = hours_of(events)
    reports = materialize_usage_hours(settings, start, end)
    assert sum(r.events for r in reports) == n
    assert sum(r.duplicates for r in reports) == n
    assert sum(r.conflicts for r in reports) == 0
    con = in_memory(settings)
    try:
        kept = con.sql('SELECT event_id, partition, "offset" FROM raw.usage_events').pl()
        assert con.execute("SELECT count(*) FROM raw.usage_quarantine").fetchone() == (0,)
    finally:
        con.close()
    assert kept.height == n and kept["event_id"].n_unique() == n
    # The kept copy is the first one delivered (the smaller offset of the two).
    first_copies = frame.group_by("event_id").agg(pl.col("offset").min())
    joined = kept.join(first_copies, on="event_id", suffix="_first")
    assert (joined["offset"] == joined["offset_first"]).all()


def test_rerunning_the_consumer_and_the_hours_changes_nothing(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    topic = unique_topic("rerun")
    settings = make_settings(local_stack, tmp_path / "state", topic)
    events = simulated_events(rate_per_s=2.0, duration_s=1200, seed=4)
    publish(settings, events["key"].to_list(), events["value"].to_list())
    assert consume_all(settings).records == events.height
    lake = Lake(settings.lake_path)
    files_before = {p: p.stat().st_mtime_ns for p in iter_landing_files(lake, topic)}

    again = consume_all(settings)
    assert (again.records, again.files) == (0, 0)
    assert {p: p.stat().st_mtime_ns for p in iter_landing_files(lake, topic)} == files_before
    assert again.positions == {
        int(p.parent.name.split("=")[1]): landed_next_offset(p.parent) for p in files_before
    }

    start, end = hours_of(events)
    now = datetime(2026, 11, 24, 0, 0, tzinfo=UTC)
    first = materialize_usage_hours(settings, start, end, now=now)
    snapshot = {
        p: p.read_bytes() for p in sorted(lake.usage_topic_dir(topic).rglob("*")) if p.is_file()
    }
    second = materialize_usage_hours(settings, start, end, now=now)
    assert [(r.events, r.duplicates, r.quarantined) for r in first] == [
        (r.events, r.duplicates, r.quarantined) for r in second
    ]
    assert sum(r.events for r in second) == events.height
    after = {
        p: p.read_bytes() for p in sorted(lake.usage_topic_dir(topic).rglob("*")) if p.is_file()
    }
    assert list(after) == list(snapshot)
    assert {p.name for p in after} == {"events.parquet", "quarantine.parquet", "_manifest.json"}
    for path, content in snapshot.items():
        assert after[path] == content, f"{path} changed on rebuild"
    assert all(r.late_incorporated == 0 for r in second)


def test_a_conflicting_duplicate_is_quarantined_naming_the_kept_copy(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    topic = unique_topic("conflict")
    settings = make_settings(local_stack, tmp_path / "state", topic)
    events = simulated_events(rate_per_s=0.5, duration_s=600, seed=5)
    original = orjson.loads(events["value"][0])
    changed = orjson.loads(events["value"][0])
    changed["data"]["prompt_tokens"] += 100
    changed["data"]["completion_tokens"] += 7
    key = events["key"][0]
    first_bytes, second_bytes = orjson.dumps(original), orjson.dumps(changed)
    publish(settings, [key], [first_bytes])
    publish(settings, [key], [second_bytes])
    assert consume_all(settings).records == 2

    frame = landing(settings)
    kept_row = frame.filter(pl.col("payload") == first_bytes).row(0, named=True)
    other_row = frame.filter(pl.col("payload") == second_bytes).row(0, named=True)
    assert kept_row["quarantine_reason"] is None and other_row["quarantine_reason"] is None
    assert (kept_row["partition"], kept_row["offset"]) < (
        other_row["partition"],
        other_row["offset"],
    )

    hour = datetime.fromisoformat(original["time"]).replace(minute=0, second=0, microsecond=0)
    (report,) = materialize_usage_hours(settings, hour, hour + timedelta(hours=1))
    assert (report.events, report.duplicates, report.conflicts) == (1, 0, 1)
    con = in_memory(settings)
    try:
        kept = con.sql(
            'SELECT event_id, prompt_tokens, partition, "offset" FROM raw.usage_events'
        ).fetchall()
        quarantine = con.sql(
            'SELECT reason, detail, event_id, payload, partition, "offset", kept_partition, '
            "kept_offset FROM raw.usage_quarantine"
        ).fetchall()
    finally:
        con.close()
    assert kept == [
        (
            original["id"],
            original["data"]["prompt_tokens"],
            kept_row["partition"],
            kept_row["offset"],
        )
    ]
    assert len(quarantine) == 1
    reason, detail, event_id, payload, partition, offset, kept_p, kept_o = quarantine[0]
    assert (reason, event_id, payload) == ("conflicting_duplicate", original["id"], second_bytes)
    assert (partition, offset) == (other_row["partition"], other_row["offset"])
    assert (kept_p, kept_o) == (kept_row["partition"], kept_row["offset"])
    assert detail.endswith(f"at partition {kept_row['partition']} offset {kept_row['offset']}")


# -- quarantine ------------------------------------------------------------------------


def test_every_quarantine_reason_end_to_end_and_the_consumer_goes_on(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    topic = unique_topic("quarantine")
    settings = make_settings(local_stack, tmp_path / "state", topic, batch_max_records=50)
    events = simulated_events(rate_per_s=1.0, duration_s=1200, seed=6)
    register_tenants(settings, sorted(set(events["tenant"].to_list())))
    cases = {  # kind -> (reason, words the detail must contain)
        "truncated_json": ("invalid_json", ["not valid JSON"]),
        "not_utf8": ("invalid_json", ["not valid JSON"]),
        "json_array": ("invalid_json", ["JSON object"]),
        "extra_field": ("schema_violation", ["billing_override"]),
        "missing_field": ("schema_violation", ["data.hostname"]),
        "negative_tokens": ("negative_tokens", ["data.prompt_tokens"]),
        "absurd_tokens": ("absurd_tokens", ["prompt_tokens", "2000001"]),
        "end_before_arrival": ("end_before_arrival", ["end_time", "arrival_time"]),
        "future_event_time": ("future_event_time", ["time"]),
        "unknown_tenant": ("unknown_tenant", ["subject", "tenant-nobody-registered"]),
    }
    good = events.head(events.height - len(cases))
    bases = events.tail(len(cases))["value"].to_list()
    bad = {kind: mutate(base, kind, settings) for kind, base in zip(cases, bases, strict=True)}
    keys: list[bytes] = []
    values: list[bytes] = []
    good_keys, good_values = good["key"].to_list(), good["value"].to_list()
    step = len(good_values) // len(bad)
    for i, (kind, payload) in enumerate(bad.items()):
        keys += [*good_keys[i * step : (i + 1) * step], f"bad-{kind}".encode()]
        values += [*good_values[i * step : (i + 1) * step], payload]
    keys += good_keys[len(bad) * step :]
    values += good_values[len(bad) * step :]
    publish(settings, keys, values)

    report = consume_all(settings)
    assert (report.records, report.quarantined) == (len(values), len(bad))
    frame = landing(settings)
    assert_exactly_once(frame, len(values))
    for kind, (reason, words) in cases.items():
        rows = frame.filter(pl.col("key") == f"bad-{kind}".encode())
        assert rows.height == 1, kind
        row = rows.row(0, named=True)
        assert row["quarantine_reason"] == reason, (kind, row["quarantine_detail"])
        assert row["payload"] == bad[kind], kind
        for word in words:
            assert word in row["quarantine_detail"], (kind, row["quarantine_detail"])
    valid = frame.filter(pl.col("quarantine_reason").is_null())
    assert sorted(valid["key"].to_list()) == sorted(good_keys)
    assert token_checksum(landed_rows(frame)) == token_checksum(produced_rows(good_values))
    # Valid events after every bad one, in its partition: the consumer did not stop there.
    for kind in cases:
        row = frame.filter(pl.col("key") == f"bad-{kind}".encode()).row(0, named=True)
        after = frame.filter(
            (pl.col("partition") == row["partition"]) & (pl.col("offset") > row["offset"])
        )
        assert after["quarantine_reason"].null_count() > 0, kind

    # The hourly build carries them into raw.usage_quarantine, by event time where there
    # is one, else by Kafka timestamp (invalid JSON, future times: the current hour).
    start, end = hours_of(events)
    materialize_usage_hours(settings, start, end)
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    hour = timedelta(hours=1)
    materialize_usage_hours(settings, this_hour - hour, this_hour + 2 * hour)
    con = in_memory(settings)
    try:
        hourly = set(con.execute("SELECT payload, reason FROM raw.usage_quarantine").fetchall())
        events_count = con.execute("SELECT count(*) FROM raw.usage_events").fetchone()
    finally:
        con.close()
    assert hourly == {(bad[kind], reason) for kind, (reason, _) in cases.items()}
    assert events_count == (len(good_values),)


# -- late events -----------------------------------------------------------------------


def test_a_late_event_is_reported_and_incorporated_on_rebuild(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    topic = unique_topic("late")
    settings = make_settings(local_stack, tmp_path / "state", topic)
    events = simulated_events(rate_per_s=1.0, duration_s=1200, seed=8)
    publish(settings, events["key"].to_list(), events["value"].to_list())
    consume_all(settings)
    hour = SIM_START
    (built,) = materialize_usage_hours(settings, hour, hour + timedelta(hours=1))
    in_hour = events.filter(pl.col("end_ts") < hour + timedelta(hours=1)).height
    assert (built.events, built.late_incorporated) == (in_hour, 0)
    assert late_events(settings).height == 0

    late = orjson.loads(events["value"][0])
    late["id"] = f"late-{uuid.uuid4()}"
    late["data"]["prompt_tokens"] = 1234
    publish(settings, [late["id"].encode()], [orjson.dumps(late)])
    assert consume_all(settings).records == 1

    reported = late_events(settings)
    assert reported.rows() == [(hour, 1)]
    (rebuilt,) = materialize_usage_hours(settings, hour, hour + timedelta(hours=1))
    assert (rebuilt.events, rebuilt.late_incorporated) == (in_hour + 1, 1)
    assert rebuilt.prompt_tokens == built.prompt_tokens + 1234
    assert late_events(settings).filter(pl.col("hour_start") == hour).height == 0


def test_hour_builds_read_partition_numbers_not_directory_names(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    """Regression: landing files live under partition=00001/; DuckDB's hive detection
    once turned `partition` into the string '00001', so every event of a rebuilt hour
    counted as late and conflict details said 'partition 00001'."""
    topic = unique_topic("hourbuild")
    settings = make_settings(local_stack, tmp_path / "state", topic)
    events = simulated_events(rate_per_s=0.5, duration_s=1200, seed=14)
    conflicting = orjson.loads(events["value"][0])
    conflicting["data"]["prompt_tokens"] += 1
    publish(settings, events["key"].to_list(), events["value"].to_list())
    publish(settings, [events["key"][0]], [orjson.dumps(conflicting)])
    consume_all(settings)
    hour = SIM_START
    now = datetime(2026, 11, 24, tzinfo=UTC)
    lake = Lake(settings.lake_path)
    manifest_path = lake.usage_hour_dir(topic, hour) / "_manifest.json"
    (built,) = materialize_usage_hours(settings, hour, hour + timedelta(hours=1), now=now)
    manifest = manifest_path.read_bytes()
    problems = []
    # Rebuilt with nothing new: nothing late, the manifest unchanged.
    (again,) = materialize_usage_hours(settings, hour, hour + timedelta(hours=1), now=now)
    if again.late_incorporated != 0:
        problems.append(f"no-op rebuild: late_incorporated {again.late_incorporated}, not 0")
    if manifest_path.read_bytes() != manifest:
        problems.append("no-op rebuild changed _manifest.json")
    # One late event: exactly one incorporated.
    late = orjson.loads(events["value"][1])
    late["id"] = f"late-{uuid.uuid4()}"
    publish(settings, [late["id"].encode()], [orjson.dumps(late)])
    consume_all(settings)
    (rebuilt,) = materialize_usage_hours(settings, hour, hour + timedelta(hours=1), now=now)
    if (rebuilt.events, rebuilt.late_incorporated) != (built.events + 1, 1):
        problems.append(
            f"late rebuild: {rebuilt.events} events, late_incorporated "
            f"{rebuilt.late_incorporated}; expected {built.events + 1} and 1"
        )
    # The conflict's detail names the kept copy's partition as a number.
    frame = landing(settings)
    kept = frame.filter(pl.col("payload") == events["value"][0]).row(0, named=True)
    con = in_memory(settings)
    try:
        row = con.execute(
            "SELECT detail FROM raw.usage_quarantine WHERE reason = 'conflicting_duplicate'"
        ).fetchone()
    finally:
        con.close()
    assert row is not None
    expected = f"at partition {kept['partition']} offset {kept['offset']}"
    if not row[0].endswith(expected):
        problems.append(f"conflict detail {row[0]!r} does not end with {expected!r}")
    assert not problems, problems


# -- scale-out -------------------------------------------------------------------------


def landed_count(out: str) -> int:
    """The record count of `gpuledger ingest usage`'s summary line."""
    match = re.search(r"([0-9][0-9,]*) records from ", " ".join(out.split()))
    assert match, out
    return int(match.group(1).replace(",", ""))


def _consumers_of(frame: pl.DataFrame) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for consumer, partition in frame.select("consumer", "partition").unique().iter_rows():
        out.setdefault(consumer, set()).add(partition)
    return out


def test_two_consumers_on_disjoint_partitions_land_everything_once(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    topic = unique_topic("scaleout")
    settings = make_settings(local_stack, tmp_path / "state", topic, batch_max_records=1000)
    events = simulated_events(rate_per_s=5.0, duration_s=1200, seed=9)
    publish(settings, events["key"].to_list(), events["value"].to_list())
    low = start_consumer(settings, "--partitions", "0-1", "--idle-s", "2")
    high = start_consumer(settings, "--partitions", "2-3", "--idle-s", "2")
    low_out, low_err = low.communicate(timeout=120)
    high_out, high_err = high.communicate(timeout=120)
    assert low.returncode == 0, low_err
    assert high.returncode == 0, high_err

    frame = landing(settings)
    assert_exactly_once(frame, events.height)
    owners = _consumers_of(frame)
    by_pid = {int(c.rsplit(":", 1)[1]): ps for c, ps in owners.items()}
    assert by_pid == {low.pid: {0, 1}, high.pid: {2, 3}}, owners
    assert "partitions 0,1" in low_out and "partitions 2,3" in high_out
    assert token_checksum(landed_rows(frame)) == token_checksum(
        produced_rows(events["value"].to_list())
    )


def test_two_consumers_on_the_same_partitions_never_land_a_record_twice(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    topic = unique_topic("samepartitions")
    settings = make_settings(local_stack, tmp_path / "state", topic, batch_max_records=1000)
    events = simulated_events(rate_per_s=5.0, duration_s=1200, seed=10)
    publish(settings, events["key"].to_list(), events["value"].to_list())
    # Default lock timeout: the second waits for the first, then finds nothing left.
    a = start_consumer(settings, "--idle-s", "2")
    b = start_consumer(settings, "--idle-s", "2")
    a_out, a_err = a.communicate(timeout=120)
    b_out, b_err = b.communicate(timeout=120)
    assert (a.returncode, b.returncode) == (0, 0), (a_err, b_err)
    frame = landing(settings)
    assert_exactly_once(frame, events.height)
    assert len(_consumers_of(frame)) == 1, _consumers_of(frame)  # one did all the work
    assert sorted([landed_count(a_out), landed_count(b_out)]) == [0, events.height]

    # With a short lock timeout the second fails in one line instead of waiting.
    more = simulated_events(rate_per_s=1.0, duration_s=300, seed=12)
    holder = start_consumer(settings, "--follow")
    publish(settings, more["key"].to_list(), more["value"].to_list())
    deadline = time.monotonic() + 30
    # Once it lands the new events, the holder owns every partition's lock.
    while landing(settings).height < events.height + more.height:
        assert time.monotonic() < deadline, "the --follow consumer landed nothing"
        assert holder.poll() is None, holder.communicate()
        time.sleep(0.2)
    try:
        late = subprocess.run(
            [str(GPULEDGER), "ingest", "usage", "--idle-s", "2"],
            env=cli_env(settings, GPULEDGER_INGEST__LOCK_TIMEOUT_S="1"),
            cwd=settings.state_dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.send_signal(signal.SIGTERM)
        holder_out, holder_err = holder.communicate(timeout=60)
    assert late.returncode == 3, late.stderr
    lines = late.stderr.strip().splitlines()
    assert len(lines) == 1, late.stderr
    print(lines[0])
    assert lines[0].startswith("gpuledger: error: partition ")
    assert "being consumed by another process" in lines[0]
    assert "Traceback" not in late.stderr
    assert holder.returncode == 0, holder_err  # SIGTERM: a graceful stop
    assert "stop requested" in holder_out
    assert_exactly_once(landing(settings), events.height + more.height)


def test_topic_is_created_with_the_configured_partitions(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    """Guard for the tests above: a fresh topic has PARTITIONS partitions."""
    topic = unique_topic("partitions")
    settings = make_settings(local_stack, tmp_path / "state", topic)
    ensure_topic(settings, topic)
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    try:
        assert consumer.partitions_for_topic(topic) == set(range(PARTITIONS))
    finally:
        consumer.close()


def test_a_recreated_topic_is_refused_not_read_on_from_the_old_offsets(
    local_stack: RunningStack, tmp_path: Path
) -> None:
    """Guards against silently skipping a new topic's first events: after the local
    stack's in-memory Kafka restarted, the lake's landed offsets (from the old topic of
    the same name) made ingest start mid-way in the new one, and 110 of 126 live-demo
    events never reached the lake."""
    from kafka import KafkaAdminClient

    from ingest.endpoints import kafka_client_options
    from ingest.usage_consumer import TOPIC_ID_FILE, set_aside_landing_of_a_replaced_topic
    from models.errors import ServiceError

    topic = unique_topic("recreated")
    settings = make_settings(local_stack, tmp_path / "state", topic)
    first = simulated_events(rate_per_s=1.0, duration_s=600, seed=11)
    publish(settings, first["key"].to_list(), first["value"].to_list())
    assert consume_all(settings).records == first.height
    lake = Lake(settings.lake_path)
    landed_id = (lake.usage_landing / f"topic={topic}" / TOPIC_ID_FILE).read_text().strip()
    assert set_aside_landing_of_a_replaced_topic(settings, topic) is None  # same topic

    admin = KafkaAdminClient(**kafka_client_options(settings))
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()
    second = simulated_events(rate_per_s=1.0, duration_s=300, seed=12)
    assert second.height < first.height  # all of them below the old landed offsets
    publish(settings, second["key"].to_list(), second["value"].to_list())

    with pytest.raises(ServiceError, match=rf"topic '{re.escape(topic)}' is not the one") as err:
        consume_all(settings)
    assert landed_id in str(err.value) and "Nothing was ingested" in str(err.value)

    moved = set_aside_landing_of_a_replaced_topic(settings, topic)
    assert moved is not None and moved.name == f"id={landed_id}"
    assert consume_all(settings).records == second.height
    frame = pl.read_parquet(list(iter_landing_files(lake, topic)))
    assert sorted(landed_rows(frame)) == sorted(produced_rows(second["value"].to_list()))
