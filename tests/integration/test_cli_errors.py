"""Bad input to `gpuledger simulate`: one line naming the problem, non-zero, no traceback.

Run as real subprocesses of the installed console script, as a user would.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

GPULEDGER = shutil.which("gpuledger", path=str(Path(sys.executable).parent)) or "gpuledger"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("GPULEDGER_")}
    clean.update({"GPULEDGER_STATE_DIR": str(tmp_path / "state"), "NO_COLOR": "1", **env})
    return subprocess.run(
        [GPULEDGER, *args], capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=120
    )


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], code: int, *needles: str
) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpuledger: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--hours", "abc"], ["--hours", "valid number"]),
        (["--hours", "0"], ["--hours", "greater than or equal to 0.01"]),
        (["--seed", "-3"], ["--seed"]),
        (["--hostname-label", "HOST"], ["--hostname-label"]),
        (["--start", "23/11/2026"], ["--start", "ISO 8601"]),
        (["--scrape-interval", "0.5"], ["--scrape-interval"]),
        (["--trace-time-unit", "minutes"], ["--trace-time-unit"]),
        (["--no-such-option"], ["No such option"]),
    ],
)
def test_malformed_cli_values(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    result = run(["simulate", "--no-kafka", "--no-prometheus", *args], tmp_path)
    assert_one_line_error(result, 2, *needles)


def test_trace_with_missing_columns(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("ts,prompt,completion\n0,10,5\n")
    result = run(["simulate", "--no-kafka", "--no-prometheus", "--trace", str(trace)], tmp_path)
    assert_one_line_error(result, 2, str(trace), "missing columns 'timestamp'", "columns present")


def test_fleet_file_with_an_unknown_model(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "nodes:\n"
        "  - hostname: n1\n    gpu_type: H100\n    deployments: [{model: gpt-9, tp: 1}]\n"
        "tenants:\n"
        "  - {id: a, weight: 1, peak_hour_utc: 12, model_mix: {gpt-9: 1},\n"
        "     prompt_median: 10, completion_median: 10, cache_hit_rate: 0}\n"
    )
    result = run(["simulate", "--no-kafka", "--no-prometheus", "--fleet", str(fleet)], tmp_path)
    assert_one_line_error(
        result, 2, str(fleet), "nodes.0.deployments.0.model", "unknown model 'gpt-9'"
    )


def test_unreachable_kafka(tmp_path: Path) -> None:
    address = f"127.0.0.1:{closed_port()}"
    result = run(
        ["simulate", "--hours", "0.1", "--no-prometheus"],
        tmp_path,
        GPULEDGER_KAFKA__BOOTSTRAP_SERVERS=address,
    )
    assert_one_line_error(result, 3, f"Kafka at {address} is unreachable")


def test_unreachable_prometheus(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = run(
        ["simulate", "--hours", "0.1", "--no-kafka"], tmp_path, GPULEDGER_PROMETHEUS__URL=url
    )
    assert_one_line_error(result, 3, f"Prometheus at {url} is unreachable")


def test_no_local_stack_and_nothing_configured(tmp_path: Path) -> None:
    result = run(["simulate", "--hours", "0.1"], tmp_path)
    assert_one_line_error(result, 3, "no Kafka configured", "gpuledger stack up")


def test_bad_settings_file(tmp_path: Path) -> None:
    config = tmp_path / "gpuledger.toml"
    config.write_text("[kafka]\nsecurity_protocol = 'TLS'\n")
    result = run(["simulate", "--no-kafka", "--no-prometheus"], tmp_path)
    assert_one_line_error(result, 2, "kafka.security_protocol")


def test_offline_simulation_writes_ground_truth(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(
        [
            "simulate",
            "--hours",
            "0.25",
            "--nodes",
            "1",
            "--no-kafka",
            "--no-prometheus",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for name in ("requests.parquet", "gpu_hours.parquet", "anomalies.parquet", "manifest.json"):
        assert (out / name).is_file()
