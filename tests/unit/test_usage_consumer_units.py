"""The usage consumer's pure parts, without Kafka: landing file names and positions,
the tenant registry, and `--partitions` parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.lake import TMP_SUFFIX, Lake, atomic_path, remove_stale_tmp
from ingest.settings import Settings
from ingest.usage_consumer import (
    iter_landing_files,
    landed_next_offset,
    landing_file_name,
    load_tenant_registry,
    register_tenants,
)
from models.errors import InputError
from pipelines.cli.ingest import parse_partitions
from tests.conftest import build_settings

TOPIC = "gpuledger.usage.v1"


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def stray_temp(directory: Path, first: int, last: int) -> Path:
    """What a writer killed mid-write leaves: `atomic_path`'s temporary name."""
    return touch(directory / f".{landing_file_name(first, last)}.0123456789abcdef{TMP_SUFFIX}")


# -- landing file names and positions ----------------------------------------------------


def test_landing_file_names_are_zero_padded_to_20_digits_and_sort_by_offset() -> None:
    assert landing_file_name(0, 99) == "00000000000000000000-00000000000000000099.parquet"
    assert landing_file_name(2**63 - 1, 2**63 - 1) == (
        "09223372036854775807-09223372036854775807.parquet"
    )
    names = [landing_file_name(a, b) for a, b in [(1000, 1999), (0, 9), (10, 999)]]
    assert sorted(names) == [landing_file_name(a, b) for a, b in [(0, 9), (10, 999), (1000, 1999)]]


def test_landed_next_offset_without_files(tmp_path: Path) -> None:
    assert landed_next_offset(tmp_path / "missing") is None
    assert landed_next_offset(tmp_path) is None
    touch(tmp_path / ".lock", b"")
    stray_temp(tmp_path, 0, 99)
    assert landed_next_offset(tmp_path) is None  # a temporary file is not landed


def test_landed_next_offset_follows_the_newest_file_and_ignores_strays(tmp_path: Path) -> None:
    for first, last in [(0, 99), (100, 249), (250, 250)]:
        touch(tmp_path / landing_file_name(first, last))
    touch(tmp_path / ".lock", b"")
    stray_temp(tmp_path, 251, 900)  # killed mid-write: not landed
    touch(tmp_path / "00000000000000000001-2.parquet")  # not 20 digits
    touch(tmp_path / "00000000000000000900-00000000000000000999.parquet.bak")
    touch(tmp_path / "notes.parquet")
    assert landed_next_offset(tmp_path) == 251


def test_landed_next_offset_is_the_largest_last_offset_not_the_last_listed(
    tmp_path: Path,
) -> None:
    # Offsets need not start at 0 (a topic with deleted segments), and a gap is allowed
    # (compacted or transactional topics skip offsets).
    for first, last in [(5000, 5099), (700, 799), (5100, 5200)]:
        touch(tmp_path / landing_file_name(first, last))
    assert landed_next_offset(tmp_path) == 5201


def test_iter_landing_files_lists_landed_files_in_order_and_nothing_else(
    tmp_path: Path,
) -> None:
    lake = Lake(tmp_path / "lake")
    landed = []
    for partition in (1, 0):
        directory = lake.landing_partition_dir(TOPIC, partition)
        for first, last in [(100, 199), (0, 99)]:
            landed.append(touch(directory / landing_file_name(first, last)))
        stray_temp(directory, 200, 299)
        touch(directory / ".lock", b"")
    touch(lake.landing_partition_dir("other.topic", 0) / landing_file_name(0, 9))
    assert lake.landing_partition_dir(TOPIC, 3).name == "partition=00003"
    assert list(iter_landing_files(lake, TOPIC)) == sorted(landed)
    assert list(iter_landing_files(lake, "no.such.topic")) == []


def test_stray_temp_files_are_removed_and_landed_files_kept(tmp_path: Path) -> None:
    landed = touch(tmp_path / landing_file_name(0, 99))
    lock = touch(tmp_path / ".lock", b"")
    strays = [stray_temp(tmp_path, 100, 199), stray_temp(tmp_path, 100, 150)]
    assert remove_stale_tmp(tmp_path) == 2
    assert not any(p.exists() for p in strays)
    assert landed.exists() and lock.exists()
    assert landed_next_offset(tmp_path) == 100
    assert remove_stale_tmp(tmp_path / "missing") == 0


