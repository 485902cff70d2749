"""Rate cards: YAML numbers become exact Decimals, bad cards are refused with the field."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from models.rate_card import (
    InvalidRateCard,
    RateCard,
    load_rate_card,
    validate_rate_card,
)

KNOWN_MODELS = frozenset({"llama-3.1-8b", "llama-3.1-70b"})

CARD_YAML = """
currency: EUR
tax_rate: 0.19
tou_timezone: Europe/Berlin
plans:
  default:
    - effective_from: 2026-01-01
      models:
        llama-3.1-8b:
          prompt_per_1m: 0.10
          completion_per_1m: "0.40"
          cached_per_1m: 0.05
        llama-3.1-70b:
          tier_mode: graduated
          tiers:
            - {up_to_tokens: 1000000, prompt_per_1m: 0.80, completion_per_1m: 2.40,
               cached_per_1m: 0.40}
            - {up_to_tokens: null, prompt_per_1m: 0.60, completion_per_1m: 1.80,
               cached_per_1m: 0.30}
      gpu_hour: {H100: 2.5, A100: 1}
      energy:
        default_per_kwh: 0.12
        windows:
          - {name: morning, start_hour: 7, end_hour: 9, per_kwh: 0.25}
          - {name: peak, start_hour: 17, end_hour: 21, per_kwh: 0.30}
      minimum_commitment: 100.00
    - effective_from: 2026-03-15
      models:
        llama-3.1-8b: {prompt_per_1m: 0.08, completion_per_1m: 0.32, cached_per_1m: 0.04}
  enterprise:
    - effective_from: 2026-01-01
      models:
        llama-3.1-8b:
          tier_mode: volume
          tiers:
            - {up_to_tokens: 1000000, prompt_per_1m: 0.10, completion_per_1m: 0.40,
               cached_per_1m: 0.05}
            - {prompt_per_1m: 0.07, completion_per_1m: 0.28, cached_per_1m: 0.03}
tenants:
  acme:
    plan: enterprise
    tax_rate: "0"
    credits:
      - {amount: 500.00, granted_on: 2026-01-01}
"""


def card_document() -> dict[str, Any]:
    return dict(load_rate_card(CARD_YAML, known_models=KNOWN_MODELS).model_dump(mode="python"))


def test_a_full_card_loads_with_exact_decimals() -> None:
    card = load_rate_card(CARD_YAML, known_models=KNOWN_MODELS)
    assert card.currency == "EUR"
    assert card.tax_rate == Decimal("0.19")
    version = card.plans["default"][0]
    assert version.models["llama-3.1-8b"].tier_mode == "flat"
    # 0.10 from YAML is exactly one tenth, not 0.1000000000000000055511151231257827.
    assert version.models["llama-3.1-8b"].tiers[0].prompt_per_1m == Decimal("0.10")
    assert str(version.models["llama-3.1-8b"].tiers[0].prompt_per_1m) == "0.10"
    assert version.gpu_hour == {"H100": Decimal("2.5"), "A100": Decimal(1)}
    assert version.minimum_commitment == Decimal("100.00")
    assert card.versions_for("acme")[0].models["llama-3.1-8b"].tier_mode == "volume"
    assert card.versions_for("unknown-tenant") == card.plans["default"]
    assert card.tax_rate_for("acme") == Decimal(0)
    assert card.tax_rate_for("other") == Decimal("0.19")
    assert card.terms_for("acme").credits[0].granted_on == date(2026, 1, 1)
    assert version.energy is not None
    assert version.energy.window_at(18) is not None
    assert version.energy.window_at(21) is None  # end hour is exclusive


def test_floats_built_in_code_are_refused() -> None:
    """Guards against a float price slipping past the YAML loader's Decimal handling."""
    document = yaml.safe_load(CARD_YAML)  # safe_load turns 0.19 into a float
    with pytest.raises(InvalidRateCard) as caught:
        validate_rate_card(document)
    assert caught.value.field == "tax_rate"
    assert "float" in caught.value.detail


def test_the_model_can_be_validated_directly_with_context() -> None:
    document = card_document()
    RateCard.model_validate(document, context={"known_models": KNOWN_MODELS})
    with pytest.raises(ValidationError):
        RateCard.model_validate(document, context={"known_models": {"other"}})


def _invalid(document: dict[str, Any]) -> InvalidRateCard:
    with pytest.raises(InvalidRateCard) as caught:
        validate_rate_card(document, known_models=KNOWN_MODELS, source="card.yaml")
    assert str(caught.value).startswith("card.yaml: ")
    return caught.value


def _version(document: dict[str, Any]) -> dict[str, Any]:
    version: dict[str, Any] = document["plans"]["default"][0]
    return version


