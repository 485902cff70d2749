"""Rate card: what each tenant pays, validated, in Decimal, from one YAML document.

Shape (every price a decimal string, an int or a YAML number read as its text)::

    currency: EUR                # ISO 4217; its minor unit sets every rounding
    tax_rate: "0.19"             # fraction of the taxable subtotal
    tou_timezone: Europe/Berlin  # time-of-use windows are hours of this zone's clock
    plans:
      default:                   # required: tenants without terms of their own
        - effective_from: 2026-01-01
          models:
            llama-3.1-8b:        # flat: one price per token class
              prompt_per_1m: "0.10"
              completion_per_1m: "0.40"
              cached_per_1m: "0.05"
            llama-3.1-70b:
              tier_mode: graduated          # or volume
              tiers:
                - {up_to_tokens: 1000000000, prompt_per_1m: "0.80", ...}
                - {up_to_tokens: null, prompt_per_1m: "0.60", ...}
          gpu_hour: {H100: "2.50"}          # per GPU-hour by GPU type
          energy:
            default_per_kwh: "0.12"
            windows: [{name: peak, start_hour: 17, end_hour: 21, per_kwh: "0.30"}]
          minimum_commitment: "100.00"      # per month
    tenants:
      acme:
        plan: default
        tax_rate: "0"                       # optional override (e.g. reverse charge)
        credits: [{amount: "500.00", granted_on: 2026-01-01}]

Rules, each named in validation errors with the field's path:
- the currency is an ISO 4217 code one can invoice in (`models.money`);
- prices are >= 0 and Decimal, never parsed through float: `load_rate_card` reads YAML
  numbers with a fraction (`0.10`) as `Decimal` of their text, so no binary error
  enters; the models refuse floats built in code;
- amounts billed as such (minimum commitment, credits) fit the currency's minor unit;
- a model name must be one the fleet serves, when validation is given
  `context={"known_models": {...}}`;
- tiers have strictly increasing `up_to_tokens` (inclusive upper bounds), the last one
  open (`null`); a flat price has exactly one tier;
- time-of-use windows are `[start_hour, end_hour)` on the clock, sorted and disjoint;
  a window across midnight is written as two windows;
- a plan's versions are sorted by `effective_from`, strictly; the version in force on
  a day is the last one that started on or before it.

Tiers count each token class of a model separately (uncached prompt, completion,
cached) over the calendar month: graduated tiers price each slice of the month's
volume at its tier's price; volume tiers price the whole month at the tier reached.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.errors import InputError
from models.money import is_at_minor_unit, minor_units, to_decimal, validate_currency

TierMode = Literal["flat", "graduated", "volume"]
TokenClass = Literal["prompt", "completion", "cached"]
TOKEN_CLASSES: tuple[TokenClass, ...] = ("prompt", "completion", "cached")

#: Same rule as the usage event's `subject`.
TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DEFAULT_PLAN = "default"


class RateCardFieldError(ValueError):
    """Raised inside validators for a problem below the validated value; `field` is the
    path under it (e.g. `tiers.1.up_to_tokens`), appended to pydantic's location."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def _decimal(value: Any) -> Decimal:
    # MoneyError is a ValueError: pydantic reports it at the field's location.
    return to_decimal(value, "value")