def test_a_write_that_fails_leaves_neither_the_file_nor_a_temporary(tmp_path: Path) -> None:
    final = tmp_path / "p" / landing_file_name(0, 9)
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("killed")
    assert list(final.parent.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"whole")
    assert [p.name for p in final.parent.iterdir()] == [final.name]
    assert final.read_bytes() == b"whole"


# -- tenant registry ---------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return build_settings(tmp_path / "state")


def test_no_registry_accepts_every_tenant(settings: Settings) -> None:
    assert not settings.tenants_path.exists()
    assert load_tenant_registry(settings) is None


def test_a_configured_registry_that_is_missing_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "tenants.yaml"
    configured = build_settings(tmp_path / "state", ingest={"tenants_file": path})
    with pytest.raises(InputError, match="does not exist") as caught:
        load_tenant_registry(configured)
    assert str(path) in caught.value.message


def test_registry_entries_as_mappings_or_plain_ids(settings: Settings) -> None:
    touch(settings.tenants_path, b"tenants:\n  - id: acme\n    name: Acme\n  - globex\n")
    assert load_tenant_registry(settings) == frozenset({"acme", "globex"})
    touch(settings.tenants_path, b"tenants: []\n")
    assert load_tenant_registry(settings) == frozenset()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tenants: [acme\n", "not valid YAML"),
        ("tenants:\n  - id: acme\n bad indent: [\n", "not valid YAML"),
        ("", "expected a list under 'tenants'"),
        ("- acme\n- globex\n", "expected a list under 'tenants'"),
        ("tenants: acme\n", "expected a list under 'tenants'"),
        ("tenants:\n  acme: {}\n", "expected a list under 'tenants'"),
        ("customers: [acme]\n", "expected a list under 'tenants'"),
        ("tenants:\n  - id: acme\n  - name: no id\n", "tenants[1].id"),
        ("tenants:\n  - id: ''\n", "tenants[0].id"),
        ("tenants:\n  - 42\n", "tenants[0].id"),
        ("tenants:\n  - id: [a, b]\n", "tenants[0].id"),
    ],
)
def test_a_malformed_registry_is_one_line_naming_the_file(
    settings: Settings, text: str, needle: str
) -> None:
    touch(settings.tenants_path, text.encode())
    with pytest.raises(InputError) as caught:
        load_tenant_registry(settings)
    message = caught.value.message
    assert message.startswith(f"tenant registry {settings.tenants_path}: "), message
    assert needle in message
    assert "\n" not in message


def test_register_tenants_creates_then_extends_the_registry(settings: Settings) -> None:
    path = register_tenants(settings, ["acme", "globex"])
    assert path == settings.tenants_path
    assert load_tenant_registry(settings) == frozenset({"acme", "globex"})
    touch(path, path.read_bytes() + b"- initech\n")  # an entry written by hand
    register_tenants(settings, ["globex", "umbrella", "umbrella"])
    assert load_tenant_registry(settings) == frozenset({"acme", "globex", "initech", "umbrella"})
    assert path.read_text().count("globex") == 1
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(TMP_SUFFIX)] == []


@pytest.mark.parametrize("text", ["tenants: [acme\n", "- acme\n"])
def test_register_tenants_on_a_malformed_registry_names_the_file(
    settings: Settings, text: str
) -> None:
    """Regression: register_tenants once parsed the file without load_tenant_registry's
    checks and raised a raw YAML or AttributeError."""
    touch(settings.tenants_path, text.encode())
    with pytest.raises(InputError) as caught:
        register_tenants(settings, ["globex"])
    assert str(settings.tenants_path) in caught.value.message
    assert settings.tenants_path.read_text() == text  # left as it was


# -- --partitions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("0", [0]),
        ("0-3", [0, 1, 2, 3]),
        ("2-2", [2]),
        ("0,1,4-7", [0, 1, 4, 5, 6, 7]),
        (" 3 , 1,1 ", [1, 3]),
        ("5-6,0-1,6", [0, 1, 5, 6]),
    ],
)
def test_parse_partitions(text: str | None, expected: list[int] | None) -> None:
    assert parse_partitions(text) == expected


@pytest.mark.parametrize("text", ["a", "3-1", "1-", "-1", "", "1,,2", "0-x", "1.5", "0-1-2"])
def test_parse_partitions_rejects_with_one_line_naming_the_option(text: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_partitions(text)
    message = caught.value.message
    assert message.startswith("--partitions: "), message
    assert "\n" not in message
    assert caught.value.exit_code == 2
