"""One settings layer: environment over TOML over defaults; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.settings import load_settings
from models.errors import InputError


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(__import__("os").environ):
        if name.upper().startswith("GPULEDGER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults_point_at_the_local_stack(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.kafka.bootstrap_servers is None
    assert settings.prometheus.url is None
    assert settings.kafka.topic == "gpuledger.usage.v1"
    assert settings.warehouse_path == Path(".gpuledger/warehouse.duckdb")


def test_toml_file_then_environment_on_top(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "prod.toml"
    config.write_text(
        'state_dir = "/var/lib/gpuledger"\n'
        "[kafka]\n"
        'bootstrap_servers = "broker-1:9093,broker-2:9093"\n'
        'security_protocol = "SASL_SSL"\n'
        'sasl_mechanism = "SCRAM-SHA-512"\n'
        'sasl_username = "metering"\n'
        'sasl_password = "s3cret"\n'
        "[prometheus]\n"
        'url = "https://prom.example.com"\n'
    )
    clean_env.setenv("GPULEDGER_PROMETHEUS__URL", "https://thanos.example.com/prom")
    settings = load_settings(config)
    assert settings.kafka.bootstrap_servers == "broker-1:9093,broker-2:9093"
    assert settings.kafka.sasl_password is not None
    assert "s3cret" not in repr(settings)  # secrets never print
    assert settings.prometheus.url == "https://thanos.example.com/prom"  # env wins
    assert settings.warehouse_path == Path("/var/lib/gpuledger/warehouse.duckdb")


def test_config_named_by_environment_and_default_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "gpuledger.toml").write_text("[stack]\nscrape_interval_s = 5\n")
    assert load_settings().stack.scrape_interval_s == 5
    other = tmp_path / "other.toml"
    other.write_text("[stack]\nscrape_interval_s = 7\n")
    clean_env.setenv("GPULEDGER_CONFIG", str(other))
    assert load_settings().stack.scrape_interval_s == 7


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"GPULEDGER_KAFKA__SECURITY_PROTOCOL": "TLS"}, "kafka.security_protocol"),
        ({"GPULEDGER_STACK__KAFKA_PORT": "70000"}, "stack.kafka_port"),
        ({"GPULEDGER_STACK__PROMETHEUS_RETENTION": "forever"}, "stack.prometheus_retention"),
        ({"GPULEDGER_KAFKA__TOPIC_PARTITIONS": "0"}, "kafka.topic_partitions"),
    ],
)
def test_bad_values_name_the_field_and_source(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], field: str
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(InputError) as caught:
        load_settings()
    assert caught.value.message.startswith(f"settings: {field}: ")
    assert "GPULEDGER_* environment" in caught.value.message


def test_unknown_key_in_the_file_is_rejected(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text("[kafka]\nbootstrap_server = 'x:1'\n")
    with pytest.raises(
        InputError, match=r"kafka\.bootstrap_server: Extra inputs are not permitted"
    ):
        load_settings(config)


def test_missing_and_unreadable_config_files(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[kafka\n")
    with pytest.raises(InputError, match=f"cannot read {broken}"):
        load_settings(broken)
