"""The metering gateway end to end: a real Triton server (the demo LLM on the CPU), the
gateway, a real Tansu broker and Prometheus, and the real Dagster pipeline.

- three tenants' keys send N requests (completions and chat, streamed or not): N usage
  events with the right tenants, token counts and GPUs; the pipeline ingests, allocates
  measured (simulated-DCGM) energy to them, drafts invoices that bill exactly those
  tokens, and reconciles them against Triton's own counters;
- a deliberately dropped batch of events is flagged by the reconciliation;
- security: no key, a wrong or revoked key → 401 and no event; a tenant named in the
  body is not billed; keys appear in no log, spool, key file or event; over the key's
  limit → 429 and no event;
- the broker stopped mid-load and restarted: every event reaches the lake exactly once.

The module runs its own local stack (its Kafka is stopped and restarted by a test).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingest.catalog import in_memory
from ingest.gateway.keys_file import add_key, revoke_key
from ingest.kafka_readback import read_topic
from ingest.load import LoadReport, plan_from_trace, prompt_of, run_load
from ingest.settings import Settings
from ingest.stack import LocalStack
from ingest.stack.process import find_free_port, wait_until
from ingest.triton.venv import triton_venv_dir
from ingest.usage_publisher import publish
from models.demo_tokenizer import count_tokens
from pipelines.live_fleet import DEMO_MODEL, LiveFleet, live_fleet, live_rate_card_text
from pipelines.materialize import (
    PipelineRunResult,
    materialize_allocation,
    materialize_assurance,
    materialize_ingest,
)
from pipelines.materialize_billing import materialize_invoices
from tests.conftest import TEST_SCRAPE_INTERVAL_S, build_settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(420),
    pytest.mark.skipif(
        not (triton_venv_dir() / "bin" / "python").exists(),
        reason="Triton's venv is missing: run `make triton-deps` (make test does)",
    ),
]

N_REQUESTS = 45
DROPPED = 10
#: Fast pace: 2 ms per output token, 0.05 ms per prompt token.
PACE = {"decode_s_per_token": 0.002, "prefill_s_per_token": 0.00005}


def _clear_of_hour_end(needed_s: float = 45.0) -> None:
    """Start after the hour turns when it would turn within `needed_s`: each hour of the
    pipeline is checked on its own, and Triton's counter for a request finishing in the
    last scrape of an hour lands in the next."""
    now = datetime.now(UTC)
    next_hour = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    if (next_hour - now).total_seconds() < needed_s:
        time.sleep((next_hour - now).total_seconds() + 1)


def _window(events: list[dict[str, Any]]) -> tuple[datetime, datetime]:
    times = [datetime.fromisoformat(e["time"]) for e in events]
    start = min(times).replace(minute=0, second=0, microsecond=0)
    end = max(times).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return start, end


def _events(settings: Settings, topic: str | None = None) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in read_topic(settings, topic, poll_timeout_s=10)]


def _with(settings: Settings, **kafka: Any) -> Settings:
    return settings.model_copy(update={"kafka": settings.kafka.model_copy(update=kafka)})


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    state = tmp_path_factory.mktemp("gateway") / "state"
    settings = build_settings(
        state,
        # A fixed Kafka port, so the restarted broker is found where the gateway looks.
        stack={"scrape_interval_s": TEST_SCRAPE_INTERVAL_S, "kafka_port": find_free_port()},
        kafka={"topic": "gpuledger.usage.v1", "topic_partitions": 2},
        telemetry={"retries": 1, "backoff_s": 0.01},
    )
    stack = LocalStack(settings)
    try:
        stack.up()
        yield settings
    finally:
        stack.down()


@dataclass
class MeteredRun:
    settings: Settings
    fleet_server: str
    gpu_uuids: list[str]
    report: LoadReport
    events: list[dict[str, Any]]
    ingest: PipelineRunResult
    allocation: PipelineRunResult
    invoices: PipelineRunResult
    assurance: PipelineRunResult
    dropped_assurance: PipelineRunResult
    dropped_ids: set[str]


@pytest.fixture(scope="module")
def metered(module_stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> MeteredRun:
    """N requests from three tenants through the gateway, then the hourly pipeline (a
    provisional run of the hour in progress) and the month's draft invoices."""
    settings = module_stack
    _clear_of_hour_end()
    work = tmp_path_factory.mktemp("metered")
    with live_fleet(settings, work, **PACE) as fleet:
        fleet.wait_scraped()  # telemetry covers the GPU before the first request
        plan = plan_from_trace(
            list(fleet.keys), duration_s=600, speed=40, token_scale=0.02, max_requests=N_REQUESTS
        )
        report = run_load(fleet.gateway_url, plan, fleet.keys, model=DEMO_MODEL)
        fleet.drain()
        fleet.wait_scraped()  # ... and after the last one, as do Triton's counters
        settings = fleet.settings
        server, gpu_uuids = fleet.server.server_name, list(fleet.server.gpu_uuids)
    events = _events(settings)
    start, end = _window(events)
    settings.rate_card_path.write_text(live_rate_card_text())
    ingest = materialize_ingest(settings, start, end, provisional=True)
    allocation = materialize_allocation(settings, start, end, provisional=True)
    invoices = materialize_invoices(settings, f"{start:%Y-%m}", efficiency=False)
    assurance = materialize_assurance(settings, start, end, provisional=True)

    # The same traffic with a batch of events lost between the gateway and the lake:
    # re-published without them to a topic of its own, ingested into a lake of its own.
    dropped = events[5 : 5 + DROPPED]
    kept = [e for e in events if e not in dropped]
    lossy = build_settings(
        work / "lossy",
        kafka={
            "bootstrap_servers": LocalStack(settings).kafka_bootstrap(),
            "topic": f"gpuledger.usage.v1.lossy-{uuid.uuid4().hex[:8]}",
        },
        prometheus={"url": LocalStack(settings).prometheus_url()},
    )
    publish(lossy, [e["id"].encode() for e in kept], [json.dumps(e).encode() for e in kept])
    lossy_ingest = materialize_ingest(lossy, start, end, provisional=True)
    assert lossy_ingest.success
    dropped_assurance = materialize_assurance(lossy, start, end, provisional=True)
    return MeteredRun(
        settings,
        server,
        gpu_uuids,
        report,
        events,
        ingest,
        allocation,
        invoices,
        assurance,
        dropped_assurance,
        {e["id"] for e in dropped},
    )


