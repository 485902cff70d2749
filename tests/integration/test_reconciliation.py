"""Revenue assurance against a real Prometheus and Kafka: `triton_reconciliation`.

Two past hours of Triton counter history (two servers, two models, a baseline from
before each hour, a server restart, a failure series) are backfilled into the
module's own Prometheus with promtool (the backfill restarts Prometheus, which the
shared session stack must not see). One usage event per counted request is published
to Kafka, except that in the second hour a batch of one server's events is dropped.
The real usage ingest asset and `triton_reconciliation` are materialized per hour with
`dagster.materialize`: the first hour's check passes, the second's fails naming the
server, model and difference. Then the Prometheus reader's errors are checked.
"""

import random
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import httpx
import pytest

from ingest.catalog import connect
from ingest.settings import Settings, TritonServerSettings
from ingest.stack import LocalStack
from ingest.stack.prometheus import promtool_bin
from ingest.triton_counters import read_triton_counts, register_triton_targets
from ingest.usage_publisher import publish
from models.errors import ServiceError
from models.usage_event import USAGE_EVENT_TYPE_V1, UsageEvent
from pipelines.defs.assurance import triton_counts_match, triton_reconciliation
from pipelines.defs.partitions import hour_partition_key
from pipelines.defs.resources import GpuledgerSettings, KafkaResource, PrometheusResource
from pipelines.defs.usage import usage_events_raw
from tests.conftest import RunningStack, running_stack

pytestmark = pytest.mark.integration

HOUR_1 = datetime(2026, 11, 20, 10, tzinfo=UTC)
HOUR_2 = HOUR_1 + timedelta(hours=1)
SCRAPE_S = 15
SERVER_A = "127.0.0.1:8001"
SERVER_B = "127.0.0.1:9001"
STATUSES = ("ok",) * 8 + ("error", "cancelled")
#: Events of SERVER_A / llama left unpublished in HOUR_2.
DROPPED = 30


@dataclass(frozen=True)
class Request:
    server: str
    model: str
    end: datetime
    status: str


def requests_of(
    rng: random.Random, server: str, model: str, hour: datetime, n: int
) -> list[Request]:
    # Away from the hour's edges: a request ending in the hour's last scrape interval
    # is counted by Triton in the next hour (the tolerance's business, not this test's).
    return [
        Request(
            server,
            model,
            hour + timedelta(seconds=rng.uniform(60, 3540)),
            rng.choice(STATUSES),
        )
        for _ in range(n)
    ]


