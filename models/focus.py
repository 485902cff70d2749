"""FOCUS 1.2 cost-and-usage rows from gpuledger's invoice charges (pure: no file I/O).

FOCUS, the FinOps Open Cost and Usage Specification, is the FinOps Foundation's common
format for billing data; `focus_frame` maps `FocusCharge` rows to its CostAndUsage
dataset, and `pipelines.billing.focus_export` writes the frame to CSV and Parquet.

Sources
- FOCUS 1.2 specification: https://focus.finops.org/focus-specification/v1-2/
  (columns in https://github.com/FinOps-Open-Cost-and-Usage-Spec/FOCUS_Spec,
  `specification/columns/*.md`).
- The FinOps Foundation's focus-validator 2.2.1 (PyPI `focus-validator`), whose rule
  model `model-1.2.0.1.json` (FOCUS 1.2) says which columns are Mandatory and which are
  Conditional on an applicability criterion. The export passes it with the criteria in
  `FOCUS_APPLICABILITY_CRITERIA` (tests/integration/test_focus_validator.py).

Columns (FOCUS column ← our field; M = Mandatory, C = Conditional, R = Recommended)
| FOCUS column        |   | value                                                         |
| BilledCost          | M | billed_cost (already at the currency's minor unit)            |
| BillingAccountId    | M | tenant                                                        |
| BillingAccountName  | M | tenant_name                                                   |
| BillingCurrency     | M | currency                                                      |
| BillingPeriodEnd    | M | billing_period_end (exclusive)                                |
| BillingPeriodStart  | M | billing_period_start                                          |
| ChargeCategory      | M | charge_category                                               |
| ChargeClass         | M | "Correction" when is_correction, else null                    |
| ChargeDescription   | M | description                                                   |
| ChargeFrequency     | R | charge_frequency, else Usage → "Usage-Based", others "One-Time" |
| ChargePeriodEnd     | M | charge_period_end (exclusive)                                 |
| ChargePeriodStart   | M | charge_period_start                                           |
| ConsumedQuantity    | C | consumed_quantity (Usage rows only; USAGE_MEASUREMENT)        |
| ConsumedUnit        | C | consumed_unit                                                 |
| ContractedCost      | M | = ListCost: no negotiated prices, our list prices are the deal |
| ContractedUnitPrice | C | = ListUnitPrice                                               |
| EffectiveCost       | M | = BilledCost: nothing prepaid is amortized into a row         |
| InvoiceId           | R | invoice_id (null while the invoice is a draft)                |
| InvoiceIssuerName   | M | invoice_issuer                                                |
| ListCost            | M | list_unit_price × pricing_quantity, exact; else BilledCost    |
| ListUnitPrice       | C | list_unit_price (PUBLIC_PRICE_LIST)                           |
| PricingCategory     | C | "Standard" on rows with a list price, null otherwise          |
| PricingQuantity     | M | pricing_quantity                                              |
| PricingUnit         | M | pricing_unit                                                  |
| ProviderName        | M | provider_name                                                 |
| PublisherName       | M | provider_name: we publish the service we sell                 |
| ServiceCategory     | M | "AI and Machine Learning"                                     |
| ServiceName         | M | service_name                                                  |
| ServiceSubcategory  | R | "Generative AI"                                               |
| SkuId               | C | sku_id (UNIT_PRICING)                                         |
| SkuMeter            | C | sku_meter, else "<Class> Tokens" or the consumed unit         |
| SkuPriceDetails     | C | JSON of the x_ pricing dimensions when sku_price_id is set    |
| SkuPriceId          | C | sku_price_id                                                  |
| x_LineId, x_Model, x_GpuType, x_TokenClass, x_Tier, x_TouWindow, x_EnergyKwh,       |
| x_GpuSeconds, x_IdlePolicy, x_AdjustsInvoiceId ← line_id and the x_ fields          |

Decisions that are not obvious
- ListCost and ContractedCost are the exact product ListUnitPrice × PricingQuantity
  (rule ListCost-C-009-C / ContractedCost-C-009-C), which can carry digits below the
  minor unit; BilledCost and EffectiveCost are what the invoice charges, rounded. So
  the two differ by less than one minor unit per row, and `focus_frame` refuses a row
  where they differ by more (the charge and its price disagree).
- Tax rows carry no price, quantity, SKU or PricingCategory (each MUST be null for
  "Tax"); their ListCost/ContractedCost/EffectiveCost equal BilledCost (the tax is on
  the billed amounts, and list = contracted = billed to within rounding).
- Credit rows (prepaid credits applied, credit notes): ListCost = ContractedCost =
  EffectiveCost = BilledCost (ListCost-C-008-C, ContractedCost-C-008-C,
  EffectiveCost-C-010-C); no consumed quantity (ConsumedQuantity is for "Usage").
- A minimum-commitment true-up is not consumption, tax or a credit, and buys nothing
  new: FOCUS's "Adjustment" ("charges the service provider applies that do not fall
  into other category values"), with ChargeFrequency "Recurring" (it follows the
  monthly contract, whether or not the service was used), and no SKU or price.
- Corrections (late usage of an earlier, invoiced period; credit-note rows): ChargeClass
  "Correction"; the rows keep the category of what they correct, their ChargePeriod is
  the corrected period, their BillingPeriod the one they are invoiced in. Price and
  quantity may be null there, and ListCost = BilledCost (corrections may differ from
  price × quantity, ListCost-C-010-C).
- Money is polars Decimal(38, 18), never float: Parquet gets DECIMAL, which the
  validator types as Decimal; the CSV writer prints the digits of the Decimal. A value
  that needs more than 18 decimal places is refused rather than rounded.
- Timestamps are Datetime(us, UTC) in the frame (Parquet TIMESTAMP WITH TIME ZONE); the
  CSV writer prints them as `2026-03-01T00:00:00Z`, the form the validator accepts.
  So they must be whole seconds, and UTC.
- Columns not emitted: BillingAccountType (one account type), SubAccount*, Region*,
  AvailabilityZone, Tags, Resource*, CommitmentDiscount*, CapacityReservation*,
  PricingCurrency* (pricing and billing currency are the same): their applicability
  criteria do not hold for us.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Context, Decimal
from typing import Final, Literal

import polars as pl

from models.errors import InputError
from models.money import is_at_minor_unit, minor_units, validate_currency

FOCUS_VERSION: Final = "1.2"
FOCUS_SPEC_URL: Final = "https://focus.finops.org/focus-specification/v1-2/"

ChargeCategory = Literal["Usage", "Purchase", "Tax", "Credit", "Adjustment"]
ChargeFrequency = Literal["One-Time", "Recurring", "Usage-Based"]

SERVICE_CATEGORY: Final = "AI and Machine Learning"
#: Its parent is SERVICE_CATEGORY, as FOCUS 1.2's list of subcategories requires.
SERVICE_SUBCATEGORY: Final = "Generative AI"
#: Our prices are predetermined for the billing account (rate card), not dynamic.
PRICING_CATEGORY: Final = "Standard"
CORRECTION: Final = "Correction"

#: The focus-validator applicability criteria that hold for gpuledger: billing accounts
#: have names, the rate card is a published list of unit prices per SKU, and usage is
#: measured. Every other criterion (regions, tags, sub-accounts, commitment discounts,
#: negotiated prices, two currencies, ...) does not apply.
FOCUS_APPLICABILITY_CRITERIA: Final = (
    "ACCOUNT_NAMING_SUPPORTED",
    "PUBLIC_PRICE_LIST_SUPPORTED",
    "UNIT_PRICING_SUPPORTED",
    "USAGE_MEASUREMENT_SUPPORTED",
)

#: FOCUS columns, alphabetical; the spec wants them before every custom column.
FOCUS_COLUMNS: Final = (
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountStatus",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceId",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingCurrency",
    "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceDetails",
    "SkuPriceId",
)
#: Custom columns: the x_ prefix keeps them apart from FOCUS columns, now and later.
CUSTOM_COLUMNS: Final = (
    "x_LineId",
    "x_Model",
    "x_GpuType",
    "x_TokenClass",
    "x_Tier",
    "x_TouWindow",
    "x_EnergyKwh",
    "x_GpuSeconds",
    "x_IdlePolicy",
    "x_AdjustsInvoiceId",
)
FOCUS_COLUMN_NAMES: Final = FOCUS_COLUMNS + CUSTOM_COLUMNS

#: FOCUS columns the spec marks Mandatory (no applicability criterion) in 1.2.
MANDATORY_COLUMNS: Final = frozenset(
    {
        "BilledCost",
        "BillingAccountId",
        "BillingAccountName",
        "BillingCurrency",
        "BillingPeriodEnd",
        "BillingPeriodStart",
        "ChargeCategory",
        "ChargeClass",
        "ChargeDescription",
        "ChargePeriodEnd",
        "ChargePeriodStart",
        "ContractedCost",
        "EffectiveCost",
        "InvoiceIssuerName",
        "ListCost",
        "PricingQuantity",
        "PricingUnit",
        "ProviderName",
        "PublisherName",
        "ServiceCategory",
        "ServiceName",
    }
)

#: Decimal places of every Decimal column: room for a unit price with 9 places times a
#: quantity with 9 (1e-6 M tokens), exactly, and 20 integer digits.
DECIMAL_SCALE: Final = 18
DECIMAL_DTYPE: Final = pl.Decimal(38, DECIMAL_SCALE)
TIMESTAMP_DTYPE: Final = pl.Datetime("us", "UTC")
_QUANTUM = Decimal(1).scaleb(-DECIMAL_SCALE)
_MAX_DECIMAL = Decimal(10) ** (38 - DECIMAL_SCALE)

_DECIMAL_COLUMNS = (
    "BilledCost",
    "ConsumedQuantity",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "ListCost",
    "ListUnitPrice",
    "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice",
    "PricingQuantity",
    "x_EnergyKwh",
    "x_GpuSeconds",
)
_TIMESTAMP_COLUMNS = (
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargePeriodEnd",
    "ChargePeriodStart",
)
SCHEMA: Final = pl.Schema(
    {
        name: (
            DECIMAL_DTYPE
            if name in _DECIMAL_COLUMNS
            else TIMESTAMP_DTYPE
            if name in _TIMESTAMP_COLUMNS
            else pl.Int32()
            if name == "x_Tier"
            else pl.String()
        )
        for name in FOCUS_COLUMN_NAMES
    }
)

_TOKEN_METERS = {
    "prompt": "Prompt Tokens",
    "completion": "Completion Tokens",
    "cached": "Cached Tokens",
}
_ZERO = timedelta(0)
_SCALED_UNIT = re.compile(r"([0-9]+)([KMB]) (.+)")
_UNIT_SCALES = {"K": 1_000, "M": 1_000_000, "B": 1_000_000_000}
_WIDE = Context(prec=80)


@dataclass(frozen=True)
class FocusCharge:
    """One charge row of an invoice (a line, or a line's share of one day), in gpuledger's terms."""

    line_id: (
        str  # stable id of the invoice line, e.g. "tokens/2026-03-01/llama-3.1-8b/completion/1"
    )
    tenant: str  # the billing account (our customer)
    tenant_name: str
    invoice_id: str | None  # None while the invoice is a draft
    invoice_issuer: str  # the operator issuing invoices, e.g. "gpuledger demo operator"
    provider_name: str  # same as issuer for us
    currency: str  # ISO 4217
    billing_period_start: datetime  # UTC, first instant of the month
    billing_period_end: datetime  # UTC, first instant of the next month (exclusive)
    charge_period_start: datetime  # UTC
    charge_period_end: datetime  # UTC (exclusive)
    charge_category: ChargeCategory
    # True for late-usage adjustments of an earlier, already invoiced period and for
    # credit-note rows
    is_correction: bool
    description: str
    billed_cost: Decimal  # already rounded to the currency's minor unit
    list_unit_price: Decimal | None  # price per pricing unit (e.g. per 1 M tokens)
    pricing_quantity: Decimal | None  # quantity in pricing units (e.g. 2.5 for 2.5 M tokens)
    pricing_unit: str | None  # "1M Tokens", "GPU-Hours", "kWh"
    consumed_quantity: Decimal | None  # e.g. 2500000
    consumed_unit: str | None  # "Tokens", "GPU-Hours", "kWh"
    sku_id: str | None  # e.g. "llama-3.1-8b/completion"
    sku_price_id: str | None  # e.g. "default@2026-01-01/llama-3.1-8b/completion/1"
    service_name: str  # "LLM Inference"
    x_model: str | None = None
    x_gpu_type: str | None = None
    x_token_class: str | None = None  # prompt | completion | cached
    x_tier: int | None = None
    x_tou_window: str | None = None
    x_energy_kwh: Decimal | None = None
    x_gpu_seconds: Decimal | None = None
    x_idle_policy: str | None = None
    x_adjusts_invoice_id: str | None = None  # the earlier invoice a correction refers to
    # Added: None derives it (Usage → "Usage-Based", every other category "One-Time");
    # a minimum-commitment true-up ("Adjustment") is "Recurring".
    charge_frequency: ChargeFrequency | None = None
    # Added: what the SKU meters; None derives it from the token class or consumed unit.
    sku_meter: str | None = None


class FocusError(InputError, ValueError):
    """A charge that cannot become a valid FOCUS row; names the line and the field."""

    def __init__(self, line_id: str, field: str, detail: str) -> None:
        super().__init__(f"FOCUS row {line_id!r}: {field}: {detail}")
        self.line_id = line_id
        self.field = field
        self.detail = detail


def focus_frame(charges: Sequence[FocusCharge]) -> pl.DataFrame:
    """FOCUS 1.2 CostAndUsage rows for `charges`, in order, with columns `FOCUS_COLUMN_NAMES`.

    Raises `FocusError` (naming the line and the field) for a charge that would break a
    FOCUS rule: a naive or non-UTC timestamp, an empty period, a cost not at the minor
    unit, a Tax row with a price, a Usage row without one, and so on.
    """
    rows = [_row(charge) for charge in charges]
    columns = {name: [row[name] for row in rows] for name in FOCUS_COLUMN_NAMES}
    # strict: a value of the wrong type is an error here, not a silent null.
    return pl.DataFrame(columns, schema=SCHEMA, strict=True)


def _row(c: FocusCharge) -> dict[str, object]:
    def fail(field: str, detail: str) -> FocusError:
        return FocusError(c.line_id, field, detail)

    for field in ("line_id", "tenant", "tenant_name", "invoice_issuer", "provider_name"):
        if not str(getattr(c, field)).strip():
            raise fail(field, "must not be empty (FOCUS: no empty strings)")
    for field in ("service_name", "description"):
        if not getattr(c, field).strip():
            raise fail(field, "must not be empty (FOCUS: no empty strings)")
    if c.invoice_id is not None and not c.invoice_id.strip():
        raise fail("invoice_id", "must be None (a draft) or a non-empty id")
    try:
        validate_currency(c.currency, "currency")
    except InputError as exc:
        raise fail("currency", str(exc)) from exc
    for field in ("billing_period_start", "billing_period_end"):
        _check_timestamp(c, field)
    for field in ("charge_period_start", "charge_period_end"):
        _check_timestamp(c, field)
    if c.billing_period_start >= c.billing_period_end:
        raise fail("billing_period_end", "must be after billing_period_start (exclusive end)")
    if c.charge_period_start >= c.charge_period_end:
        raise fail("charge_period_end", "must be after charge_period_start (exclusive end)")

    billed = _required_decimal(c, "billed_cost", c.billed_cost)
    if not is_at_minor_unit(billed, c.currency):
        raise fail("billed_cost", f"{billed} is not at the minor unit of {c.currency}")
    price = _decimal(c, "list_unit_price", c.list_unit_price)
    pricing_quantity = _decimal(c, "pricing_quantity", c.pricing_quantity)
    consumed_quantity = _decimal(c, "consumed_quantity", c.consumed_quantity)
    energy_kwh = _decimal(c, "x_energy_kwh", c.x_energy_kwh)
    gpu_seconds = _decimal(c, "x_gpu_seconds", c.x_gpu_seconds)
    if price is not None and price < 0:
        raise fail("list_unit_price", f"{price} is negative (FOCUS: a non-negative price)")

    # Null rules of FOCUS 1.2 that depend on the category and class of the row.
    category = c.charge_category
    if category == "Tax":
        for field in (
            "list_unit_price",
            "pricing_quantity",
            "pricing_unit",
            "sku_id",
            "sku_price_id",
        ):
            if getattr(c, field) is not None:
                raise fail(
                    field, "must be None on a Tax row (FOCUS: null when ChargeCategory is Tax)"
                )
    if category in ("Usage", "Purchase") and not c.is_correction:
        for field in (
            "list_unit_price",
            "pricing_quantity",
            "pricing_unit",
            "sku_id",
            "sku_price_id",
        ):
            if getattr(c, field) is None:
                raise fail(field, f"is required on a {category} row that is not a correction")
    if category == "Usage" and not c.is_correction and consumed_quantity is None:
        raise fail("consumed_quantity", "is required on a Usage row that is not a correction")
    if category != "Usage" and consumed_quantity is not None:
        raise fail("consumed_quantity", f"must be None on a {category} row (FOCUS: Usage only)")
    if (pricing_quantity is None) != (c.pricing_unit is None):
        raise fail("pricing_unit", "must be set exactly when pricing_quantity is set")
    if (consumed_quantity is None) != (c.consumed_unit is None):
        raise fail("consumed_unit", "must be set exactly when consumed_quantity is set")
    if c.sku_price_id is not None and c.sku_id is None:
        raise fail("sku_id", "is required when sku_price_id is set (a price belongs to a SKU)")
    for field in ("pricing_unit", "consumed_unit", "sku_id", "sku_price_id", "sku_meter"):
        value = getattr(c, field)
        if value is not None and not value.strip():
            raise fail(field, "must be None or non-empty (FOCUS: no empty strings)")

    frequency = c.charge_frequency or ("Usage-Based" if category == "Usage" else "One-Time")
    if category == "Purchase" and frequency == "Usage-Based":
        raise fail("charge_frequency", "a Purchase cannot be Usage-Based (FOCUS 1.2)")

    list_cost = billed
    if price is not None and pricing_quantity is not None and not c.is_correction:
        # 80 digits hold any product of two 38-digit decimals: this never rounds.
        product = _WIDE.multiply(price, pricing_quantity)
        list_cost = _required_decimal(c, "list_unit_price × pricing_quantity", product)
        # Largest-remainder day shares and half-even rounding both keep the billed
        # amount within one minor unit of price × quantity; more means they disagree.
        if abs(list_cost - billed) >= Decimal(1).scaleb(-minor_units(c.currency)):
            raise fail(
                "billed_cost",
                f"{billed} is not list_unit_price × pricing_quantity = {list_cost} "
                f"to within one minor unit of {c.currency}",
            )

    sku_meter = c.sku_meter
    if sku_meter is None and c.sku_id is not None:
        sku_meter = _TOKEN_METERS.get(c.x_token_class or "", c.consumed_unit or c.pricing_unit)

    return {
        "BilledCost": billed,
        "BillingAccountId": c.tenant,
        "BillingAccountName": c.tenant_name,
        "BillingCurrency": c.currency,
        "BillingPeriodEnd": c.billing_period_end,
        "BillingPeriodStart": c.billing_period_start,
        "ChargeCategory": category,
        "ChargeClass": CORRECTION if c.is_correction else None,
        "ChargeDescription": c.description,
        "ChargeFrequency": frequency,
        "ChargePeriodEnd": c.charge_period_end,
        "ChargePeriodStart": c.charge_period_start,
        "CommitmentDiscountStatus": None,
        "ConsumedQuantity": consumed_quantity,
        "ConsumedUnit": _unit_format(c.consumed_unit),
        "ContractedCost": list_cost,
        "ContractedUnitPrice": price,
        "EffectiveCost": billed,
        "InvoiceId": c.invoice_id,
        "InvoiceIssuerName": c.invoice_issuer,
        "ListCost": list_cost,
        "ListUnitPrice": price,
        "PricingCategory": PRICING_CATEGORY if price is not None else None,
        "PricingCurrency": c.currency,
        "PricingCurrencyContractedUnitPrice": price,
        "PricingCurrencyEffectiveCost": billed,
        "PricingCurrencyListUnitPrice": price,
        "PricingQuantity": pricing_quantity,
        "PricingUnit": _unit_format(c.pricing_unit),
        "ProviderName": c.provider_name,
        "PublisherName": c.provider_name,
        "ServiceCategory": SERVICE_CATEGORY,
        "ServiceName": c.service_name,
        "ServiceSubcategory": SERVICE_SUBCATEGORY,
        "SkuId": c.sku_id,
        "SkuMeter": sku_meter,
        "SkuPriceDetails": _sku_price_details(c),
        "SkuPriceId": c.sku_price_id,
        "x_LineId": c.line_id,
        "x_Model": c.x_model,
        "x_GpuType": c.x_gpu_type,
        "x_TokenClass": c.x_token_class,
        "x_Tier": c.x_tier,
        "x_TouWindow": c.x_tou_window,
        "x_EnergyKwh": energy_kwh,
        "x_GpuSeconds": gpu_seconds,
        "x_IdlePolicy": c.x_idle_policy,
        "x_AdjustsInvoiceId": c.x_adjusts_invoice_id,
    }


def _unit_format(unit: str | None) -> str | None:
    """`unit` in FOCUS Unit Format: a unit quantity is a whole number, so "1M Tokens"
    becomes "1000000 Tokens" (K, M, B: thousand, million, billion)."""
    if unit is None:
        return None
    match = _SCALED_UNIT.fullmatch(unit)
    if match is None:
        return unit
    count, suffix, name = match.groups()
    return f"{int(count) * _UNIT_SCALES[suffix]} {name}"


def _sku_price_details(c: FocusCharge) -> str | None:
    """The price's dimensions as a FOCUS Key-Value (JSON object) with x_ keys; null
    without a SkuPriceId (SkuPriceDetails-C-004-C)."""
    if c.sku_price_id is None:
        return None
    # Only what the price depends on (SkuPriceDetails-C-008-M): a token price on the
    # model, class and tier, not on the GPU that served the tokens.
    dimensions: tuple[tuple[str, str | int | None], ...]
    if c.x_token_class is not None:
        dimensions = (
            ("x_Model", c.x_model),
            ("x_TokenClass", c.x_token_class),
            ("x_Tier", c.x_tier),
        )
    else:
        dimensions = (("x_GpuType", c.x_gpu_type), ("x_TouWindow", c.x_tou_window))
    details = {key: value for key, value in dimensions if value is not None}
    return json.dumps(details, sort_keys=True, separators=(",", ":")) if details else None


def _check_timestamp(c: FocusCharge, field: str) -> None:
    value = getattr(c, field)
    if not isinstance(value, datetime):
        raise FocusError(c.line_id, field, f"{value!r} is not a datetime")
    if value.tzinfo is None or value.utcoffset() != _ZERO:
        raise FocusError(c.line_id, field, f"{value.isoformat()} is not UTC (FOCUS: UTC, Z)")
    if value.microsecond:
        # FOCUS's date/time format has whole seconds (YYYY-MM-DDTHH:mm:ssZ).
        raise FocusError(c.line_id, field, f"{value.isoformat()} is not a whole second")


def _decimal(c: FocusCharge, field: str, value: Decimal | None) -> Decimal | None:
    return None if value is None else _required_decimal(c, field, value)


def _required_decimal(c: FocusCharge, field: str, value: Decimal) -> Decimal:
    """`value` at DECIMAL_SCALE places, exactly; refuses floats and values that would round."""
    if not isinstance(value, Decimal):
        raise FocusError(c.line_id, field, f"{value!r} is not a Decimal (money is never float)")
    if not value.is_finite():
        raise FocusError(c.line_id, field, f"{value} is not a finite number")
    if abs(value) >= _MAX_DECIMAL:
        raise FocusError(
            c.line_id, field, f"{value} has more than {38 - DECIMAL_SCALE} integer digits"
        )
    # 80 digits: quantize never rounds in the context, so a lost digit shows below.
    exact = value.quantize(_QUANTUM, context=_WIDE)
    if exact != value:
        raise FocusError(c.line_id, field, f"{value} has more than {DECIMAL_SCALE} decimal places")
    return exact