def test_requests_from_three_tenants_become_one_event_each(metered: MeteredRun) -> None:
    report, events = metered.report, metered.events
    assert len(report.results) == N_REQUESTS
    assert [r for r in report.results if r.status_code != 200 or r.error] == []
    # Every kind of request was exercised.
    kinds = Counter((r.planned.stream, r.planned.chat) for r in report.results)
    assert len(kinds) == 4, kinds
    assert len({r.planned.tenant for r in report.results}) == 3

    by_id = {e["id"]: e for e in events}
    assert len(events) == N_REQUESTS == len(by_id)
    assert set(by_id) == {r.request_id for r in report.results}
    for result in report.results:
        event = by_id[result.request_id]
        data = event["data"]
        assert event["subject"] == result.planned.tenant
        assert event["source"] == f"triton://{metered.fleet_server}/v2/models/{DEMO_MODEL}"
        assert data["status"] == "ok"
        assert data["gpu_uuids"] == metered.gpu_uuids
        # What the client was told is what is billed ...
        assert (data["prompt_tokens"], data["completion_tokens"]) == (
            result.prompt_tokens,
            result.completion_tokens,
        )
        # ... and it is what the model processed: all requested tokens, and the prompt
        # as the model's tokenizer counts it (chat adds the template's tokens).
        assert data["completion_tokens"] == result.planned.max_tokens
        if not result.planned.chat:
            assert data["prompt_tokens"] == result.planned.prompt_tokens
        else:
            assert data["prompt_tokens"] > result.planned.prompt_tokens
        arrival, first, end = (
            datetime.fromisoformat(data[k])
            for k in ("arrival_time", "first_token_time", "end_time")
        )
        assert arrival <= first <= end


def test_the_pipeline_allocates_and_bills_the_metered_tokens(metered: MeteredRun) -> None:
    assert metered.ingest.success and metered.allocation.success and metered.invoices.success
    failed = [c for c in metered.allocation.checks if not c.passed]
    assert failed == [], failed
    expected: dict[str, list[int]] = {}
    for e in metered.events:
        row = expected.setdefault(e["subject"], [0, 0, 0])
        row[0] += 1
        row[1] += e["data"]["prompt_tokens"]
        row[2] += e["data"]["completion_tokens"]
    con = in_memory(metered.settings)
    lake = {
        tenant: [n, p, c]
        for tenant, n, p, c in con.sql(
            "SELECT tenant, count(*), sum(prompt_tokens), sum(completion_tokens) "
            "FROM raw.usage_events WHERE topic = $topic GROUP BY tenant",
            params={"topic": metered.settings.kafka.topic},
        ).fetchall()
    }
    assert lake == expected
    invoices = metered.settings.invoices_path / "draft"
    period = datetime.fromisoformat(metered.events[0]["time"]).strftime("%Y-%m")
    for tenant, (requests, prompt, completion) in expected.items():
        document = json.loads((invoices / period / tenant / "invoice.json").read_text())
        usage = [u for u in document["usage"] if u["model"] == DEMO_MODEL]
        assert sum(u["requests"] for u in usage) == requests
        assert sum(u["prompt_tokens"] for u in usage) == prompt
        assert sum(u["completion_tokens"] for u in usage) == completion
        lines = [ln for ln in document["lines"] if ln["model"] == DEMO_MODEL]
        billed = Counter()
        for line in lines:
            billed[line["token_class"]] += int(line["quantity"])
        assert billed["prompt"] == prompt and billed["completion"] == completion
        # The measured energy of the GPU reached the tenant's requests.
        assert sum(float(u["energy_kwh"]) for u in usage) > 0, (tenant, usage)


