"""The whole Dagster graph, loaded as `dagster dev` loads it, and snapshotted.

An accidental change to asset keys, checks, jobs, schedules or sensors changes the
snapshot (update it on purpose with `pytest --snapshot-update`). Also here: nothing
reads settings at import, and the small pure pieces around the definitions (resource
overlays, which hour a schedule tick builds, partition windows).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from syrupy.assertion import SnapshotAssertion

from ingest.settings import Settings
from models.errors import InputError
from pipelines.defs.partitions import (
    HOURLY_PARTITIONS,
    hour_partition_key,
    partition_keys_between,
    window_of_keys,
)
from pipelines.defs.resources import (
    GpuledgerSettings,
    KafkaResource,
    PrometheusResource,
    resolve_settings,
)
from pipelines.defs.usage.schedules import hour_due, usage_hourly_schedule

REPO_ROOT = Path(__file__).resolve().parents[2]


def summary(defs: dg.Definitions) -> dict[str, Any]:
    repo = defs.get_repository_def()
    assets = repo.assets_defs_by_key
    return {
        "assets": sorted(
            (
                key.to_user_string(),
                assets[key].group_names_by_key[key],
                type(assets[key].partitions_def).__name__,
                str(assets[key].backfill_policy),
            )
            for key in repo.asset_graph.get_all_asset_keys()
        ),
        "asset_checks": sorted(
            f"{key.asset_key.to_user_string()}:{key.name}"
            for key in repo.asset_graph.asset_check_keys
        ),
        "jobs": sorted(job.name for job in repo.get_all_jobs() if not job.name.startswith("__")),
        "schedules": sorted(
            (s.name, s.cron_schedule, s.execution_timezone, s.job_name) for s in repo.schedule_defs
        ),
        "sensors": sorted((s.name, s.job_name) for s in repo.sensor_defs),
        "resources": sorted(repo.get_top_level_resources()),
    }


def test_the_definitions_load_and_match_the_snapshot(snapshot: SnapshotAssertion) -> None:
    from pipelines.definitions import defs

    dg.Definitions.validate_loadable(defs)
    assert summary(defs) == snapshot


def test_importing_the_definitions_reads_no_settings(tmp_path: Path) -> None:
    """Guards against settings read at import: a bad config must only fail a run."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GPULEDGER_")}
    env["GPULEDGER_CONFIG"] = str(tmp_path / "nowhere" / "gpuledger.toml")
    env["GPULEDGER_KAFKA__SECURITY_PROTOCOL"] = "NOT-A-PROTOCOL"
    env["PYTHONPATH"] = str(REPO_ROOT)
    code = (
        "import dagster as dg\n"
        "from pipelines.definitions import defs\n"
        "dg.Definitions.validate_loadable(defs)\n"
        "from pipelines.defs.resources import GpuledgerSettings\n"
        "try:\n"
        "    GpuledgerSettings().settings()\n"
        "except Exception as exc:\n"
        "    print('at run time:', type(exc).__name__, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "at run time: InputError settings: config file" in done.stdout
    assert "does not exist" in done.stdout


def isolated(tmp_path: Path, **overrides: Any) -> Settings:
    from tests.conftest import build_settings

    return build_settings(tmp_path / "state", **overrides)


def test_unset_resources_leave_the_settings_as_they_are(tmp_path: Path) -> None:
    settings = isolated(tmp_path, kafka={"topic": "from-settings"})
    pinned = GpuledgerSettings.pinned(settings)
    resolved = resolve_settings(pinned, KafkaResource(), PrometheusResource())
    assert resolved is settings


def test_set_resource_fields_lay_over_the_settings(tmp_path: Path) -> None:
    settings = isolated(tmp_path, kafka={"topic": "from-settings"})
    resolved = resolve_settings(
        GpuledgerSettings.pinned(settings),
        KafkaResource(
            bootstrap_servers="broker-1:9093",
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="ledger",
            sasl_password="s3cret",
            ssl_cafile="/etc/ca.pem",
        ),
        PrometheusResource(url="https://prom.example:9090", bearer_token="t0ken"),
    )
    assert resolved.kafka.bootstrap_servers == "broker-1:9093"
    assert resolved.kafka.topic == "from-settings"  # unset: kept
    assert resolved.kafka.security_protocol == "SASL_SSL"
    assert resolved.kafka.sasl_password is not None
    assert resolved.kafka.sasl_password.get_secret_value() == "s3cret"
    assert resolved.kafka.ssl_cafile == Path("/etc/ca.pem")
    assert resolved.prometheus.url == "https://prom.example:9090"
    assert resolved.prometheus.bearer_token is not None
    assert resolved.prometheus.bearer_token.get_secret_value() == "t0ken"
    assert settings.kafka.bootstrap_servers is None  # the original is untouched


def test_a_bad_resource_value_names_the_resource_and_field(tmp_path: Path) -> None:
    settings = isolated(tmp_path)
    with pytest.raises(InputError, match=r"resource kafka: security_protocol: "):
        KafkaResource(security_protocol="SASL").apply(settings)


def test_env_var_resource_config_is_read_when_the_resource_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    resource = KafkaResource(bootstrap_servers=dg.EnvVar("TEST_KAFKA_BOOTSTRAP"))
    monkeypatch.setenv("TEST_KAFKA_BOOTSTRAP", "broker-9:9092")
    resolved: list[Settings] = []

    @dg.asset
    def probe(gpuledger: GpuledgerSettings, kafka: KafkaResource) -> None:
        resolved.append(resolve_settings(gpuledger, kafka))

    dg.materialize(
        [probe],
        resources={"gpuledger": GpuledgerSettings.pinned(isolated(tmp_path)), "kafka": resource},
        run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
    )
    assert resolved[0].kafka.bootstrap_servers == "broker-9:9092"


def test_the_config_file_resource_loads_that_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.upper().startswith("GPULEDGER_"):
            monkeypatch.delenv(name)
    config = tmp_path / "gpuledger.toml"
    config.write_text(f'state_dir = "{tmp_path / "elsewhere"}"\n[kafka]\ntopic = "from-toml"\n')
    settings = GpuledgerSettings(config_file=str(config)).settings()
    assert settings.kafka.topic == "from-toml"
    assert settings.state_dir == tmp_path / "elsewhere"
    overridden = GpuledgerSettings(config_file=str(config), state_dir=str(tmp_path)).settings()
    assert overridden.state_dir == tmp_path


DAY = datetime(2026, 11, 24, tzinfo=UTC)


@pytest.mark.parametrize(
    ("tick", "watermark_s", "hour"),
    [
        (timedelta(hours=10, minutes=20), 900, 9),  # 09:00 ended 10:00, passed 10:15
        (timedelta(hours=10, minutes=14, seconds=59), 900, 8),  # 09:00 not passed yet
        (timedelta(hours=10, minutes=20), 1800, 8),  # 09:00 passes at 10:30
        (timedelta(hours=10, minutes=20), 0, 9),
        (timedelta(hours=10, minutes=20), 7200, 7),
    ],
)
def test_the_schedule_builds_the_newest_hour_past_its_watermark(
    tick: timedelta, watermark_s: float, hour: int
) -> None:
    at = DAY + tick
    due = hour_due(at, watermark_s)
    assert due == DAY + timedelta(hours=hour)
    assert due + timedelta(hours=1, seconds=watermark_s) <= at


def test_a_schedule_tick_reads_the_watermark_from_the_settings(tmp_path: Path) -> None:
    settings = isolated(tmp_path, ingest={"lateness_watermark_s": 1800})
    context = dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 24, 10, 20, tzinfo=UTC),
        resources={"gpuledger": GpuledgerSettings.pinned(settings)},
    )
    request = usage_hourly_schedule(context)
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == "2026-11-24-08:00"
    assert request.run_key == "usage-hour:2026-11-24-08:00"


