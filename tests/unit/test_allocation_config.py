"""The allocation method's configuration: defaults match the dbt project, errors name the
field (and the file, when read from one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from ingest.settings import EfficiencySettings
from models.allocation_config import AllocationConfig
from models.errors import InputError
from pipelines.allocation import DBT_PROJECT_DIR, efficiency_dbt_vars, load_allocation_config
from tests.conftest import build_settings

#: Vars every run passes for itself: the window and the usage topic.
RUN_VARS = {"min_hour", "max_hour", "usage_topic"}


def project_vars() -> dict[str, Any]:
    return dict(yaml.safe_load((DBT_PROJECT_DIR / "dbt_project.yml").read_text())["vars"])


def test_dbt_project_vars_equal_the_config_defaults() -> None:
    """Guards against the defaults in dbt_project.yml drifting from AllocationConfig's
    and EfficiencySettings'."""
    defaults = {
        **AllocationConfig().dbt_vars(
            "2024-01-01T00:00:00+00:00", "2024-01-01T01:00:00+00:00", "topic"
        ),
        **efficiency_dbt_vars(EfficiencySettings()),
    }
    declared = project_vars()
    assert set(declared) == set(defaults)
    assert {k: v for k, v in declared.items() if k not in RUN_VARS} == {
        k: v for k, v in defaults.items() if k not in RUN_VARS
    }


def test_dbt_vars_carry_a_configured_value() -> None:
    config = AllocationConfig.model_validate(
        {
            "idle_policy": "share",
            "scrape_interval_s": 10,
            "model_weights": {"m1": {"w_prefill": 0.25}},
            "idle_power_w": {"NVIDIA L4": 30},
        }
    )
    variables = config.dbt_vars("a", "b", "t")
    assert variables["idle_policy"] == "share"
    assert variables["gap_limit_s"] == 30.0
    assert variables["model_weights"] == [{"model": "m1", "w_prefill": 0.25, "w_decode": 1.0}]
    assert variables["idle_power_w"] == [{"gpu_model": "NVIDIA L4", "watts": 30}]
    assert (variables["min_hour"], variables["max_hour"], variables["usage_topic"]) == (
        "a",
        "b",
        "t",
    )


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"idle_policy": "everything"}, "idle_policy"),
        ({"gap_energy": "guess"}, "gap_energy"),
        ({"scrape_interval_s": 0}, "scrape_interval_s"),
        ({"gap_limit_factor": 0.5}, "gap_limit_factor"),
        ({"model_weights": {"m1": {"w_prefill": 0}}}, "w_prefill"),
        ({"model_weights": {"m1": {"w_prefill": -0.1}}}, "w_prefill"),
        ({"model_weights": {"m1": {"w_prefill": 0.1, "w_decode": 0}}}, "w_decode"),
        ({"model_weights": {"m1": {"w_prefill": 0.1, "decode_weight": 1}}}, "decode_weight"),
        ({"default_weights": {"w_prefill": 0}}, "w_prefill"),
        ({"idle_power_w": {"NVIDIA H100 80GB HBM3": -5}}, "idle_power_w"),
        ({"idle_power_w": {"NVIDIA H100 80GB HBM3": 0}}, "idle_power_w"),
        ({"default_idle_power_w": -1}, "default_idle_power_w"),
        ({"idle_percentile": 0.9}, "idle_percentile"),
        ({"min_fit_slices": 5}, "min_fit_slices"),
        ({"min_idle_slices": 0}, "min_idle_slices"),
        ({"max_request_s": 0}, "max_request_s"),
        ({"idle_polcy": "share"}, "idle_polcy"),
    ],
)
def test_validation_errors_name_the_field(document: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        AllocationConfig.model_validate(document)
    first = caught.value.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    assert field in where or field in first["msg"], (where, first["msg"])


def test_negative_idle_power_names_the_gpu_model() -> None:
    with pytest.raises(ValidationError, match=r"idle_power_w\['NVIDIA H100 80GB HBM3'\]"):
        AllocationConfig.model_validate({"idle_power_w": {"NVIDIA H100 80GB HBM3": -5}})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("idle_policy: everything\n", "idle_policy"),
        ("model_weights:\n  m1:\n    w_prefill: 0\n", "model_weights.m1.w_prefill"),
        ("idle_power_w:\n  NVIDIA L4: -30\n", "idle_power_w['NVIDIA L4']"),
        ("idle_percentile: 2\n", "idle_percentile"),
        ("idle_polcy: share\n", "idle_polcy"),
        ("idle_policy: [share\n", "not valid YAML"),
    ],
)
def test_bad_allocation_file_error_names_file_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path / "bad-allocation.yaml", text)
    settings = build_settings(tmp_path / "state", allocation_file=path)
    with pytest.raises(InputError) as caught:
        load_allocation_config(settings)
    assert str(path) in caught.value.message
    assert expected in caught.value.message


def test_named_allocation_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    settings = build_settings(tmp_path / "state", allocation_file=missing)
    with pytest.raises(InputError, match="does not exist") as caught:
        load_allocation_config(settings)
    assert str(missing) in caught.value.message


def test_allocation_file_in_state_dir_is_read_else_defaults(tmp_path: Path) -> None:
    settings = build_settings(tmp_path / "state")
    assert load_allocation_config(settings) == AllocationConfig()
    write(settings.state_dir / "allocation.yaml", "idle_policy: absorb\nscrape_interval_s: 5\n")
    config = load_allocation_config(settings)
    assert config.idle_policy == "absorb"
    assert config.gap_limit_s == 15.0
    assert config.model_weights == AllocationConfig().model_weights
