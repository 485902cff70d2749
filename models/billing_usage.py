"""The billing record: a tenant's hourly usage rows, and what each invoice line is made of.

A `UsageRow` is one row of `marts.fct_tenant_usage_hourly` for one tenant (model x GPU
type x the hour its requests ended). Rows are the unit of lineage: every usage line of
an invoice is a sum over rows (`line_sources`), and every row is a sum over request ids
(the mart it comes from). Quantities are fixed at the row: GPU-hours and kWh are
converted from the allocation's floating-point seconds and joules once, rounded
half-even to `QUANTITY_PLACES` decimals, and are exact `Decimal` from then on, so a
line's quantity is exactly the sum of its rows' parts.

`monthly_usage` turns rows into the rating input (`models.rating.MonthlyUsage`):
tokens per UTC day and model; GPU-hours per day and GPU type, only on days whose plan
version prices GPU-hours at all; energy per hour, only on days whose version prices
energy. A plan that sells tokens only never bills the GPU time or the energy behind
them (they still appear in the invoice's usage summary).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from zoneinfo import ZoneInfo

from models.rate_card import TOKEN_CLASSES, ModelPricing, PlanVersion, RateCard, TokenClass
from models.rating import (
    OFF_PEAK,
    EnergyUsage,
    GpuUsage,
    Invoice,
    InvoiceLine,
    MonthlyUsage,
    TokenUsage,
)

__all__ = [
    "QUANTITY_PLACES",
    "DayResources",
    "LineSource",
    "RowKey",
    "UsageRow",
    "gpu_hours_from_seconds",
    "kwh_from_joules",
    "line_sources",
    "monthly_usage",
    "row_delta",
    "rows_by_key",
    "split_quantity",
    "token_line_resources",
    "version_on",
]

#: Decimal places of GPU-hours (3.6 ms) and kWh (3.6 J) on a usage row.
QUANTITY_PLACES = 6
_QUANTUM = Decimal(1).scaleb(-QUANTITY_PLACES)

RowKey = tuple[datetime, str, str]


def _quantity(value: float, divisor: int) -> Decimal:
    # The one float -> Decimal step: the allocation's joules and seconds are floats by
    # design (ALLOCATION.md §7); repr() is the shortest text that round-trips.
    return (Decimal(repr(float(value))) / divisor).quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)


def gpu_hours_from_seconds(seconds: float) -> Decimal:
    return _quantity(seconds, 3600)


def kwh_from_joules(joules: float) -> Decimal:
    return _quantity(joules, 3_600_000)


@dataclass(frozen=True)
class UsageRow:
    """One tenant's usage of one model on one GPU type in the hour `event_hour` (UTC)."""

    event_hour: datetime
    model: str
    gpu_type: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    gpu_hours: Decimal = Decimal(0)
    energy_kwh: Decimal = Decimal(0)

    @property
    def key(self) -> RowKey:
        return (self.event_hour, self.model, self.gpu_type)

    @property
    def day(self) -> date:
        return self.event_hour.astimezone(UTC).date()

    def tokens(self, token_class: TokenClass) -> int:
        if token_class == "prompt":
            return self.prompt_tokens - self.cached_tokens
        if token_class == "completion":
            return self.completion_tokens
        return self.cached_tokens

    @property
    def is_zero(self) -> bool:
        return not (
            self.requests
            or self.prompt_tokens
            or self.cached_tokens
            or self.completion_tokens
            or self.gpu_hours
            or self.energy_kwh
        )


def rows_by_key(rows: Iterable[UsageRow]) -> dict[RowKey, UsageRow]:
    """Rows summed per key (several snapshots of a period add up to what was billed)."""
    merged: dict[RowKey, UsageRow] = {}
    for row in rows:
        seen = merged.get(row.key)
        merged[row.key] = row if seen is None else _add(seen, row, 1)
    return merged


def _add(a: UsageRow, b: UsageRow, sign: int) -> UsageRow:
    return replace(
        a,
        requests=a.requests + sign * b.requests,
        prompt_tokens=a.prompt_tokens + sign * b.prompt_tokens,
        cached_tokens=a.cached_tokens + sign * b.cached_tokens,
        completion_tokens=a.completion_tokens + sign * b.completion_tokens,
        gpu_hours=a.gpu_hours + sign * b.gpu_hours,
        energy_kwh=a.energy_kwh + sign * b.energy_kwh,
    )


def row_delta(current: Iterable[UsageRow], billed: Iterable[UsageRow]) -> list[UsageRow]:
    """`current - billed` per key, zero rows left out, sorted by key."""
    now = rows_by_key(current)
    before = rows_by_key(billed)
    out = []
    for key in sorted(now.keys() | before.keys()):
        zero = UsageRow(*key)
        delta = _add(now.get(key, zero), before.get(key, zero), -1)
        if not delta.is_zero:
            out.append(delta)
    return out


