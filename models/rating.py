"""Rating: one tenant's month of usage and the rate card in, invoice lines and totals out.

Order of the invoice
1. Usage lines, each amount exact (Decimal arithmetic that may not round) and then
   rounded once, half-even, to the currency's minor unit:
   - tokens: per plan version in force, model, token class (uncached prompt,
     completion, cached) and tier. Graduated tiers price each slice of the month's
     running volume at its tier's price (a slice that crosses a bound is two lines);
     volume tiers price the segment's tokens at the tier that the month's whole volume
     reaches. A bound is inclusive: exactly `up_to_tokens` tokens stay in that tier.
   - GPU-hours: per version and GPU type.
   - energy: per version and time-of-use window (`off_peak` outside every window),
     the window taken from the hour's start on the rate card's clock.
2. A price change inside the month (a plan version with `effective_from` in it) splits
   the lines: each day's usage is priced by the version in force on that UTC day.
   Tier volumes still run over the whole month across the change.
3. Commitment true-up: when the usage subtotal is below the minimum commitment of the
   version in force on the month's last day, a line for the difference.
   Then adjustments: lines correcting earlier, finalized months (late usage), given
   by the caller already rounded.
4. Prepaid credits: the opening balance plus credits granted in the month pay for the
   subtotal (after true-up) as far as they go, as one negative line; the rest of the
   balance carries to the next month (`Invoice.closing_credit`). Credits were bought
   as prepayment, so they reduce the taxable base.
5. Tax: the tax rate times the taxable subtotal, rounded once, as one line.

Every line is at the minor unit, so the lines add up to `Invoice.total` exactly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import (
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from models.errors import InputError
from models.money import is_at_minor_unit, round_line, to_decimal
from models.rate_card import (
    TENANT_ID_PATTERN,
    TOKEN_CLASSES,
    ModelPricing,
    PlanVersion,
    RateCard,
    TokenClass,
)

LineKind = Literal["tokens", "gpu", "energy", "commitment", "adjustment", "credit", "tax"]
USAGE_KINDS: frozenset[str] = frozenset({"tokens", "gpu", "energy"})
TOKENS_PER_PRICE_UNIT = 1_000_000
OFF_PEAK = "off_peak"

#: Exact arithmetic: any operation that would have to round raises instead, so the
#: only rounding of a line is the one in `round_line`.
_EXACT = Context(
    prec=80,
    rounding=ROUND_HALF_EVEN,
    traps=[Inexact, InvalidOperation, Overflow, DivisionByZero],
)


def _quantity(value: Any) -> Decimal:
    return to_decimal(value, "quantity")


Quantity = Annotated[Decimal, BeforeValidator(_quantity), Field(ge=0)]
TokenCount = Annotated[int, Field(ge=0, strict=True)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class TokenUsage(_Input):
    """Tokens of one model on one UTC day; `prompt_tokens` includes `cached_tokens`
    (as in the usage event), which are billed at the cached price instead."""

    day: date
    model: str = Field(min_length=1)
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    cached_tokens: TokenCount = 0

    @model_validator(mode="after")
    def _cached_within_prompt(self) -> TokenUsage:
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError(
                f"cached_tokens ({self.cached_tokens}) exceeds prompt_tokens ({self.prompt_tokens})"
            )
        return self

    def tokens(self, token_class: TokenClass) -> int:
        if token_class == "prompt":
            return self.prompt_tokens - self.cached_tokens
        if token_class == "completion":
            return self.completion_tokens
        return self.cached_tokens


class GpuUsage(_Input):
    """GPU-hours of one GPU type on one UTC day."""

    day: date
    gpu_type: str = Field(min_length=1)
    gpu_hours: Quantity


class EnergyUsage(_Input):
    """Energy of one clock hour, starting at `hour_utc` (timezone-aware, on the hour)."""

    hour_utc: AwareDatetime
    kwh: Quantity

    @model_validator(mode="after")
    def _on_the_hour(self) -> EnergyUsage:
        start = self.hour_utc.astimezone(UTC)
        if (start.minute, start.second, start.microsecond) != (0, 0, 0):
            raise ValueError(f"hour_utc {self.hour_utc.isoformat()} is not on the hour")
        return self

    @property
    def start_utc(self) -> datetime:
        return self.hour_utc.astimezone(UTC)


class MonthlyUsage(_Input):
    """A tenant's usage in one calendar month (UTC)."""

    tenant: str = Field(pattern=TENANT_ID_PATTERN)
    year: int = Field(ge=2000, le=2199)
    month: int = Field(ge=1, le=12)
    tokens: list[TokenUsage] = Field(default_factory=list)
    gpu: list[GpuUsage] = Field(default_factory=list)
    energy: list[EnergyUsage] = Field(default_factory=list)

    @property
    def start(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def end(self) -> date:
        """First day of the next month (exclusive)."""
        return date(self.year + self.month // 12, self.month % 12 + 1, 1)

    @model_validator(mode="after")
    def _inside_the_month(self) -> MonthlyUsage:
        days = [(f"tokens.{i}.day", u.day) for i, u in enumerate(self.tokens)]
        days += [(f"gpu.{i}.day", u.day) for i, u in enumerate(self.gpu)]
        days += [(f"energy.{i}.hour_utc", u.start_utc.date()) for i, u in enumerate(self.energy)]
        for field, day in days:
            if not self.start <= day < self.end:
                raise ValueError(f"{field}: {day} is outside {self.year}-{self.month:02d}")
        return self


class UnpricedUsage(InputError):
    """Usage the rate card has no price for; names the tenant, the field and why."""

    def __init__(self, tenant: str, field: str, detail: str) -> None:
        super().__init__(f"rating {tenant}: {field}: {detail}")
        self.tenant = tenant
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class InvoiceLine:
    """One line: `amount = round_line(quantity * unit_price / price_per)` for usage."""

    kind: LineKind
    description: str
    amount: Decimal
    quantity: Decimal = Decimal(0)
    unit: str = ""
    unit_price: Decimal = Decimal(0)
    price_per: int = 1
    #: Days the line covers, end exclusive (usage lines: the version's segment).
    period_start: date | None = None
    period_end: date | None = None
    model: str | None = None
    token_class: TokenClass | None = None
    #: 1-based tier of the model's price list.
    tier: int | None = None
    gpu_type: str | None = None
    tou_window: str | None = None
    #: Adjustment lines: the invoice, period and line they correct.
    adjusts_invoice: str | None = None
    adjusts_period: str | None = None
    adjusts_line: str | None = None

    @property
    def line_id(self) -> str:
        """A key that names the line within its invoice, stable across re-ratings of the
        same usage: `tokens/2026-03-01/llama-3.1-8b/completion/1`, `energy/2026-03-01/peak`."""
        parts: list[str] = [self.kind]
        if self.adjusts_period is not None:
            parts.append(self.adjusts_period)
        if self.adjusts_line is not None:
            return "/".join([*parts, self.adjusts_line])
        if self.period_start is not None and self.kind in USAGE_KINDS:
            parts.append(self.period_start.isoformat())
        for label in (self.model, self.token_class, self.tier, self.gpu_type, self.tou_window):
            if label is not None:
                parts.append(str(label))
        return "/".join(parts)


@dataclass(frozen=True)
class Invoice:
    """Lines and totals of one tenant's month; `sum(line.amount) == total`."""

    tenant: str
    year: int
    month: int
    currency: str
    lines: tuple[InvoiceLine, ...]
    usage_subtotal: Decimal
    commitment_true_up: Decimal
    adjustments_total: Decimal
    subtotal: Decimal
    credits_applied: Decimal
    taxable_subtotal: Decimal
    tax_rate: Decimal
    tax: Decimal
    total: Decimal
    opening_credit: Decimal
    credits_granted: Decimal
    closing_credit: Decimal


@dataclass(frozen=True)
class _Segment:
    index: int
    version: PlanVersion
    start: date
    end: date


def _segments(versions: Sequence[PlanVersion], start: date, end: date) -> list[_Segment]:
    segments = []
    for i, version in enumerate(versions):
        until = versions[i + 1].effective_from if i + 1 < len(versions) else end
        seg_start, seg_end = max(version.effective_from, start), min(until, end)
        if seg_start < seg_end:
            segments.append(_Segment(i, version, seg_start, seg_end))
    return segments


def _segment_on(segments: Sequence[_Segment], day: date) -> _Segment | None:
    for segment in segments:
        if segment.start <= day < segment.end:
            return segment
    return None


def _tier_slices(
    pricing: ModelPricing, offset: int, count: int, month_total: int
) -> list[tuple[int, int]]:
    """(tier index, tokens) for `count` tokens after `offset` tokens of the month."""
    if pricing.tier_mode == "volume":
        for i, tier in enumerate(pricing.tiers):
            if tier.up_to_tokens is None or month_total <= tier.up_to_tokens:
                return [(i, count)]
        raise AssertionError("validated tiers end with an open tier")
    slices = []
    low = 0
    for i, tier in enumerate(pricing.tiers):
        high = tier.up_to_tokens
        top = offset + count if high is None else min(high, offset + count)
        inside = top - max(low, offset)
        if inside > 0:
            slices.append((i, inside))
        if high is None:
            break
        low = high
    return slices


def _usage_line(
    currency: str,
    kind: LineKind,
    description: str,
    quantity: Decimal,
    unit: str,
    unit_price: Decimal,
    price_per: int,
    segment: _Segment,
    **labels: Any,
) -> InvoiceLine:
    with localcontext(_EXACT):
        exact = quantity * unit_price / Decimal(price_per)
    return InvoiceLine(
        kind=kind,
        description=description,
        amount=round_line(exact, currency),
        quantity=quantity,
        unit=unit,
        unit_price=unit_price,
        price_per=price_per,
        period_start=segment.start,
        period_end=segment.end,
        **labels,
    )


def _token_lines(
    card: RateCard, usage: MonthlyUsage, segments: Sequence[_Segment]
) -> list[InvoiceLine]:
    by_segment: dict[tuple[int, str, TokenClass], int] = defaultdict(int)
    month_totals: dict[tuple[str, TokenClass], int] = defaultdict(int)
    for i, item in enumerate(usage.tokens):
        segment = _segment_on(segments, item.day)
        if segment is None:
            raise UnpricedUsage(
                usage.tenant, f"tokens.{i}.day", f"no plan version is in force on {item.day}"
            )
        if item.model not in segment.version.models:
            raise UnpricedUsage(
                usage.tenant,
                f"tokens.{i}.model",
                f"model {item.model!r} has no price in the version effective from "
                f"{segment.version.effective_from}",
            )
        for token_class in TOKEN_CLASSES:
            count = item.tokens(token_class)
            by_segment[segment.index, item.model, token_class] += count
            month_totals[item.model, token_class] += count
    lines = []
    running: dict[tuple[str, TokenClass], int] = defaultdict(int)
    for segment in segments:
        for model in sorted({m for (s, m, _) in by_segment if s == segment.index}):
            pricing = segment.version.models[model]
            for token_class in TOKEN_CLASSES:
                count = by_segment.get((segment.index, model, token_class), 0)
                if count == 0:
                    continue
                offset = running[model, token_class]
                total = month_totals[model, token_class]
                for tier, tokens in _tier_slices(pricing, offset, count, total):
                    tier_label = "" if pricing.tier_mode == "flat" else f", tier {tier + 1}"
                    lines.append(
                        _usage_line(
                            card.currency,
                            "tokens",
                            f"{model} {token_class} tokens{tier_label}",
                            Decimal(tokens),
                            "token",
                            pricing.tiers[tier].per_1m(token_class),
                            TOKENS_PER_PRICE_UNIT,
                            segment,
                            model=model,
                            token_class=token_class,
                            tier=tier + 1,
                        )
                    )
                running[model, token_class] = offset + count
    return lines


def _gpu_lines(
    card: RateCard, usage: MonthlyUsage, segments: Sequence[_Segment]
) -> list[InvoiceLine]:
    hours: dict[tuple[int, str], Decimal] = defaultdict(Decimal)
    for i, item in enumerate(usage.gpu):
        segment = _segment_on(segments, item.day)
        if segment is None:
            raise UnpricedUsage(
                usage.tenant, f"gpu.{i}.day", f"no plan version is in force on {item.day}"
            )
        if item.gpu_type not in segment.version.gpu_hour:
            raise UnpricedUsage(
                usage.tenant,
                f"gpu.{i}.gpu_type",
                f"GPU type {item.gpu_type!r} has no price per GPU-hour in the version "
                f"effective from {segment.version.effective_from}",
            )
        with localcontext(_EXACT):
            hours[segment.index, item.gpu_type] += item.gpu_hours
    lines = []
    for segment in segments:
        for gpu_type in sorted(g for (s, g) in hours if s == segment.index):
            lines.append(
                _usage_line(
                    card.currency,
                    "gpu",
                    f"{gpu_type} GPU-hours",
                    hours[segment.index, gpu_type],
                    "GPU-hour",
                    segment.version.gpu_hour[gpu_type],
                    1,
                    segment,
                    gpu_type=gpu_type,
                )
            )
    return lines


def _energy_lines(
    card: RateCard, usage: MonthlyUsage, segments: Sequence[_Segment]
) -> list[InvoiceLine]:
    zone = ZoneInfo(card.tou_timezone)
    kwh: dict[tuple[int, str], Decimal] = defaultdict(Decimal)
    prices: dict[tuple[int, str], Decimal] = {}
    for i, item in enumerate(usage.energy):
        day = item.start_utc.date()
        segment = _segment_on(segments, day)
        if segment is None:
            raise UnpricedUsage(
                usage.tenant, f"energy.{i}.hour_utc", f"no plan version is in force on {day}"
            )
        energy = segment.version.energy
        if energy is None:
            raise UnpricedUsage(
                usage.tenant,
                f"energy.{i}",
                f"the version effective from {segment.version.effective_from} has no energy price",
            )
        window = energy.window_at(item.start_utc.astimezone(zone).hour)
        name = OFF_PEAK if window is None else window.name
        prices[segment.index, name] = energy.default_per_kwh if window is None else window.per_kwh
        with localcontext(_EXACT):
            kwh[segment.index, name] += item.kwh
    lines = []
    for segment in segments:
        for name in sorted(n for (s, n) in kwh if s == segment.index):
            lines.append(
                _usage_line(
                    card.currency,
                    "energy",
                    f"energy, {name}",
                    kwh[segment.index, name],
                    "kWh",
                    prices[segment.index, name],
                    1,
                    segment,
                    tou_window=name,
                )
            )
    return lines


def rate_month(
    card: RateCard,
    usage: MonthlyUsage,
    *,
    opening_credit: Decimal = Decimal(0),
    adjustments: Sequence[InvoiceLine] = (),
) -> Invoice:
    """Rate `usage` with `card` into an invoice (see the module docstring).

    `opening_credit` is the prepaid balance left after the previous month
    (`Invoice.closing_credit` of that month's invoice); credits the card grants the
    tenant within this month are added to it. `adjustments` are lines correcting earlier,
    finalized invoices (late usage, `models.invoice.adjustment_lines`): each is already
    at the minor unit; they join the subtotal after the commitment true-up, so credits
    and tax apply to them as to this month's usage.
    """
    with localcontext(_EXACT):
        return _rate_month(card, usage, opening_credit, adjustments)


def _rate_month(
    card: RateCard,
    usage: MonthlyUsage,
    opening_credit: Decimal,
    adjustments: Sequence[InvoiceLine],
) -> Invoice:
    currency = card.currency
    opening = to_decimal(opening_credit, "opening_credit")
    if opening < 0 or not is_at_minor_unit(opening, currency):
        raise UnpricedUsage(
            usage.tenant,
            "opening_credit",
            f"{opening} is not a non-negative amount in {currency}'s minor unit",
        )
    segments = _segments(card.versions_for(usage.tenant), usage.start, usage.end)
    lines = [
        *_token_lines(card, usage, segments),
        *_gpu_lines(card, usage, segments),
        *_energy_lines(card, usage, segments),
    ]
    zero = round_line(Decimal(0), currency)
    usage_subtotal = sum((line.amount for line in lines), zero)

    true_up = zero
    last_day = usage.end - timedelta(days=1)
    in_force = _segment_on(segments, last_day)
    if in_force is not None and usage_subtotal < in_force.version.minimum_commitment:
        true_up = in_force.version.minimum_commitment - usage_subtotal
        lines.append(
            InvoiceLine(
                kind="commitment",
                description=(
                    f"minimum commitment {in_force.version.minimum_commitment} {currency}, true-up"
                ),
                amount=true_up,
                quantity=Decimal(1),
                unit="month",
                unit_price=true_up,
                period_start=usage.start,
                period_end=usage.end,
            )
        )
    for i, line in enumerate(adjustments):
        if line.kind != "adjustment" or not is_at_minor_unit(line.amount, currency):
            raise UnpricedUsage(
                usage.tenant,
                f"adjustments.{i}",
                "expected an adjustment line at the currency's minor unit",
            )
    lines.extend(adjustments)
    adjustments_total = sum((line.amount for line in adjustments), zero)
    subtotal = usage_subtotal + true_up + adjustments_total

    terms = card.terms_for(usage.tenant)
    granted = sum(
        (g.amount for g in terms.credits if usage.start <= g.granted_on < usage.end), zero
    )
    available = opening + granted
    # Adjustments can make the subtotal negative (usage corrected downwards): credits
    # never pay a negative amount.
    applied = max(zero, min(available, subtotal))
    if applied > 0:
        lines.append(
            InvoiceLine(
                kind="credit",
                description=f"prepaid credit applied ({available} {currency} available)",
                amount=-applied,
                period_start=usage.start,
                period_end=usage.end,
            )
        )
    taxable = subtotal - applied

    tax_rate = card.tax_rate_for(usage.tenant)
    with localcontext(_EXACT):
        exact_tax = taxable * tax_rate
    tax = round_line(exact_tax, currency)
    lines.append(
        InvoiceLine(
            kind="tax",
            description=f"tax at {tax_rate}",
            amount=tax,
            quantity=taxable,
            unit=currency,
            unit_price=tax_rate,
            period_start=usage.start,
            period_end=usage.end,
        )
    )
    total = taxable + tax
    if sum((line.amount for line in lines), zero) != total:  # pragma: no cover - invariant
        raise AssertionError("invoice lines do not add up to the total")
    return Invoice(
        tenant=usage.tenant,
        year=usage.year,
        month=usage.month,
        currency=currency,
        lines=tuple(lines),
        usage_subtotal=usage_subtotal,
        commitment_true_up=true_up,
        adjustments_total=adjustments_total,
        subtotal=subtotal,
        credits_applied=applied,
        taxable_subtotal=taxable,
        tax_rate=tax_rate,
        tax=tax,
        total=total,
        opening_credit=opening,
        credits_granted=granted,
        closing_credit=available - applied,
    )