#: A price or rate: Decimal from Decimal, int or decimal string; floats refused.
Price = Annotated[Decimal, BeforeValidator(_decimal), Field(ge=0)]
Amount = Annotated[Decimal, BeforeValidator(_decimal), Field(ge=0)]
Rate = Annotated[Decimal, BeforeValidator(_decimal), Field(ge=0, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenPrices(_Strict):
    """Prices per 1 M tokens of each class."""

    prompt_per_1m: Price = Field(description="per 1 M uncached prompt tokens")
    completion_per_1m: Price = Field(description="per 1 M completion tokens")
    cached_per_1m: Price = Field(description="per 1 M prompt tokens served from cache")

    def per_1m(self, token_class: TokenClass) -> Decimal:
        if token_class == "prompt":
            return self.prompt_per_1m
        if token_class == "completion":
            return self.completion_per_1m
        return self.cached_per_1m


class PriceTier(TokenPrices):
    """Prices for the month's tokens of a class above the previous tier, up to
    `up_to_tokens` inclusive (`None`: no upper bound)."""

    up_to_tokens: int | None = Field(default=None, gt=0, strict=True)


class ModelPricing(_Strict):
    """A model's token prices: flat (one tier), graduated or volume tiers."""

    tier_mode: TierMode = "flat"
    tiers: list[PriceTier] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _flat_shorthand(cls, data: Any) -> Any:
        # `{prompt_per_1m: ..., ...}` with no `tiers` is a flat price: one open tier.
        if isinstance(data, Mapping) and "tiers" not in data and "prompt_per_1m" in data:
            prices = {k: v for k, v in data.items() if k != "tier_mode"}
            shaped: dict[str, Any] = {"tiers": [prices]}
            if "tier_mode" in data:
                shaped["tier_mode"] = data["tier_mode"]
            return shaped
        return data

    @model_validator(mode="after")
    def _tiers_sorted(self) -> ModelPricing:
        if self.tier_mode == "flat" and len(self.tiers) != 1:
            raise RateCardFieldError("tiers", "a flat price has exactly one tier")
        previous = 0
        for i, tier in enumerate(self.tiers):
            last = i == len(self.tiers) - 1
            if tier.up_to_tokens is None:
                if not last:
                    raise RateCardFieldError(
                        f"tiers.{i}.up_to_tokens", "only the last tier may be open (null)"
                    )
                continue
            if last:
                raise RateCardFieldError(
                    f"tiers.{i}.up_to_tokens",
                    "the last tier must be open (null) so that every volume has a price",
                )
            if tier.up_to_tokens <= previous:
                raise RateCardFieldError(
                    f"tiers.{i}.up_to_tokens",
                    f"{tier.up_to_tokens} is not above the previous tier's bound ({previous}):"
                    " tiers overlap or are unsorted",
                )
            previous = tier.up_to_tokens
        return self


class TouWindow(_Strict):
    """Hours `[start_hour, end_hour)` of the rate card's clock at their own price."""

    name: str = Field(min_length=1, max_length=64)
    start_hour: int = Field(ge=0, le=23, strict=True)
    end_hour: int = Field(ge=1, le=24, strict=True)
    per_kwh: Price

    @model_validator(mode="after")
    def _ordered(self) -> TouWindow:
        if self.end_hour <= self.start_hour:
            raise RateCardFieldError(
                "end_hour",
                f"{self.end_hour} is not after start_hour {self.start_hour}; "
                "split a window across midnight in two",
            )
        return self


class EnergyPricing(_Strict):
    """Price per kWh: `default_per_kwh` outside every window."""

    default_per_kwh: Price
    windows: list[TouWindow] = Field(default_factory=list)

    @model_validator(mode="after")
    def _windows_disjoint(self) -> EnergyPricing:
        names = [w.name for w in self.windows]
        if len(set(names)) != len(names) or "off_peak" in names:
            raise RateCardFieldError("windows", "window names must be unique and not off_peak")
        for i in range(1, len(self.windows)):
            before, window = self.windows[i - 1], self.windows[i]
            if window.start_hour < before.end_hour:
                raise RateCardFieldError(
                    f"windows.{i}.start_hour",
                    f"window {window.name!r} starts at {window.start_hour}, before "
                    f"{before.name!r} ends ({before.end_hour}): windows overlap or are unsorted",
                )
        return self

    def window_at(self, hour: int) -> TouWindow | None:
        """The window holding clock hour `hour` (0-23), or None (off-peak)."""
        for window in self.windows:
            if window.start_hour <= hour < window.end_hour:
                return window
        return None


class PlanVersion(_Strict):
    """A plan's prices from `effective_from` (00:00 UTC) until the next version."""

    effective_from: date
    models: dict[str, ModelPricing] = Field(default_factory=dict)
    gpu_hour: dict[str, Price] = Field(default_factory=dict, description="per GPU-hour by type")
    energy: EnergyPricing | None = None
    minimum_commitment: Amount = Field(default=Decimal(0), description="per calendar month")

    @field_validator("models")
    @classmethod
    def _known_models(
        cls, models: dict[str, ModelPricing], info: ValidationInfo
    ) -> dict[str, ModelPricing]:
        known = (info.context or {}).get("known_models")
        if known is not None:
            for name in models:
                if name not in known:
                    raise RateCardFieldError(
                        name,
                        f"unknown model {name!r}; the fleet serves {sorted(known)}",
                    )
        return models


class CreditGrant(_Strict):
    """Prepaid credit added to the tenant's balance on `granted_on`."""

    amount: Amount
    granted_on: date


class TenantTerms(_Strict):
    """A tenant's plan, prepaid credits and, where it differs, its tax rate."""

    plan: str = DEFAULT_PLAN
    tax_rate: Rate | None = None
    credits: list[CreditGrant] = Field(default_factory=list)


class RateCard(_Strict):
    """The whole rate card; see the module docstring."""

    currency: str
    tax_rate: Rate = Decimal(0)
    tou_timezone: str = "UTC"
    plans: dict[str, list[PlanVersion]]
    tenants: dict[str, TenantTerms] = Field(default_factory=dict)

    @field_validator("currency")
    @classmethod
    def _currency(cls, code: str) -> str:
        return validate_currency(code, "currency")

    @field_validator("tou_timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{name!r} is not an IANA time zone") from None
        return name

    @field_validator("plans")
    @classmethod
    def _plans(cls, plans: dict[str, list[PlanVersion]]) -> dict[str, list[PlanVersion]]:
        if DEFAULT_PLAN not in plans:
            raise RateCardFieldError(DEFAULT_PLAN, "the default plan is required")
        for name, versions in plans.items():
            if not versions:
                raise RateCardFieldError(name, "a plan needs at least one version")
            for i in range(1, len(versions)):
                if versions[i].effective_from <= versions[i - 1].effective_from:
                    raise RateCardFieldError(
                        f"{name}.{i}.effective_from",
                        f"{versions[i].effective_from} is not after the previous version's "
                        f"{versions[i - 1].effective_from}: versions must be sorted, strictly",
                    )
        return plans

    @field_validator("tenants")
    @classmethod
    def _tenant_ids(cls, tenants: dict[str, TenantTerms]) -> dict[str, TenantTerms]:
        for tenant in tenants:
            if not re.match(TENANT_ID_PATTERN, tenant):
                raise RateCardFieldError(tenant, f"{tenant!r} is not a tenant id")
        return tenants

    @model_validator(mode="after")
    def _cross_field(self) -> RateCard:
        for tenant, terms in self.tenants.items():
            if terms.plan not in self.plans:
                raise RateCardFieldError(
                    f"tenants.{tenant}.plan",
                    f"unknown plan {terms.plan!r}; the card has {sorted(self.plans)}",
                )
            for i, grant in enumerate(terms.credits):
                self._check_minor(grant.amount, f"tenants.{tenant}.credits.{i}.amount")
        for name, versions in self.plans.items():
            for i, version in enumerate(versions):
                self._check_minor(
                    version.minimum_commitment, f"plans.{name}.{i}.minimum_commitment"
                )
        return self

    def _check_minor(self, amount: Decimal, field: str) -> None:
        if not is_at_minor_unit(amount, self.currency):
            raise RateCardFieldError(
                field,
                f"{amount} has more decimal places than {self.currency} allows "
                f"({minor_units(self.currency)})",
            )

    def terms_for(self, tenant: str) -> TenantTerms:
        """The tenant's terms; a tenant the card does not name gets the default plan."""
        return self.tenants.get(tenant, TenantTerms())

    def versions_for(self, tenant: str) -> list[PlanVersion]:
        return self.plans[self.terms_for(tenant).plan]

    def tax_rate_for(self, tenant: str) -> Decimal:
        override = self.terms_for(tenant).tax_rate
        return self.tax_rate if override is None else override


class InvalidRateCard(InputError):
    """A rate card that does not validate; names the source, the field and the rule."""

    def __init__(self, source: str, field: str, detail: str, *, more: int = 0) -> None:
        extra = f" (and {more} more problem{'s' if more != 1 else ''})" if more else ""
        super().__init__(f"{source}: {field}: {detail}{extra}")
        self.source = source
        self.field = field
        self.detail = detail


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    loc = [str(part) for part in error.get("loc", ())]
    message = str(error.get("msg", "invalid"))
    cause = (error.get("ctx") or {}).get("error")
    field_error = getattr(cause, "field", None)
    detail = getattr(cause, "detail", None)
    if isinstance(field_error, str) and isinstance(detail, str):
        # RateCardFieldError and MoneyError carry the path below the validated value.
        if not isinstance(cause, RateCardFieldError):
            field_error = ""  # MoneyError's field is a generic name; the loc says where
        if field_error:
            loc.append(field_error)
        message = detail
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return ".".join(loc) or "(card)", message


class _DecimalLoader(yaml.SafeLoader):
    """Safe YAML loader that reads numbers with a fraction as `Decimal` of their text."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        value = Decimal(text)
    except ArithmeticError:
        value = Decimal("NaN")
    if not value.is_finite():
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a finite decimal number", node.start_mark
        )
    return value


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def load_rate_card(
    text: str,
    *,
    known_models: set[str] | frozenset[str] | None = None,
    source: str = "rate card",
) -> RateCard:
    """Parse and validate a YAML rate card, or raise `InvalidRateCard`.

    YAML floats never become Python floats: the loader builds `Decimal` from the
    scalar's own text (`0.1` stays exactly one tenth). `known_models`, when given, is
    the set of model names a card may price.
    """
    try:
        document = yaml.load(text, Loader=_DecimalLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise InvalidRateCard(source, "(yaml)", f"not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRateCard(source, "(card)", "expected a mapping at the top level")
    return validate_rate_card(document, known_models=known_models, source=source)


def validate_rate_card(
    document: Mapping[str, Any],
    *,
    known_models: set[str] | frozenset[str] | None = None,
    source: str = "rate card",
) -> RateCard:
    """Validate an already-parsed rate card document, or raise `InvalidRateCard`."""
    context = {"known_models": frozenset(known_models)} if known_models is not None else {}
    try:
        return RateCard.model_validate(dict(document), context=context)
    except ValidationError as exc:
        errors = exc.errors()
        field, detail = _describe(errors[0])
        raise InvalidRateCard(source, field, detail, more=len(errors) - 1) from None