def test_reconciliation_matches_triton_counters(metered: MeteredRun) -> None:
    run = metered.assurance
    assert run.success
    [check] = [c for c in run.checks if c.name == "triton_counts_match"]
    assert check.passed, check.description
    totals = [m for m in run.materializations["triton_reconciliation"].values()]
    assert sum(m["events"] for m in totals) == N_REQUESTS
    assert sum(m["triton_requests"] for m in totals) == N_REQUESTS


def test_reconciliation_flags_a_dropped_batch(metered: MeteredRun) -> None:
    run = metered.dropped_assurance
    [check] = [c for c in run.checks if c.name == "triton_counts_match"]
    assert not check.passed
    assert check.severity == "ERROR"
    assert metered.fleet_server in (check.description or "")
    totals = [m for m in run.materializations["triton_reconciliation"].values()]
    assert sum(m["events"] for m in totals) == N_REQUESTS - DROPPED
    assert sum(m["triton_requests"] for m in totals) == N_REQUESTS
    assert sum(m["difference"] for m in totals) == -DROPPED


# -- security ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(
    module_stack: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveFleet]:
    """One fleet for the security tests, with its own topic; `mallory`'s key is the one
    the revocation test revokes."""
    settings = _with(module_stack, topic=f"gpuledger.usage.v1.sec-{uuid.uuid4().hex[:8]}")
    work = tmp_path_factory.mktemp("secured")
    tenants = ["acme", "globex", "initech", "mallory"]
    with live_fleet(settings, work, tenants=tenants, register=False, **PACE) as fleet:
        yield fleet


def _complete(fleet: LiveFleet, headers: dict[str, str], **body: Any) -> httpx.Response:
    payload = {"model": DEMO_MODEL, "prompt": "data flow gpu", "max_tokens": 3, **body}
    return httpx.post(
        f"{fleet.gateway_url}/v1/completions", json=payload, headers=headers, timeout=30
    )


