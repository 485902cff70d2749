"""Every dbt unit test of the allocation passes on a fresh state dir, as on a fresh clone.

dbt unit tests read the column types of each model's parents from the warehouse, so the
relations must exist first: the raw views come from `ensure_catalog` (an empty lake
keeps a zero-row file per dataset, so they are valid with no data), and
`dbt run --empty` creates every model with its columns and no rows. The count of unit
tests run is checked against the YAML, so a test dbt silently skipped or never found
fails here.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ingest.settings import Settings
from pipelines.allocation import DBT_PROJECT_DIR, run_dbt
from tests.conftest import build_settings


def declared_unit_tests() -> set[tuple[str, str]]:
    """(model, test name) of every unit test in the project's YAML files."""
    declared: set[tuple[str, str]] = set()
    for path in sorted((DBT_PROJECT_DIR / "models").rglob("*.yml")):
        document = yaml.safe_load(path.read_text()) or {}
        for test in document.get("unit_tests") or []:
            key = (test["model"], test["name"])
            assert key not in declared, f"{path}: unit test {key} declared twice"
            declared.add(key)
    return declared


def test_yaml_declares_the_allocation_unit_tests() -> None:
    models = {model for model, _ in declared_unit_tests()}
    assert {
        "int_gpu_slices_cut",
        "int_gpu_slice_energy",
        "int_prefill_weights",
        "int_requests_in_window",
        "int_request_slice_tokens",
        "int_request_slice_allocation",
        "int_gpu_hour_energy",
        "int_request_gpu_hour_allocation",
        "fct_request_allocation",
        "dq_orphan_requests",
    } <= models


def test_all_dbt_unit_tests_pass_on_a_fresh_state_dir(tmp_path: Path) -> None:
    settings: Settings = build_settings(tmp_path / "state")
    assert not settings.warehouse_path.exists()

    created = run_dbt(settings, ["run", "--empty"])
    assert created.success, [(n.name, n.status, n.message) for n in created.failures]
    assert created.nodes, "dbt run --empty created no model"

    tested = run_dbt(settings, ["test", "--select", "test_type:unit"])
    unit = [n for n in tested.nodes if n.resource_type == "unit_test"]
    not_passed = [(n.name, n.status, (n.message or "")[:2000]) for n in unit if n.status != "pass"]
    assert not not_passed, not_passed
    assert tested.success, tested.log[-3000:]

    # unique_id of a unit test: unit_test.<project>.<model>.<name>
    ran = {tuple(n.name.split(".")[2:4]) for n in unit}
    declared = declared_unit_tests()
    assert len(unit) >= len(declared)
    assert declared <= ran, f"declared but not run: {sorted(declared - ran)}"
