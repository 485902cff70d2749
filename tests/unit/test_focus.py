"""FOCUS 1.2 rows (models.focus) and their CSV/Parquet files (pipelines.billing.focus_export)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.focus import (
    CUSTOM_COLUMNS,
    FOCUS_COLUMN_NAMES,
    FOCUS_COLUMNS,
    FOCUS_VERSION,
    MANDATORY_COLUMNS,
    SCHEMA,
    FocusCharge,
    FocusError,
    focus_frame,
)
from pipelines.billing.focus_export import focus_bytes, read_focus_csv, write_focus

P0 = datetime(2026, 3, 1, tzinfo=UTC)
P1 = datetime(2026, 4, 1, tzinfo=UTC)
D1, D2 = P0, datetime(2026, 3, 2, tzinfo=UTC)

_BASE: dict[str, Any] = {
    "tenant": "acme",
    "tenant_name": "Acme Corp",
    "invoice_id": "INV-2026-03-0001",
    "invoice_issuer": "gpuledger demo operator",
    "provider_name": "gpuledger demo operator",
    "currency": "USD",
    "billing_period_start": P0,
    "billing_period_end": P1,
    "service_name": "LLM Inference",
}
_NO_PRICE: dict[str, Any] = {
    "list_unit_price": None,
    "pricing_quantity": None,
    "pricing_unit": None,
    "consumed_quantity": None,
    "consumed_unit": None,
    "sku_id": None,
    "sku_price_id": None,
}


def usage(
    tokens: int = 2_500_000, price: str = "0.20", billed: str = "0.50", **kw: Any
) -> FocusCharge:
    fields: dict[str, Any] = {
        **_BASE,
        "line_id": "tokens/2026-03-01/llama-3.1-8b/completion/1",
        "charge_period_start": D1,
        "charge_period_end": D2,
        "charge_category": "Usage",
        "is_correction": False,
        "description": "llama-3.1-8b completion tokens, tier 1",
        "billed_cost": Decimal(billed),
        "list_unit_price": Decimal(price),
        "pricing_quantity": Decimal(tokens) / Decimal(1_000_000),
        "pricing_unit": "1M Tokens",
        "consumed_quantity": Decimal(tokens),
        "consumed_unit": "Tokens",
        "sku_id": "llama-3.1-8b/completion",
        "sku_price_id": "default@2026-01-01/llama-3.1-8b/completion/1",
        "x_model": "llama-3.1-8b",
        "x_token_class": "completion",
        "x_tier": 1,
        "x_gpu_type": "H100",
        "x_energy_kwh": Decimal("0.125"),
        "x_gpu_seconds": Decimal("12.5"),
        "x_idle_policy": "proportional",
    }
    fields.update(kw)
    return FocusCharge(**fields)


def other(category: str, billed: str, line_id: str | None = None, **kw: Any) -> FocusCharge:
    fields: dict[str, Any] = {
        **_BASE,
        **_NO_PRICE,
        "line_id": line_id or category.lower(),
        "charge_period_start": P0,
        "charge_period_end": P1,
        "charge_category": category,
        "is_correction": False,
        "description": f"{category} row",
        "billed_cost": Decimal(billed),
    }
    fields.update(kw)
    return FocusCharge(**fields)


def invoice() -> list[FocusCharge]:
    return [
        usage(),
        usage(1_234_567, "0.20", "0.25", line_id="tokens/2026-03-01/llama-3.1-8b/completion/2"),
        other("Adjustment", "71.70", "commitment", charge_frequency="Recurring"),
        usage(
            300_000,
            "0.10",
            "0.03",
            line_id="adjustment/2026-02/x",
            is_correction=True,
            charge_period_start=datetime(2026, 2, 27, tzinfo=UTC),
            charge_period_end=datetime(2026, 2, 28, tzinfo=UTC),
            x_adjusts_invoice_id="INV-2026-02-0001",
        ),
        other("Credit", "-50.00"),
        other("Tax", "4.50"),
    ]


def test_version_and_columns() -> None:
    assert FOCUS_VERSION == "1.2"
    assert FOCUS_COLUMN_NAMES == FOCUS_COLUMNS + CUSTOM_COLUMNS
    assert len(set(FOCUS_COLUMN_NAMES)) == len(FOCUS_COLUMN_NAMES)
    assert list(FOCUS_COLUMNS) == sorted(FOCUS_COLUMNS)  # FOCUS columns first, then x_
    assert all(name.startswith("x_") for name in CUSTOM_COLUMNS)
    assert not any(name.startswith("x_") for name in FOCUS_COLUMNS)


def test_every_mandatory_column_present_and_typed() -> None:
    frame = focus_frame(invoice())
    assert tuple(frame.columns) == FOCUS_COLUMN_NAMES
    assert set(frame.columns) >= MANDATORY_COLUMNS
    assert frame.schema == SCHEMA
    for money in ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "ListUnitPrice"):
        assert isinstance(frame.schema[money], pl.Decimal), money  # never Float
    for stamp in ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"):
        assert frame.schema[stamp] == pl.Datetime("us", "UTC"), stamp
    for column in MANDATORY_COLUMNS - {"ChargeClass", "PricingQuantity", "PricingUnit"}:
        assert frame[column].null_count() == 0, column


def test_empty_input_gives_empty_frame_with_schema() -> None:
    frame = focus_frame([])
    assert frame.height == 0
    assert frame.schema == SCHEMA


def test_categorical_values_are_the_specs() -> None:
    frame = focus_frame(invoice())
    assert set(frame["ServiceCategory"]) == {"AI and Machine Learning"}
    assert set(frame["ServiceSubcategory"]) == {"Generative AI"}
    assert set(frame["ChargeFrequency"]) <= {"One-Time", "Recurring", "Usage-Based"}
    assert set(frame["ChargeCategory"]) <= {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}
    assert set(frame["PricingCategory"].drop_nulls()) == {"Standard"}
    rows = {row["x_LineId"]: row for row in frame.iter_rows(named=True)}
    assert rows["tokens/2026-03-01/llama-3.1-8b/completion/1"]["ChargeFrequency"] == "Usage-Based"
    assert rows["commitment"]["ChargeFrequency"] == "Recurring"
    assert rows["tax"]["ChargeFrequency"] == "One-Time"


def test_correction_rows_and_charge_class() -> None:
    frame = focus_frame(invoice())
    classes = dict(zip(frame["x_LineId"], frame["ChargeClass"], strict=True))
    assert classes["adjustment/2026-02/x"] == "Correction"
    assert [line for line, cls in classes.items() if cls is not None] == ["adjustment/2026-02/x"]
    row = frame.filter(pl.col("ChargeClass") == "Correction").row(0, named=True)
    assert row["x_AdjustsInvoiceId"] == "INV-2026-02-0001"
    assert row["ChargePeriodStart"] < row["BillingPeriodStart"]  # an earlier period, billed now
    assert row["ListCost"] == row["BilledCost"]  # corrections may differ from price × qty


def test_tax_and_credit_rows_carry_no_price() -> None:
    frame = focus_frame(invoice())
    for category in ("Tax", "Credit"):
        row = frame.filter(pl.col("ChargeCategory") == category).row(0, named=True)
        for column in ("ListUnitPrice", "PricingQuantity", "PricingUnit", "SkuId", "SkuPriceId"):
            assert row[column] is None, (category, column)
        assert row["PricingCategory"] is None
        assert row["ConsumedQuantity"] is None
        for cost in ("ListCost", "ContractedCost", "EffectiveCost"):
            assert row[cost] == row["BilledCost"], (category, cost)


def test_list_cost_is_exact_price_times_quantity() -> None:
    row = focus_frame([usage(1_234_567, "0.20", "0.25")]).row(0, named=True)
    assert row["ListCost"] == Decimal("0.2469134")  # exact, below the cent
    assert row["ContractedCost"] == row["ListCost"]
    assert row["ContractedUnitPrice"] == row["ListUnitPrice"] == Decimal("0.20")
    assert row["BilledCost"] == row["EffectiveCost"] == Decimal("0.25")
    assert row["PricingUnit"] == "1000000 Tokens"  # FOCUS Unit Format: a whole number
    assert row["SkuMeter"] == "Completion Tokens"
    assert (
        row["SkuPriceDetails"]
        == '{"x_Model":"llama-3.1-8b","x_Tier":1,"x_TokenClass":"completion"}'
    )


def test_x_columns_carried() -> None:
    row = focus_frame([usage()]).row(0, named=True)
    assert row["x_LineId"] == "tokens/2026-03-01/llama-3.1-8b/completion/1"
    assert row["x_Model"] == "llama-3.1-8b"
    assert row["x_GpuType"] == "H100"
    assert row["x_TokenClass"] == "completion"
    assert row["x_Tier"] == 1
    assert row["x_EnergyKwh"] == Decimal("0.125")
    assert row["x_GpuSeconds"] == Decimal("12.5")
    assert row["x_IdlePolicy"] == "proportional"
    assert row["x_TouWindow"] is None


def test_draft_has_null_invoice_id() -> None:
    frame = focus_frame([replace(c, invoice_id=None) for c in invoice()])
    assert frame["InvoiceId"].null_count() == frame.height


@pytest.mark.parametrize(
    ("charge", "field"),
    [
        (usage(billed="0.505"), "billed_cost"),
        (usage(billed="0.70"), "billed_cost"),  # not price × quantity to within a cent
        (usage(charge_period_start=datetime(2026, 3, 1)), "charge_period_start"),  # noqa: DTZ001
        (
            usage(charge_period_end=datetime(2026, 3, 2, tzinfo=timezone(timedelta(hours=1)))),
            "charge_period_end",
        ),
        (usage(charge_period_end=D1 + timedelta(microseconds=5)), "charge_period_end"),
        (usage(charge_period_end=D1), "charge_period_end"),
        (usage(currency="usd"), "currency"),
        (usage(list_unit_price=None), "list_unit_price"),
        (usage(consumed_quantity=None, consumed_unit=None), "consumed_quantity"),
        (usage(consumed_unit=None), "consumed_unit"),
        (usage(list_unit_price=Decimal("-0.20")), "list_unit_price"),
        (other("Tax", "1.00", sku_id="x"), "sku_id"),
        (
            other("Credit", "-1.00", consumed_quantity=Decimal(1), consumed_unit="Tokens"),
            "consumed_quantity",
        ),
        (
            usage(
                charge_category="Purchase",
                charge_frequency="Usage-Based",
                consumed_quantity=None,
                consumed_unit=None,
            ),
            "charge_frequency",
        ),
        (usage(billed_cost=0.5), "billed_cost"),
        (usage(x_energy_kwh=Decimal("1e-19")), "x_energy_kwh"),
        (usage(description=" "), "description"),
    ],
)
def test_errors_name_the_field(charge: FocusCharge, field: str) -> None:
    with pytest.raises(FocusError) as error:
        focus_frame([charge])
    assert error.value.field == field
    assert charge.line_id in str(error.value) and field in str(error.value)


cents = st.integers(min_value=-(10**9), max_value=10**9).map(lambda n: Decimal(n).scaleb(-2))


@settings(max_examples=60, deadline=None)
@given(st.lists(cents, min_size=1, max_size=30))
def test_sum_of_billed_cost_is_exact(amounts: list[Decimal]) -> None:
    charges = [other("Adjustment", str(a), line_id=f"adj/{i}") for i, a in enumerate(amounts)]
    frame = focus_frame(charges)
    assert sum(frame["BilledCost"].to_list(), Decimal(0)) == sum(amounts, Decimal(0))
    assert frame["BilledCost"].sum() == sum(amounts, Decimal(0))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=0, max_value=10**12),
    st.integers(min_value=0, max_value=10**6).map(lambda n: Decimal(n).scaleb(-4)),
)
def test_usage_list_cost_matches_any_tokens_and_price(tokens: int, price: Decimal) -> None:
    exact = price * Decimal(tokens) / Decimal(1_000_000)
    billed = exact.quantize(Decimal("0.01"))
    row = focus_frame([usage(tokens, str(price), str(billed))]).row(0, named=True)
    assert row["ListCost"] == exact
    assert row["BilledCost"] == billed


def test_csv_and_parquet_round_trip(tmp_path: Path) -> None:
    frame = focus_frame(invoice())
    csv_path, parquet_path = write_focus(frame, tmp_path / "out")
    assert (csv_path.name, parquet_path.name) == ("focus.csv", "focus.parquet")
    assert read_focus_csv(csv_path).equals(frame)
    assert pl.read_parquet(parquet_path).equals(frame)
    assert sorted(p.name for p in csv_path.parent.iterdir()) == ["focus.csv", "focus.parquet"]


def test_csv_text_is_what_the_validator_reads(tmp_path: Path) -> None:
    csv_data, _ = focus_bytes(
        focus_frame([usage(1_234_567, "0.20", "0.25"), other("Tax", "12.00")])
    )
    text = csv_data.decode()
    header, first, tax = text.splitlines()
    assert header.split(",")[: len(FOCUS_COLUMNS)] == list(FOCUS_COLUMNS)
    assert "2026-03-01T00:00:00Z" in first and "+00" not in text  # UTC, Z, whole seconds
    assert ",0.2469134," in first and ",1234567.0," in first  # exact, typed Decimal
    assert tax.startswith("12.0,")
    assert "E" not in ",".join(v for v in first.split(",") if v[:1].isdigit())


def test_write_focus_replaces_atomically(tmp_path: Path) -> None:
    write_focus(focus_frame(invoice()), tmp_path)
    csv_path, _ = write_focus(focus_frame([usage()]), tmp_path)
    assert read_focus_csv(csv_path).height == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_write_focus_refuses_a_frame_that_is_not_focus(tmp_path: Path) -> None:
    frame = focus_frame([usage()]).drop("BilledCost")
    with pytest.raises(ValueError, match="BilledCost"):
        write_focus(frame, tmp_path)
    money_as_float = focus_frame([usage()]).with_columns(pl.col("BilledCost").cast(pl.Float64))
    with pytest.raises(ValueError, match="BilledCost"):
        write_focus(money_as_float, tmp_path)