def test_partition_keys_and_windows_agree() -> None:
    start = datetime(2026, 11, 22, 6, 30, tzinfo=UTC)
    keys = partition_keys_between(start, start + timedelta(hours=2))
    assert keys == ["2026-11-22-06:00", "2026-11-22-07:00", "2026-11-22-08:00"]
    assert window_of_keys(keys[0], keys[-1]) == (
        datetime(2026, 11, 22, 6, tzinfo=UTC),
        datetime(2026, 11, 22, 9, tzinfo=UTC),
    )
    assert all(k in HOURLY_PARTITIONS.get_partition_keys() for k in keys)
    assert hour_partition_key(datetime(2026, 11, 22, 7, tzinfo=UTC)) == keys[1]


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (datetime(2026, 11, 22, 6), datetime(2026, 11, 22, 7), "time zone"),  # noqa: DTZ001
        (
            datetime(2026, 11, 22, 7, tzinfo=UTC),
            datetime(2026, 11, 22, 6, tzinfo=UTC),
            "must be after",
        ),
        (
            datetime(2023, 12, 31, 23, tzinfo=UTC),
            datetime(2024, 1, 1, 1, tzinfo=UTC),
            "before the first partition",
        ),
        # Evaluated at collection, maybe minutes before the test runs: ending an hour
        # ahead keeps the window's last hour unfinished however late the test runs
        # (one minute ahead failed when collection and run straddled an hour).
        (
            datetime.now(UTC) - timedelta(hours=1),
            datetime.now(UTC) + timedelta(hours=1),
            "has not ended",
        ),
    ],
)
def test_a_bad_window_is_an_input_error(start: datetime, end: datetime, message: str) -> None:
    with pytest.raises(InputError, match=message):
        partition_keys_between(start, end)