def version_on(versions: Sequence[PlanVersion], day: date) -> PlanVersion | None:
    """The plan version in force on `day` (the last one effective on or before it)."""
    found = None
    for version in versions:
        if version.effective_from <= day:
            found = version
    return found


def monthly_usage(
    card: RateCard, tenant: str, year: int, month: int, rows: Iterable[UsageRow]
) -> MonthlyUsage:
    """The rating input for `tenant`'s month from its hourly rows (see the module doc)."""
    versions = card.versions_for(tenant)
    tokens: dict[tuple[date, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    gpu: dict[tuple[date, str], Decimal] = defaultdict(Decimal)
    energy: dict[datetime, Decimal] = defaultdict(Decimal)
    for row in rows:
        day = row.day
        counts = tokens[day, row.model]
        counts[0] += row.prompt_tokens
        counts[1] += row.completion_tokens
        counts[2] += row.cached_tokens
        version = version_on(versions, day)
        if version is not None and version.gpu_hour and row.gpu_hours:
            gpu[day, row.gpu_type] += row.gpu_hours
        if version is not None and version.energy is not None and row.energy_kwh:
            energy[row.event_hour.astimezone(UTC)] += row.energy_kwh
    return MonthlyUsage(
        tenant=tenant,
        year=year,
        month=month,
        tokens=[
            TokenUsage(day=day, model=model, prompt_tokens=p, completion_tokens=c, cached_tokens=k)
            for (day, model), (p, c, k) in sorted(tokens.items())
            if p or c or k
        ],
        gpu=[
            GpuUsage(day=day, gpu_type=gpu_type, gpu_hours=hours)
            for (day, gpu_type), hours in sorted(gpu.items())
        ],
        energy=[EnergyUsage(hour_utc=hour, kwh=kwh) for hour, kwh in sorted(energy.items())],
    )


@dataclass(frozen=True)
class LineSource:
    """The part `quantity` (in the line's unit) of an invoice line that row `key` makes."""

    key: RowKey
    quantity: Decimal

    @property
    def day(self) -> date:
        return self.key[0].astimezone(UTC).date()


def _tier_bounds(pricing: ModelPricing, tier: int) -> tuple[int, int | None]:
    low = 0 if tier == 1 else pricing.tiers[tier - 2].up_to_tokens
    assert low is not None
    return low, pricing.tiers[tier - 1].up_to_tokens


def line_sources(
    card: RateCard, invoice: Invoice, rows: Sequence[UsageRow]
) -> list[list[LineSource]]:
    """For each line of `invoice` (rated from `rows`), the rows it is made of.

    Token lines: the model's rows in the line's days; under graduated tiers each row's
    tokens take their place in the month's running volume in hour order, and a row
    whose tokens cross a tier bound is split between the two tiers' lines. GPU lines:
    the GPU type's rows; energy lines: rows whose hour falls in the line's time-of-use
    window on the card's clock. Derived lines (commitment, credit, tax, adjustments)
    have no rows of their own. For usage lines `sum(source.quantity) == line.quantity`.
    """
    ordered = sorted(rows, key=lambda r: r.key)
    versions = card.versions_for(invoice.tenant)
    zone = ZoneInfo(card.tou_timezone)
    # Once per row (the loops below visit each row once per line): its key, day and,
    # per token class, its count and place in the month's running volume of its model.
    keys = [row.key for row in ordered]
    days = [row.day for row in ordered]
    counts = {c: [row.tokens(c) for row in ordered] for c in TOKEN_CLASSES}
    positions: dict[TokenClass, list[int]] = {c: [] for c in TOKEN_CLASSES}
    running: dict[tuple[str, TokenClass], int] = defaultdict(int)
    for i, row in enumerate(ordered):
        for token_class in TOKEN_CLASSES:
            positions[token_class].append(running[row.model, token_class])
            running[row.model, token_class] += counts[token_class][i]
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(ordered):
        by_model[row.model].append(i)
    result: list[list[LineSource]] = []
    for line in invoice.lines:
        sources: list[LineSource] = []
        first = line.period_start or date.min
        last = line.period_end or date.max
        if line.kind == "tokens" and line.model and line.token_class and line.tier:
            version = version_on(versions, line.period_start or invoice_start(invoice))
            assert version is not None
            pricing = version.models[line.model]
            low, high = (0, None)
            if pricing.tier_mode == "graduated":
                low, high = _tier_bounds(pricing, line.tier)
            class_counts = counts[line.token_class]
            class_positions = positions[line.token_class]
            for i in by_model.get(line.model, []):
                if not first <= days[i] < last:
                    continue
                start = class_positions[i]
                end = start + class_counts[i]
                inside = (end if high is None else min(high, end)) - max(low, start)
                if inside > 0:
                    sources.append(LineSource(keys[i], Decimal(inside)))
        elif line.kind == "gpu":
            for i, row in enumerate(ordered):
                if row.gpu_type == line.gpu_type and row.gpu_hours and first <= days[i] < last:
                    sources.append(LineSource(keys[i], row.gpu_hours))
        elif line.kind == "energy":
            version = version_on(versions, line.period_start or invoice_start(invoice))
            for i, row in enumerate(ordered):
                if not row.energy_kwh or not first <= days[i] < last:
                    continue
                assert version is not None and version.energy is not None
                window = version.energy.window_at(row.event_hour.astimezone(zone).hour)
                if (OFF_PEAK if window is None else window.name) == line.tou_window:
                    sources.append(LineSource(keys[i], row.energy_kwh))
        result.append(sources)
    return result


def invoice_start(invoice: Invoice) -> date:
    return date(invoice.year, invoice.month, 1)


def _units(quantity: Decimal) -> int:
    units = int((quantity / _QUANTUM).to_integral_value())
    if units * _QUANTUM != quantity:
        raise ValueError(f"{quantity} has more than {QUANTITY_PLACES} decimals")
    return units


def _split_units(units: int, weights: Sequence[int], weight_sum: int) -> list[int]:
    """Largest remainder in integers: shares and remainders exact, ties to the earlier."""
    sign, magnitude = (-1 if units < 0 else 1), abs(units)
    parts = [magnitude * w // weight_sum for w in weights]
    left = magnitude - sum(parts)
    if left:
        remainders = [magnitude * w % weight_sum for w in weights]
        for i in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
            parts[i] += 1
    return [sign * part for part in parts]


def _scale(weights: Sequence[Decimal]) -> list[int]:
    """Non-negative decimal weights as integers, all scaled by one power of ten."""
    if any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative")
    places = max((-int(w.as_tuple().exponent) for w in weights), default=0)
    return [int(w.scaleb(max(places, 0))) for w in weights]


def split_quantity(total: Decimal, weights: Sequence[Decimal]) -> list[Decimal]:
    """Split `total` (at most QUANTITY_PLACES decimals) in proportion to non-negative
    `weights` with a positive sum, by largest remainder: parts at QUANTITY_PLACES that
    add up to `total` exactly (ties to the earlier part)."""
    scaled = _scale(weights)
    weight_sum = sum(scaled)
    if weight_sum <= 0:
        raise ValueError("weights must have a positive sum")
    return [part * _QUANTUM for part in _split_units(_units(total), scaled, weight_sum)]


@dataclass(frozen=True)
class DayResources:
    """Energy and GPU time behind a line on one UTC day."""

    energy_kwh: Decimal = Decimal(0)
    gpu_hours: Decimal = Decimal(0)


def token_line_resources(
    lines: Sequence[InvoiceLine],
    sources: Sequence[Sequence[LineSource]],
    rows: Sequence[UsageRow],
    prefill_weights: Mapping[str, Decimal],
    default_prefill_weight: Decimal,
) -> list[dict[date, DayResources]]:
    """For each token line, per day, the energy and GPU-hours of the requests behind it.

    A row's energy and GPU-hours are shared between the token lines it feeds in
    proportion to the work of its tokens there, as the allocation defines work
    (ALLOCATION.md §3): an uncached prompt token weighs the model's configured
    `w_prefill`, a completion token 1, a cached token 0. Each row is split by largest
    remainder, so the token lines' parts of a row add up to the row exactly (a row with
    no work, all tokens cached, keeps its energy off the token lines).
    """
    by_key = {row.key: row for row in rows}
    # Work weights as integers (one power of ten for all), so each row splits exactly.
    classes: tuple[TokenClass, ...] = ("prompt", "completion", "cached")
    models = sorted({line.model for line in lines if line.model is not None})
    prefill = [prefill_weights.get(m, default_prefill_weight) for m in models]
    scaled = _scale([*prefill, Decimal(1), Decimal(0)])
    per_model = dict(zip(models, scaled, strict=False))
    one = scaled[len(prefill)]
    feeds: dict[RowKey, list[tuple[int, int]]] = defaultdict(list)
    for i, (line, parts) in enumerate(zip(lines, sources, strict=True)):
        if line.kind != "tokens" or line.model is None or line.token_class not in classes:
            continue
        weight = {"prompt": per_model[line.model], "completion": one, "cached": 0}[line.token_class]
        if weight == 0:
            continue
        for part in parts:
            feeds[part.key].append((i, int(part.quantity) * weight))
    out: list[dict[date, DayResources]] = [{} for _ in lines]
    for key, fed in feeds.items():
        row = by_key[key]
        weights = [w for _, w in fed]
        weight_sum = sum(weights)
        if weight_sum <= 0:
            continue
        energy = _split_units(_units(row.energy_kwh), weights, weight_sum)
        gpu = _split_units(_units(row.gpu_hours), weights, weight_sum)
        day = row.day
        for (i, _), kwh, hours in zip(fed, energy, gpu, strict=True):
            seen = out[i].get(day)
            if seen is None:
                out[i][day] = DayResources(kwh * _QUANTUM, hours * _QUANTUM)
            else:
                out[i][day] = DayResources(
                    seen.energy_kwh + kwh * _QUANTUM, seen.gpu_hours + hours * _QUANTUM
                )
    return out
