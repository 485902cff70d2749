"""`gpuledger stack up | down | status`, in process and as a real subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingest.settings import Settings
from ingest.stack import LocalStack
from ingest.stack.process import find_free_port
from pipelines.cli import main

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-c", "from pipelines.cli import console_main; console_main()"]


@pytest.fixture
def state_dir(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings_factory: Callable[..., Settings],
) -> Iterator[Path]:
    """GPULEDGER_STATE_DIR for the CLI; whatever it starts there is stopped afterwards."""
    for name in list(os.environ):
        if name.upper().startswith("GPULEDGER_"):
            monkeypatch.delenv(name)
    path = tmp_path / "state"
    monkeypatch.setenv("GPULEDGER_STATE_DIR", str(path))
    monkeypatch.chdir(tmp_path)  # no ./gpuledger.toml
    try:
        yield path
    finally:
        LocalStack(settings_factory("state")).down()


def run_cli(
    *args: str, cwd: Path, env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: its own process, pipes we read to the end."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("GPULEDGER_")}
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpuledger: error: ")
    return lines[0].removeprefix("gpuledger: error: ")


def test_up_status_down_in_process(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stack", "up"]) == 0
    out = capsys.readouterr().out
    assert "Kafka bootstrap: 127.0.0.1:" in out
    assert "Prometheus:      http://127.0.0.1:" in out
    assert "memory://" in out

    assert main(["stack", "up"]) == 0
    assert out.count("started") == 2 and capsys.readouterr().out.count("already running") == 2

    assert main(["stack", "status"]) == 0
    out = capsys.readouterr().out
    assert out.count("running") >= 2 and "memory://" in out

    assert main(["stack", "status", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    services = {s["name"]: s for s in document["services"]}
    assert services["kafka"]["state"] == "running" and services["kafka"]["healthy"] is True
    assert services["prometheus"]["url"].startswith("http://127.0.0.1:")
    assert document["configured"] == []

    assert main(["stack", "down"]) == 0
    assert capsys.readouterr().out.count("stopped") == 2
    assert main(["stack", "down"]) == 0
    assert capsys.readouterr().out.count("was not running") == 2


def test_status_of_a_stopped_stack_exits_3(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stack", "status"]) == 3
    captured = capsys.readouterr()
    assert "stopped" in captured.out
    assert captured.err == (
        "gpuledger: error: the local stack is not running: run `gpuledger stack up`\n"
    )


def test_up_as_a_subprocess_returns_and_leaves_the_stack_running(
    state_dir: Path, tmp_path: Path
) -> None:
    env = {"GPULEDGER_STATE_DIR": str(state_dir)}
    # Returns at all only if the services did not inherit our pipes.
    started = time.monotonic()
    up = run_cli("stack", "up", cwd=tmp_path, env=env)
    up_s = time.monotonic() - started
    assert up.returncode == 0, up.stderr
    assert up_s < 30
    status = run_cli("stack", "status", "--json", cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    assert all(s["healthy"] for s in json.loads(status.stdout)["services"])
    down = run_cli("stack", "down", cwd=tmp_path, env=env)
    assert down.returncode == 0 and down.stdout.count("stopped") == 2, down.stderr


def test_configured_port_in_use_is_one_line(state_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "stack",
            "up",
            cwd=tmp_path,
            env={"GPULEDGER_STATE_DIR": str(state_dir), "GPULEDGER_STACK__KAFKA_PORT": str(port)},
        )
    message = _assert_one_line_error(result, 3)
    assert message.startswith(
        f"port {port} on 127.0.0.1 is in use; set GPULEDGER_STACK__KAFKA_PORT"
    )
    assert not (state_dir / "stack" / "kafka.json").exists()


def test_unreachable_configured_kafka_is_one_line(state_dir: Path, tmp_path: Path) -> None:
    address = f"127.0.0.1:{find_free_port()}"
    started = time.monotonic()
    result = run_cli(
        "stack",
        "status",
        cwd=tmp_path,
        env={
            "GPULEDGER_STATE_DIR": str(state_dir),
            "GPULEDGER_KAFKA__BOOTSTRAP_SERVERS": address,
        },
    )
    assert time.monotonic() - started < 15
    message = _assert_one_line_error(result, 3)
    assert message == f"Kafka at {address} is unreachable: connection refused"
    assert "kafka (configured)" in result.stdout


def test_unreachable_configured_prometheus_is_one_line(state_dir: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{find_free_port()}"
    result = run_cli(
        "stack",
        "status",
        cwd=tmp_path,
        env={"GPULEDGER_STATE_DIR": str(state_dir), "GPULEDGER_PROMETHEUS__URL": url},
    )
    message = _assert_one_line_error(result, 3)
    assert message == f"Prometheus at {url} is unreachable: connection refused"


def test_bad_setting_is_an_input_error(state_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "stack",
        "up",
        cwd=tmp_path,
        env={"GPULEDGER_STATE_DIR": str(state_dir), "GPULEDGER_STACK__KAFKA_PORT": "70000"},
    )
    message = _assert_one_line_error(result, 2)
    assert message.startswith("settings: stack.kafka_port:")