def test_unknown_model_is_named() -> None:
    document = card_document()
    _version(document)["models"]["gpt-9"] = _version(document)["models"]["llama-3.1-8b"]
    error = _invalid(document)
    assert error.field == "plans.default.0.models.gpt-9"
    assert "unknown model" in error.detail


def test_negative_price_is_named() -> None:
    document = card_document()
    _version(document)["models"]["llama-3.1-70b"]["tiers"][1]["completion_per_1m"] = "-1"
    error = _invalid(document)
    assert error.field == "plans.default.0.models.llama-3.1-70b.tiers.1.completion_per_1m"
    assert "greater than or equal to 0" in error.detail


def test_negative_gpu_hour_price_is_named() -> None:
    document = card_document()
    _version(document)["gpu_hour"]["H100"] = Decimal("-2.5")
    assert _invalid(document).field == "plans.default.0.gpu_hour.H100"


@pytest.mark.parametrize(
    ("bounds", "field"),
    [
        ([2_000_000, 1_000_000, None], "tiers.1.up_to_tokens"),  # unsorted
        ([1_000_000, 1_000_000, None], "tiers.1.up_to_tokens"),  # overlapping
        ([None, 1_000_000], "tiers.0.up_to_tokens"),  # open tier not last
        ([1_000_000, 2_000_000], "tiers.1.up_to_tokens"),  # last tier bounded
    ],
)
def test_bad_tiers_are_named(bounds: list[int | None], field: str) -> None:
    document = card_document()
    pricing = _version(document)["models"]["llama-3.1-70b"]
    template = pricing["tiers"][0]
    pricing["tiers"] = [{**template, "up_to_tokens": bound} for bound in bounds]
    error = _invalid(document)
    assert error.field == f"plans.default.0.models.llama-3.1-70b.{field}"


def test_flat_price_with_two_tiers_is_refused() -> None:
    document = card_document()
    pricing = _version(document)["models"]["llama-3.1-70b"]
    pricing["tier_mode"] = "flat"
    assert _invalid(document).field == "plans.default.0.models.llama-3.1-70b.tiers"


@pytest.mark.parametrize("code", ["ZZZ", "usd", "XXX"])
def test_unknown_currency_is_named(code: str) -> None:
    document = card_document()
    document["currency"] = code
    error = _invalid(document)
    assert error.field == "currency"


def test_overlapping_time_of_use_windows_are_named() -> None:
    document = card_document()
    windows = _version(document)["energy"]["windows"]
    windows[1]["start_hour"] = 8  # morning is 7-9
    error = _invalid(document)
    assert error.field == "plans.default.0.energy.windows.1.start_hour"
    assert "overlap" in error.detail


def test_window_across_midnight_is_refused() -> None:
    document = card_document()
    windows = _version(document)["energy"]["windows"]
    windows[1].update(start_hour=22, end_hour=6)
    error = _invalid(document)
    assert error.field == "plans.default.0.energy.windows.1.end_hour"


def test_unsorted_plan_versions_are_named() -> None:
    document = card_document()
    versions = document["plans"]["default"]
    versions[1]["effective_from"] = date(2025, 12, 1)
    assert _invalid(document).field == "plans.default.1.effective_from"


def test_missing_default_plan_and_unknown_tenant_plan_are_named() -> None:
    document = card_document()
    document["plans"]["basic"] = document["plans"].pop("default")
    assert _invalid(document).field == "plans.default"
    document = card_document()
    document["tenants"]["acme"]["plan"] = "platinum"
    assert _invalid(document).field == "tenants.acme.plan"


def test_amounts_below_the_minor_unit_are_named() -> None:
    document = card_document()
    _version(document)["minimum_commitment"] = "100.005"
    assert _invalid(document).field == "plans.default.0.minimum_commitment"
    document = card_document()
    document["currency"] = "JPY"
    document["tenants"]["acme"]["credits"][0]["amount"] = "500.50"
    assert _invalid(document).field == "tenants.acme.credits.0.amount"


def test_unknown_timezone_and_extra_keys_are_named() -> None:
    document = card_document()
    document["tou_timezone"] = "Mars/Olympus"
    assert _invalid(document).field == "tou_timezone"
    document = card_document()
    _version(document)["discount"] = "0.1"
    assert _invalid(document).field == "plans.default.0.discount"


def test_bad_yaml_is_refused() -> None:
    with pytest.raises(InvalidRateCard) as caught:
        load_rate_card("currency: [", source="card.yaml")
    assert caught.value.field == "(yaml)"
    with pytest.raises(InvalidRateCard) as caught:
        load_rate_card("- 1\n- 2")
    assert caught.value.field == "(card)"
    with pytest.raises(InvalidRateCard) as caught:
        load_rate_card("currency: EUR\ntax_rate: .nan\nplans: {}")
    assert caught.value.field == "(yaml)"
