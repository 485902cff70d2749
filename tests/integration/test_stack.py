"""The local stack against the real Tansu broker and the real Prometheus."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import psutil
import pytest
from kafka import KafkaAdminClient

from ingest.stack import LocalStack, ServiceState
from ingest.stack.kafka import MEMORY_STORAGE_NOTE, KafkaService
from ingest.stack.process import (
    HealthError,
    Liveness,
    ProcessRecord,
    find_free_port,
    liveness,
    read_record,
    utc_now,
    write_record,
)
from ingest.stack.prometheus import (
    DCGM_JOB,
    promtool_bin,
    register_scrape_target,
    unregister_scrape_target,
)
from models.errors import ServiceError

pytestmark = pytest.mark.integration

StackFactory = Callable[..., LocalStack]


def _query(prometheus_url: str, promql: str) -> list[dict[str, object]]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success"
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def _eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)


def _pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not ours to stop: `sleep 60`, killed after the test."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _forge_record(stack: LocalStack, service: str, pid: int, argv: list[str]) -> None:
    stack_dir = stack.stack_dir
    write_record(
        stack_dir / f"{service}.json",
        ProcessRecord(
            service=service,
            pid=pid,
            port=find_free_port(),
            binary=argv[0],
            argv=tuple(argv),
            started_at=utc_now(),
            log_path=stack_dir / f"{service}.log",
        ),
    )


# -- the shared session stack (read-only use) -------------------------------------------


def test_up_starts_both_services_healthy(local_stack) -> None:
    status = local_stack.stack.status()
    assert status.healthy, status
    assert local_stack.stack.kafka_bootstrap() == local_stack.kafka_bootstrap
    assert local_stack.stack.prometheus_url() == local_stack.prometheus_url

    # A real Kafka metadata round-trip to Tansu.
    admin = KafkaAdminClient(
        bootstrap_servers=local_stack.kafka_bootstrap,
        request_timeout_ms=5000,
        bootstrap_timeout_ms=5000,
    )
    try:
        cluster = admin.describe_cluster()
        assert isinstance(admin.list_topics(), list)
    finally:
        admin.close()
    port = int(local_stack.kafka_bootstrap.rsplit(":", 1)[1])
    assert [b["port"] for b in cluster["brokers"]] == [port]  # advertised as we asked

    ready = httpx.get(f"{local_stack.prometheus_url}/-/ready", timeout=5)
    assert ready.status_code == 200

    # Prometheus scrapes itself: `up` answers with a sample once the first scrape ran.
    _eventually(
        lambda: any(
            r["metric"].get("job") == "prometheus" and r["value"][1] == "1"  # type: ignore[index, union-attr]
            for r in _query(local_stack.prometheus_url, "up")
        ),
        timeout_s=15,
        what="up{job='prometheus'} == 1",
    )


def test_up_is_idempotent(local_stack) -> None:
    before = local_stack.stack.status()
    again = local_stack.stack.up()
    assert [s.pid for s in again] == [s.pid for s in before]
    assert [s.port for s in again] == [s.port for s in before]
    assert all(s.detail == "already running" and s.healthy for s in again)


def test_status_reports_services(local_stack) -> None:
    status = local_stack.stack.status()
    kafka, prometheus = status.kafka, status.prometheus
    assert kafka.state is ServiceState.RUNNING and prometheus.state is ServiceState.RUNNING
    assert kafka.url == local_stack.kafka_bootstrap
    assert prometheus.url == local_stack.prometheus_url
    assert kafka.note == MEMORY_STORAGE_NOTE and "memory://" in kafka.note
    for service in status:
        assert service.pid is not None and psutil.pid_exists(service.pid)
        assert service.log_path is not None and service.log_path.is_file()
        assert service.started_at is not None and service.started_at.tzinfo is not None
        assert service.healthy is True


def test_prometheus_owns_its_directory(local_stack) -> None:
    stack = local_stack.stack
    assert stack.prometheus_config_path.is_file()
    assert stack.prometheus_data_dir.is_dir()
    assert stack.prometheus_targets_dir.is_dir()
    config = stack.prometheus_config_path.read_text()
    assert "job_name: dcgm-exporter" in config and "targets/*.json" in config
    assert f"scrape_interval: {local_stack.settings.stack.scrape_interval_s}s" in config
    check = subprocess.run(
        [
            promtool_bin(),
            "check",
            "config",
            str(stack.prometheus_config_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    flags = _query(local_stack.prometheus_url, "prometheus_build_info")
    assert flags, "prometheus_build_info missing"
    runtime = httpx.get(f"{local_stack.prometheus_url}/api/v1/status/flags", timeout=5).json()
    assert runtime["data"]["storage.tsdb.retention.time"] == "10y"  # 3650d, as Go prints it
    assert runtime["data"]["web.enable-admin-api"] == "true"
    assert runtime["data"]["web.enable-lifecycle"] == "true"


# -- stacks of their own: stop, break and restart freely ----------------------------------


def test_down_stops_and_second_down_is_harmless(stack_factory: StackFactory) -> None:
    stack = stack_factory()
    pids = [s.pid for s in stack.up()]
    assert all(pid is not None for pid in pids)

    down = stack.down()
    assert [s.detail for s in down] == ["stopped", "stopped"]
    assert all(_pid_gone(pid) for pid in pids if pid is not None)
    assert not stack.kafka.state_path.exists() and not stack.prometheus.state_path.exists()
    assert stack.kafka_bootstrap() is None and stack.prometheus_url() is None

    again = stack.down()
    assert [s.detail for s in again] == ["was not running", "was not running"]
    assert all(s.state is ServiceState.STOPPED for s in stack.status())


def test_down_never_kills_a_process_that_is_not_ours(
    stack_factory: StackFactory, sleeper: subprocess.Popen[bytes]
) -> None:
    stack = stack_factory()
    # A state file naming a live PID whose command line is not the one we recorded.
    _forge_record(stack, "kafka", sleeper.pid, ["/opt/tansu", "broker"])
    assert stack.status().kafka.state is ServiceState.STALE

    result = stack.down()

    assert sleeper.poll() is None, "down killed a process it did not start"
    assert result.kafka.state is ServiceState.STALE
    assert f"pid {sleeper.pid}" in result.kafka.detail and "not ours" in result.kafka.detail
    assert not stack.kafka.state_path.exists()


def test_same_command_line_but_other_start_time_is_not_ours(
    sleeper: subprocess.Popen[bytes], tmp_path
) -> None:
    proc = psutil.Process(sleeper.pid)
    record = ProcessRecord(
        service="kafka",
        pid=sleeper.pid,
        port=1,
        binary="sleep",
        argv=tuple(proc.cmdline()),
        started_at=utc_now(),
        log_path=tmp_path / "x.log",
        create_time=proc.create_time(),
    )
    assert liveness(record) is Liveness.OURS
    recycled = dataclasses.replace(record, create_time=proc.create_time() - 3600)
    assert liveness(recycled) is Liveness.FOREIGN


def test_liveness_waits_out_the_empty_command_line_of_exec(
    sleeper: subprocess.Popen[bytes], tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Right after Popen returns, Linux may report no command line yet (exec is still
    # setting up); that must not make our own fresh process look foreign.
    proc = psutil.Process(sleeper.pid)
    record = ProcessRecord(
        service="kafka",
        pid=sleeper.pid,
        port=1,
        binary="sleep",
        argv=tuple(proc.cmdline()),
        started_at=utc_now(),
        log_path=tmp_path / "x.log",
        create_time=proc.create_time(),
    )
    real_cmdline = psutil.Process.cmdline
    reads: list[int] = []

    def cmdline(self: psutil.Process) -> list[str]:
        reads.append(1)
        return [] if len(reads) <= 2 else real_cmdline(self)

    monkeypatch.setattr(psutil.Process, "cmdline", cmdline)
    assert liveness(record) is Liveness.OURS
    assert len(reads) == 3


def test_up_cleans_a_stale_state_file(stack_factory: StackFactory) -> None:
    stack = stack_factory()
    dead = subprocess.Popen(["true"])
    dead.wait()
    _forge_record(stack, "kafka", dead.pid, ["/opt/tansu", "broker"])

    status = stack.up()

    assert status.kafka.state is ServiceState.RUNNING and status.kafka.healthy
    assert status.kafka.pid != dead.pid
    assert f"removed stale state (pid {dead.pid} is dead)" in status.kafka.detail
    record = read_record(stack.kafka.state_path)
    assert record is not None and record.pid == status.kafka.pid


def test_configured_port_in_use_is_a_clear_error(stack_factory: StackFactory) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = stack_factory(stack={"kafka_port": port})
        with pytest.raises(ServiceError) as caught:
            stack.up()
    message = caught.value.message
    assert message == (
        f"port {port} on 127.0.0.1 is in use; set GPULEDGER_STACK__KAFKA_PORT to another "
        "port or leave it unset to pick a free one"
    )
    assert not stack.kafka.state_path.exists()


def test_failure_of_the_second_service_stops_the_first(stack_factory: StackFactory) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = stack_factory(stack={"prometheus_port": port})
        with pytest.raises(ServiceError, match=f"port {port} .*GPULEDGER_STACK__PROMETHEUS_PORT"):
            stack.up()
    assert not stack.kafka.state_path.exists(), "kafka was left running after up failed"
    assert stack.kafka_bootstrap() is None


def test_configured_free_ports_are_honoured(stack_factory: StackFactory) -> None:
    kafka_port, prometheus_port = find_free_port(), find_free_port()
    stack = stack_factory(stack={"kafka_port": kafka_port, "prometheus_port": prometheus_port})
    status = stack.up()
    assert status.kafka.port == kafka_port and status.prometheus.port == prometheus_port
    assert stack.kafka_bootstrap() == f"127.0.0.1:{kafka_port}"
    assert stack.prometheus_url() == f"http://127.0.0.1:{prometheus_port}"


def test_health_timeout_stops_the_process_and_quotes_the_log(
    stack_factory: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never_healthy(self: KafkaService, port: int, timeout_s: float) -> None:
        raise HealthError("forced by the test")

    monkeypatch.setattr(KafkaService, "probe", never_healthy)
    stack = stack_factory(stack={"start_timeout_s": 1.0})
    children_before = {child.pid for child in psutil.Process().children()}
    with pytest.raises(ServiceError) as caught:
        stack.up()
    message = caught.value.message
    assert "\n" not in message
    assert "did not become healthy within 1 s (forced by the test)" in message
    assert "storage: memory://tansu/" in message  # the log's last lines are quoted
    assert not stack.kafka.state_path.exists()
    started = [c for c in psutil.Process().children() if c.pid not in children_before]
    assert all(_pid_gone(child.pid) for child in started), "the timed-out broker still runs"


def test_a_process_that_exits_while_starting_is_reported(
    stack_factory: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tansu 0.6 exits with status 0 after panicking on a taken port; this stands in.
    script = "import sys; print('boom: Address in use'); sys.exit(0)"
    monkeypatch.setattr(KafkaService, "binary", lambda self: sys.executable)
    monkeypatch.setattr(KafkaService, "argv", lambda self, binary, port: [binary, "-c", script])
    stack = stack_factory()
    with pytest.raises(ServiceError) as caught:
        stack.up()
    assert "kafka exited with status 0 while starting" in caught.value.message
    assert "boom: Address in use" in caught.value.message
    assert not stack.kafka.state_path.exists()


def test_restart_prometheus_keeps_its_port_and_is_ready(stack_factory: StackFactory) -> None:
    stack = stack_factory()
    started = stack.up()
    before = started.prometheus
    restarted = stack.restart_prometheus()
    assert restarted.port == before.port and restarted.url == before.url
    assert restarted.pid != before.pid and restarted.healthy
    assert before.pid is not None and _pid_gone(before.pid)
    assert restarted.url is not None
    assert httpx.get(f"{restarted.url}/-/ready", timeout=5).status_code == 200
    assert _query(restarted.url, "vector(1)")[0]["value"][1] == "1"  # type: ignore[index]
    assert stack.status().kafka.pid == started.kafka.pid  # the broker is untouched
    assert stack.status().healthy


def test_restart_prometheus_when_down_is_an_error(stack_factory: StackFactory) -> None:
    with pytest.raises(ServiceError, match="prometheus is not running: run `gpuledger stack up`"):
        stack_factory().restart_prometheus()


def test_file_sd_targets_are_scraped_by_the_dcgm_job(stack_factory: StackFactory) -> None:
    stack = stack_factory()
    url = stack.up().prometheus.url
    assert url is not None
    address = url.removeprefix("http://")
    # Any /metrics endpoint will do: register Prometheus itself under the DCGM job.
    path = register_scrape_target(
        stack.prometheus_targets_dir, "node-0", [address], {"Hostname": "node-0"}
    )
    assert path.name == "node-0.json"
    _eventually(
        lambda: any(
            r["metric"].get("Hostname") == "node-0"  # type: ignore[union-attr]
            for r in _query(url, f'up{{job="{DCGM_JOB}"}} == 1')
        ),
        timeout_s=20,
        what="the file_sd target to be scraped",
    )
    assert unregister_scrape_target(stack.prometheus_targets_dir, "node-0")
    assert not unregister_scrape_target(stack.prometheus_targets_dir, "node-0")