def openmetrics(requests: list[Request]) -> str:
    """Counter history of both hours: success counts every request (of every status, as
    Triton does for a decoupled Python-backend model); failure stays 0. SERVER_B
    restarts at HOUR_2 + 30 min (its counters begin again at 0)."""
    start = HOUR_1 - timedelta(minutes=10)
    end = HOUR_2 + timedelta(hours=1, minutes=5)
    restart = HOUR_2 + timedelta(minutes=30)
    series = sorted({(r.server, r.model) for r in requests})
    step = timedelta(seconds=SCRAPE_S)  # the restart falls on a scrape
    lines = ["# TYPE nv_inference_request_success gauge"]
    for server, model in series:
        ends = sorted(r.end for r in requests if (r.server, r.model) == (server, model))
        labels = (
            f'model="{model}",version="1",triton_server="{server}",job="triton",'
            f'instance="{server.rsplit(":", 1)[0]}:{int(server.rsplit(":", 1)[1]) + 1}"'
        )
        # Requests from before the window: the baseline is not zero.
        base = 1000
        t = start
        while t <= end:
            if server == SERVER_B and t >= restart:
                value = sum(1 for e in ends if restart - step < e <= t)
            else:
                value = base + sum(1 for e in ends if e <= t)
            lines.append(f"nv_inference_request_success{{{labels}}} {value} {t.timestamp():.3f}")
            t += timedelta(seconds=SCRAPE_S)
    lines.append("# TYPE nv_inference_request_failure gauge")
    for server, model in series:
        labels = (
            f'model="{model}",version="1",reason="BACKEND",triton_server="{server}",'
            'job="triton",instance="x:8002"'
        )
        t = start
        while t <= end:
            lines.append(f"nv_inference_request_failure{{{labels}}} 0 {t.timestamp():.3f}")
            t += timedelta(seconds=SCRAPE_S)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def backfill(settings: Settings, text: str, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    source = work / "triton.om.txt"
    source.write_text(text)
    blocks = work / "blocks"
    done = subprocess.run(
        [promtool_bin(), "tsdb", "create-blocks-from", "openmetrics", str(source), str(blocks)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    stack = LocalStack(settings)
    for block in blocks.iterdir():
        shutil.move(str(block), stack.prometheus_data_dir / block.name)
    stack.restart_prometheus()


def event_payload(request: Request, rng: random.Random) -> tuple[bytes, bytes]:
    event_id = str(uuid.UUID(int=rng.getrandbits(128)))
    event = UsageEvent.model_validate(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": f"triton://{request.server}/v2/models/{request.model}",
            "type": USAGE_EVENT_TYPE_V1,
            "time": request.end,
            "subject": "acme",
            "data": {
                "model": request.model,
                "model_version": "1",
                "prompt_tokens": 100,
                "completion_tokens": 0,
                "arrival_time": request.end - timedelta(seconds=2),
                "first_token_time": None,
                "end_time": request.end,
                "hostname": "node-0",
                "gpu_uuids": ["GPU-0"],
                "status": request.status,
            },
        }
    )
    return event_id.encode(), event.to_json_bytes()


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    requests: list[Request]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    root = tmp_path_factory.mktemp("reconciliation")
    with running_stack(
        root / "state",
        kafka={"topic": "gpuledger.usage.reconcile.v1", "topic_partitions": 1},
        telemetry={"retries": 1, "backoff_s": 0.01},
        stack={"scrape_interval_s": 1},
    ) as settings:
        rng = random.Random(11)
        requests: list[Request] = []
        for hour in (HOUR_1, HOUR_2):
            requests += requests_of(rng, SERVER_A, "llama", hour, 200)
            requests += requests_of(rng, SERVER_A, "mistral", hour, 60)
            requests += requests_of(rng, SERVER_B, "llama", hour, 120)
        backfill(settings, openmetrics(requests), root / "backfill")
        dropped = [
            r for r in requests if (r.server, r.model) == (SERVER_A, "llama") and r.end >= HOUR_2
        ][:DROPPED]
        published = [r for r in requests if r not in dropped]
        pairs = [event_payload(r, rng) for r in published]
        publish(settings, [k for k, _ in pairs], [v for _, v in pairs])
        yield Loaded(settings, requests)


def materialize_hour(settings: Settings, hour: datetime) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [usage_events_raw, triton_reconciliation, triton_counts_match],
        partition_key=hour_partition_key(hour),
        resources={
            "gpuledger": GpuledgerSettings.pinned(settings),
            "kafka": KafkaResource(),
            "prometheus": PrometheusResource(),
        },
        run_config={
            "ops": {"usage_events_raw": {"config": {"consume_idle_s": 0.5}}},
            "loggers": {"console": {"config": {"log_level": "WARNING"}}},
        },
        raise_on_error=False,
    )


def check_result(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 1
    return evaluations[0]


def table_rows(settings: Settings, hour: datetime) -> dict[tuple[str, str], dict[str, object]]:
    with connect(settings) as con:
        frame = con.sql(
            "SELECT * FROM assurance.triton_reconciliation WHERE hour_start = $h",
            params={"h": hour},
        ).pl()
    return {(r["server"], r["model"]): r for r in frame.iter_rows(named=True)}


def test_an_hour_whose_events_all_arrived_passes(loaded: Loaded) -> None:
    result = materialize_hour(loaded.settings, HOUR_1)
    assert result.success
    evaluation = check_result(result)
    assert evaluation.passed, evaluation.description
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    rows = table_rows(loaded.settings, HOUR_1)
    assert set(rows) == {(SERVER_A, "llama"), (SERVER_A, "mistral"), (SERVER_B, "llama")}
    assert rows[(SERVER_A, "llama")]["events"] == 200
    assert rows[(SERVER_A, "llama")]["triton_requests"] == 200
    expected_errors = sum(
        1
        for r in loaded.requests
        if (r.server, r.model) == (SERVER_A, "llama") and r.end < HOUR_2 and r.status == "error"
    )
    assert rows[(SERVER_A, "llama")]["events_error"] == expected_errors
    assert all(r["difference"] == 0 and not r["flagged"] for r in rows.values())
    materialization = result.asset_materializations_for_node("triton_reconciliation")[0]
    assert materialization.metadata["flagged"].value == 0
    assert materialization.metadata["triton_requests"].value == 380


def test_a_dropped_batch_fails_the_check_naming_the_server_and_model(loaded: Loaded) -> None:
    result = materialize_hour(loaded.settings, HOUR_2)
    assert result.success  # the check is not blocking: the run itself succeeds
    evaluation = check_result(result)
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    description = evaluation.description or ""
    assert f"{SERVER_A} llama" in description
    assert f"difference -{DROPPED}" in description
    assert "2.00%" in description
    rows = table_rows(loaded.settings, HOUR_2)
    dropped = rows[(SERVER_A, "llama")]
    assert (dropped["events"], dropped["triton_requests"]) == (200 - DROPPED, 200)
    assert dropped["flagged"] and dropped["reason"] == "events missing"
    # SERVER_B restarted mid-hour: the reset is counted, nothing drifts.
    restarted = rows[(SERVER_B, "llama")]
    assert (restarted["events"], restarted["triton_requests"], restarted["flagged"]) == (
        120,
        120,
        False,
    )
    # Re-running the hour replaces its rows.
    again = materialize_hour(loaded.settings, HOUR_2)
    assert table_rows(loaded.settings, HOUR_2).keys() == rows.keys()
    assert not check_result(again).passed


def test_counts_of_a_window_come_from_the_raw_samples(loaded: Loaded) -> None:
    counts = read_triton_counts(loaded.settings, HOUR_2, HOUR_2 + timedelta(hours=1))
    by_key = {(r["server"], r["model"]): r for r in counts.counts.iter_rows(named=True)}
    assert by_key[(SERVER_B, "llama")]["triton_requests"] == 120
    assert by_key[(SERVER_B, "llama")]["resets"] == 1
    assert counts.total_requests == 380


def test_an_unreachable_prometheus_is_a_service_error_naming_url_and_query(
    loaded: Loaded,
) -> None:
    settings = loaded.settings.model_copy(
        update={
            "prometheus": loaded.settings.prometheus.model_copy(
                update={"url": "http://127.0.0.1:9"}
            )
        }
    )
    with pytest.raises(ServiceError) as raised:
        read_triton_counts(settings, HOUR_1, HOUR_2)
    message = raised.value.message
    assert "Prometheus at http://127.0.0.1:9 is unreachable" in message
    assert 'nv_inference_request_success{job="triton"}' in message


class _TritonMetrics(BaseHTTPRequestHandler):
    """Triton's metrics endpoint, shaped like the real one, on a non-default path."""

    def do_GET(self) -> None:
        if self.path != "/triton/metrics":
            self.send_error(404)
            return
        body = (
            b"# HELP nv_inference_request_success Number of successful inference requests\n"
            b"# TYPE nv_inference_request_success counter\n"
            b'nv_inference_request_success{model="llama",version="1"} 7\n'
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        del format, args


def test_registered_triton_targets_are_scraped_with_their_server_label(
    local_stack: RunningStack,
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TritonMetrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    name = "10.9.9.9:8001"
    try:
        [path] = register_triton_targets(
            local_stack.settings,
            [
                TritonServerSettings(
                    grpc_url=name,
                    metrics_url=f"http://127.0.0.1:{server.server_port}/triton/metrics",
                    hostname="node-9",
                    gpu_uuids=["GPU-9"],
                    models=["llama"],
                )
            ],
        )
        query = f'nv_inference_request_success{{job="triton",triton_server="{name}"}}'
        deadline = time.monotonic() + 20
        while True:
            answer = httpx.get(
                f"{local_stack.prometheus_url}/api/v1/query", params={"query": query}
            ).json()["data"]["result"]
            if answer:
                break
            assert time.monotonic() < deadline, "the Triton target was not scraped in 20 s"
            time.sleep(0.25)
        assert answer[0]["metric"]["model"] == "llama"
        assert answer[0]["value"][1] == "7"
        path.unlink()
    finally:
        server.shutdown()
        server.server_close()