def test_missing_wrong_or_revoked_keys_get_401_and_no_event(secured: LiveFleet) -> None:
    fleet = secured
    fleet.drain()
    before = len(_events(fleet.settings))
    key = fleet.keys["mallory"]
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    attempts = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Bearer {forged}"},
        {"Authorization": f"Basic {key}"},
        {"X-Api-Key": key},
    ]
    for headers in attempts:
        response = _complete(fleet, headers)
        assert response.status_code == 401, (headers.keys(), response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert _complete(fleet, {"Authorization": f"Bearer {key}"}).status_code == 200
    revoke_key(fleet.settings.api_keys_path, key.split("_")[1], datetime.now(UTC))
    response = _complete(fleet, {"Authorization": f"Bearer {key}"})
    assert response.status_code == 401
    fleet.drain()
    # Only the one request made before the revocation was billed.
    assert len(_events(fleet.settings)) == before + 1


def test_a_tenant_named_in_the_body_is_never_billed(secured: LiveFleet) -> None:
    fleet = secured
    headers = {"Authorization": f"Bearer {fleet.keys['acme']}", "X-Tenant": "globex"}
    response = _complete(
        fleet,
        headers,
        user="globex",
        tenant="globex",
        subject="globex",
        metadata={"tenant": "globex"},
    )
    assert response.status_code == 200, response.text
    request_id = response.json()["id"].split("-", 1)[1]
    fleet.drain()
    [event] = [e for e in _events(fleet.settings) if e["id"] == request_id]
    assert event["subject"] == "acme"


def test_a_triton_failure_mid_stream_bills_the_tokens_produced(secured: LiveFleet) -> None:
    fleet = secured
    headers = {
        "Authorization": f"Bearer {fleet.keys['globex']}",
        # The demo model's test hook: fail after 4 tokens.
        "X-Gpuledger-Triton-Param-Fail-After-Tokens": "4",
    }
    response = _complete(fleet, headers, max_tokens=20)
    assert response.status_code == 502, response.text
    request_id = response.headers["X-Request-Id"]
    fleet.drain()
    [event] = [e for e in _events(fleet.settings) if e["id"] == request_id]
    assert event["subject"] == "globex"
    assert event["data"]["status"] == "error"
    assert event["data"]["completion_tokens"] == 4
    assert event["data"]["prompt_tokens"] == count_tokens("data flow gpu")


def test_a_client_leaving_mid_stream_bills_the_tokens_produced(secured: LiveFleet) -> None:
    fleet = secured
    body = {"model": DEMO_MODEL, "prompt": "data flow", "max_tokens": 400, "stream": True}
    headers = {"Authorization": f"Bearer {fleet.keys['initech']}"}
    chunks = 0
    with httpx.stream(
        "POST", f"{fleet.gateway_url}/v1/completions", json=body, headers=headers, timeout=30
    ) as response:
        request_id = response.headers["X-Request-Id"]
        for line in response.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 5:
                break  # the client goes away, 5 tokens in
    fleet.drain()
    assert wait_until(
        lambda: any(e["id"] == request_id for e in _events(fleet.settings)), timeout_s=30
    )
    [event] = [e for e in _events(fleet.settings) if e["id"] == request_id]
    assert event["data"]["status"] == "cancelled"
    # What Triton produced before the cancellation reached it: at least what the client
    # read, far from the 400 asked for (2 ms a token).
    assert 5 <= event["data"]["completion_tokens"] < 400


def test_over_the_limit_gets_429_and_no_event(secured: LiveFleet) -> None:
    fleet = secured
    # A key added while the gateway runs: it re-reads the key file.
    key, _ = add_key(
        fleet.settings.api_keys_path, "umbrella", datetime.now(UTC), rate_per_s=0.01, burst=3
    )
    fleet.drain()
    before = len(_events(fleet.settings))
    codes = [_complete(fleet, {"Authorization": f"Bearer {key}"}).status_code for _ in range(3)]
    limited = _complete(fleet, {"Authorization": f"Bearer {key}"})
    fleet.drain()
    events = _events(fleet.settings)
    assert codes == [200] * 3  # the burst goes through, then the limit answers
    assert limited.status_code == 429
    assert float(limited.headers["Retry-After"]) > 0
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert len(events) == before + 3
    assert [e["subject"] for e in events].count("umbrella") == 3


def test_keys_are_never_logged_or_stored(
    module_stack: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _with(module_stack, topic=f"gpuledger.usage.v1.log-{uuid.uuid4().hex[:8]}")
    caplog.set_level(logging.DEBUG)
    with live_fleet(settings, tmp_path, register=False, **PACE) as fleet:
        secrets = list(fleet.keys.values())
        for i, key in enumerate(secrets):
            # A key sent where it does not belong (another's, in the body), and a near
            # miss, are not logged or stored either.
            other = secrets[(i + 1) % len(secrets)]
            ok = _complete(fleet, {"Authorization": f"Bearer {key}"}, user=other)
            assert ok.status_code == 200
            near_miss = key[:-1] + ("X" if not key.endswith("X") else "Y")
            assert _complete(fleet, {"Authorization": f"Bearer {near_miss}"}).status_code == 401
        fleet.drain()
        events = _events(fleet.settings)
        triton_log = fleet.triton.log_path.read_text(errors="replace")
    assert len(events) == len(secrets)  # the near misses are 401s
    stored = [
        p.read_bytes()
        for p in settings.state_dir.rglob("*")
        if p.is_file() and "stack" not in p.parts
    ]
    assert stored, "nothing written under the state directory"
    for key in secrets:
        secret = key.split("_", 2)[2]  # the secret may itself hold underscores
        assert secret not in caplog.text
        assert secret not in triton_log
        assert all(secret.encode() not in blob for blob in stored)
        assert all(secret not in json.dumps(e) for e in events)


# -- Kafka outage -------------------------------------------------------------------


class _Collector(threading.Thread):
    """Reads the whole topic every few hundred ms, across a broker restart.

    The local broker keeps records in memory only: after its restart the topic starts
    empty again (the gateway's forwarder re-creates it). So the collector keeps every
    generation of the topic: when a read no longer holds a record the previous read
    held at the same partition and offset, the broker lost them, and what was read
    before is kept as an earlier generation.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.archived: list[bytes] = []
        self.current: dict[tuple[int, int], bytes] = {}
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.reads: list[int] = []

    @property
    def records(self) -> list[bytes]:
        with self.lock:
            return self.archived + [self.current[k] for k in sorted(self.current)]

    def run(self) -> None:
        while not self.stop_event.wait(0.3):
            try:
                read = {
                    (r.partition, r.offset): r.value
                    for r in read_topic(self.settings, poll_timeout_s=5)
                }
            except Exception as exc:  # the broker is down: try again
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            self.reads.append(len(read))
            with self.lock:
                if any(read.get(k) != v for k, v in self.current.items()):
                    self.archived += [self.current[k] for k in sorted(self.current)]
                self.current = read


def test_kafka_outage_mid_load_loses_nothing_and_bills_each_event_once(
    module_stack: Settings, tmp_path: Path
) -> None:
    topic = f"gpuledger.usage.v1.outage-{uuid.uuid4().hex[:8]}"
    # A short Kafka timeout: the forwarder notices the outage in seconds, not 30 s.
    settings = _with(module_stack, topic=topic, request_timeout_s=2.0)
    stack = LocalStack(module_stack)
    port = settings.stack.kafka_port
    assert port is not None
    with live_fleet(settings, tmp_path / "fleet", register=False, **PACE) as fleet:
        # The topic exists before the collector subscribes.
        _complete(fleet, {"Authorization": f"Bearer {fleet.keys['acme']}"})
        fleet.drain()
        collector = _Collector(fleet.settings)
        collector.start()
        plan = plan_from_trace(
            list(fleet.keys), duration_s=600, speed=2, token_scale=0.01, max_requests=45
        )
        results: list[LoadReport] = []
        load = threading.Thread(
            target=lambda: results.append(
                run_load(fleet.gateway_url, plan, fleet.keys, model=DEMO_MODEL)
            )
        )
        load.start()
        counters = fleet.gateway.forwarder.counters
        # Mid-load: some events delivered, more to come. The local broker keeps records
        # in memory only, so the collector reads all it holds before it is stopped: the
        # forwarder holds new events in the spool only for that moment.
        forwarder = fleet.gateway.forwarder
        assert wait_until(lambda: counters()["forwarded"] >= 10, timeout_s=60)
        forwarder.pause()
        delivered = counters()["forwarded"]
        assert wait_until(lambda: len(collector.records) >= delivered, timeout_s=30)
        assert not results, "the load ended before the outage began"
        stack.kafka.stop()
        forwarder.resume()
        assert wait_until(lambda: not counters()["kafka_up"], timeout_s=60)
        load.join(timeout=300)
        [report] = results
        # The gateway kept serving while Kafka was down; the spool held the usage.
        assert [r for r in report.results if r.status_code != 200 or r.error] == []
        held = fleet.gateway.forwarder.counters()["pending"]
        assert held > 0
        stack.kafka.start(port)
        fleet.drain(timeout_s=120)
        expected = {r.request_id for r in report.results}
        assert wait_until(
            lambda: expected <= {json.loads(v)["id"] for v in collector.records}, timeout_s=60
        ), (
            f"{len(expected - {json.loads(v)['id'] for v in collector.records})} of "
            f"{len(expected)} events never seen; collected {len(collector.records)} records, "
            f"{len(collector.archived)} archived, forwarder {counters()}, "
            f"reads {collector.reads}, errors {collector.errors[:3]}"
        )
        collector.stop_event.set()
        collector.join(timeout=30)
    wire = [json.loads(v) for v in collector.records]
    ids = Counter(e["id"] for e in wire)
    assert expected <= set(ids)
    # At least once on the wire (a batch in flight when the broker died is resent) ...
    resent = sum(n - 1 for n in ids.values())
    assert resent <= fleet.settings.gateway.forward_batch
    # ... exactly once in the lake: the records as they arrived, ingested for billing.
    lake_settings = build_settings(
        tmp_path / "lake",
        kafka={
            "bootstrap_servers": stack.kafka_bootstrap(),
            "topic": f"{topic}-replayed",
        },
        prometheus={"url": stack.prometheus_url()},
    )
    publish(lake_settings, [e["id"].encode() for e in wire], [json.dumps(e).encode() for e in wire])
    start, end = _window(wire)
    run = materialize_ingest(lake_settings, start, end, provisional=True)
    assert run.success
    con = in_memory(lake_settings)
    rows = con.sql("SELECT event_id FROM raw.usage_events").fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert len(rows) == len(expected) + 1  # the load, and the request that made the topic


def test_demo_tokenizer_prompt_builder_is_exact() -> None:
    # The load generator's prompts are the size it plans under the model's tokenizer.
    for n in (1, 7, 130):
        assert count_tokens(prompt_of(n, seed=n)) == n
