"""Invoice documents from hourly usage rows: lineage, late-usage adjustments, credit notes."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.billing_usage import (
    UsageRow,
    gpu_hours_from_seconds,
    kwh_from_joules,
    line_sources,
    monthly_usage,
    row_delta,
)
from models.invoice import (
    adjustment_lines,
    build_document,
    canonical_json,
    content_hash,
    credit_note,
    finalized,
)
from models.rate_card import RateCard, load_rate_card
from models.rating import rate_month

CARD = load_rate_card(
    """
currency: USD
tax_rate: "0.10"
tou_timezone: UTC
plans:
  default:
    - effective_from: 2026-01-01
      models:
        m:
          tier_mode: graduated
          tiers:
            - {up_to_tokens: 1000, prompt_per_1m: "10", completion_per_1m: "30",
               cached_per_1m: "5"}
            - {up_to_tokens: null, prompt_per_1m: "5", completion_per_1m: "15",
               cached_per_1m: "2.5"}
        v:
          tier_mode: volume
          tiers:
            - {up_to_tokens: 5000, prompt_per_1m: "1", completion_per_1m: "3", cached_per_1m: "0"}
            - {up_to_tokens: null, prompt_per_1m: "0.5", completion_per_1m: "1", cached_per_1m: "0"}
      gpu_hour: {H100: "2.50", A100: "1.25"}
      energy:
        default_per_kwh: "0.10"
        windows: [{name: peak, start_hour: 8, end_hour: 20, per_kwh: "0.30"}]
    - effective_from: 2026-03-16
      models:
        m: {prompt_per_1m: "8", completion_per_1m: "24", cached_per_1m: "4"}
        v: {prompt_per_1m: "1", completion_per_1m: "2", cached_per_1m: "0"}
      minimum_commitment: "1.00"
tenants:
  t: {}
"""
)

MARCH = datetime(2026, 3, 1, tzinfo=UTC)


def row(hour: int, model: str = "m", gpu: str = "H100", **kw: int | str) -> UsageRow:
    values: dict[str, object] = {"requests": 1, "prompt_tokens": 0, **kw}
    for name in ("gpu_hours", "energy_kwh"):
        if name in values:
            values[name] = Decimal(str(values[name]))
    return UsageRow(event_hour=MARCH + timedelta(hours=hour), model=model, gpu_type=gpu, **values)  # type: ignore[arg-type]


def rate(rows: list[UsageRow], card: RateCard = CARD) -> object:
    return rate_month(card, monthly_usage(card, "t", 2026, 3, rows))


def test_quantities_are_fixed_once_half_even() -> None:
    assert gpu_hours_from_seconds(1.8) == Decimal("0.000500")
    assert kwh_from_joules(3600.0) == Decimal("0.001000")
    # 0.0000005 kWh = 1.8 J: a tie, rounded to even.
    assert kwh_from_joules(1.8) == Decimal("0.000000")
    assert kwh_from_joules(5.4) == Decimal("0.000002")


def test_unpriced_gpu_time_and_energy_are_not_billed() -> None:
    rows = [row(24 * 20, gpu_hours="1.5", energy_kwh="2", completion_tokens=10)]
    usage = monthly_usage(CARD, "t", 2026, 3, rows)  # the 16 March version prices neither
    assert usage.gpu == [] and usage.energy == []
    early = monthly_usage(CARD, "t", 2026, 3, [row(5, gpu_hours="1.5", energy_kwh="2")])
    assert [g.gpu_hours for g in early.gpu] == [Decimal("1.5")]
    assert [e.kwh for e in early.energy] == [Decimal("2")]


def test_a_row_crossing_a_tier_bound_is_split_between_the_tier_lines() -> None:
    rows = [row(1, completion_tokens=700), row(2, completion_tokens=700)]
    invoice = rate(rows)
    sources = line_sources(CARD, invoice, rows)
    by_line = {line.line_id: src for line, src in zip(invoice.lines, sources, strict=True)}
    tier1 = by_line["tokens/2026-03-01/m/completion/1"]
    tier2 = by_line["tokens/2026-03-01/m/completion/2"]
    assert [(s.key[0].hour, s.quantity) for s in tier1] == [(1, 700), (2, 300)]
    assert [(s.key[0].hour, s.quantity) for s in tier2] == [(2, 400)]


hours = st.integers(min_value=0, max_value=31 * 24 - 1)
row_strategy = st.builds(
    lambda hour, model, gpu, prompt, cached_pct, completion, gpu_ms, energy_j: UsageRow(
        event_hour=MARCH + timedelta(hours=hour),
        model=model,
        gpu_type=gpu,
        requests=1,
        prompt_tokens=prompt,
        cached_tokens=prompt * cached_pct // 100,
        completion_tokens=completion,
        gpu_hours=gpu_hours_from_seconds(gpu_ms / 1000),
        energy_kwh=kwh_from_joules(energy_j),
    ),
    hours,
    st.sampled_from(["m", "v"]),
    st.sampled_from(["H100", "A100"]),
    st.integers(min_value=0, max_value=3000),
    st.integers(min_value=0, max_value=100),
    st.integers(min_value=0, max_value=3000),
    st.integers(min_value=0, max_value=3_600_000),
    st.floats(min_value=0, max_value=1e7, allow_nan=False),
)


def _unique(rows: list[UsageRow]) -> list[UsageRow]:
    return list({r.key: r for r in rows}.values())


@settings(max_examples=120, deadline=None)
@given(st.lists(row_strategy, max_size=25).map(_unique))
def test_every_usage_line_is_exactly_the_sum_of_its_rows(rows: list[UsageRow]) -> None:
    invoice = rate(rows)
    sources = line_sources(CARD, invoice, rows)
    for line, parts in zip(invoice.lines, sources, strict=True):  # type: ignore[attr-defined]
        if line.kind in {"tokens", "gpu", "energy"}:
            assert sum((p.quantity for p in parts), Decimal(0)) == line.quantity, line.line_id
        else:
            assert parts == []
    # Every token of every row is on exactly one line.
    for token_class in ("prompt", "completion", "cached"):
        on_lines = sum(
            (
                p.quantity
                for line, parts in zip(invoice.lines, sources, strict=True)  # type: ignore[attr-defined]
                if line.token_class == token_class
                for p in parts
            ),
            Decimal(0),
        )
        assert on_lines == sum(r.tokens(token_class) for r in rows)  # type: ignore[arg-type]


@settings(max_examples=120, deadline=None)
@given(
    st.lists(row_strategy, max_size=15).map(_unique),
    st.lists(row_strategy, min_size=1, max_size=5),
)
def test_adjustments_bill_exactly_what_rating_the_period_again_adds(
    billed: list[UsageRow], late: list[UsageRow]
) -> None:
    current = list({r.key: r for r in [*billed]}.values())
    merged = {r.key: r for r in current}
    for extra in late:
        if extra.key in merged:
            base = merged[extra.key]
            merged[extra.key] = UsageRow(
                base.event_hour,
                base.model,
                base.gpu_type,
                base.requests + extra.requests,
                base.prompt_tokens + extra.prompt_tokens,
                base.cached_tokens + extra.cached_tokens,
                base.completion_tokens + extra.completion_tokens,
                base.gpu_hours + extra.gpu_hours,
                base.energy_kwh + extra.energy_kwh,
            )
        else:
            merged[extra.key] = extra
    now = list(merged.values())
    lines = adjustment_lines(
        CARD, "t", "2026-03", billed=billed, current=now, invoice_number="INV-000001"
    )
    before, after = rate(billed), rate(now)
    expected = (after.usage_subtotal + after.commitment_true_up) - (  # type: ignore[attr-defined]
        before.usage_subtotal + before.commitment_true_up  # type: ignore[attr-defined]
    )
    assert sum((line.amount for line in lines), Decimal(0)) == expected
    assert all(line.adjusts_invoice == "INV-000001" for line in lines)
    assert all(line.adjusts_period == "2026-03" for line in lines)
    # Rows of the difference are the late usage, and nothing else.
    delta = row_delta(now, billed)
    assert sum(r.requests for r in delta) == sum(r.requests for r in late)


def test_late_tokens_are_priced_at_the_tier_they_fall_in() -> None:
    billed = [row(1, completion_tokens=900)]
    now = [row(1, completion_tokens=900), row(2, completion_tokens=200)]
    lines = adjustment_lines(CARD, "t", "2026-03", billed=billed, current=now, invoice_number="I1")
    # 100 tokens fill tier 1 at 30/M, 100 go to tier 2 at 15/M: 0.003 + 0.0015 -> 0.00.
    by_tier = {line.tier: line.quantity for line in lines if line.kind == "adjustment"}
    assert by_tier == {1: Decimal(100), 2: Decimal(100)}
    assert "late usage" in lines[0].description and "I1" in lines[0].description


def test_a_late_adjustment_joins_the_next_invoice_before_credit_and_tax() -> None:
    adjustments = adjustment_lines(
        CARD,
        "t",
        "2026-02",
        billed=[],
        current=[UsageRow(datetime(2026, 2, 3, 4, tzinfo=UTC), "m", "H100", 1, 0, 0, 100_000)],
        invoice_number="INV-000007",
    )
    # 1,000 tokens at 30/M (0.03) and 99,000 at 15/M (1.485, half-even to 1.48).
    assert [line.amount for line in adjustments] == [Decimal("0.03"), Decimal("1.48")]
    invoice = rate_month(CARD, monthly_usage(CARD, "t", 2026, 3, []), adjustments=adjustments)
    assert invoice.adjustments_total == Decimal("1.51")
    assert invoice.commitment_true_up == Decimal("1.00")  # March's own usage is zero
    assert invoice.tax == Decimal("0.25")  # 10 % of 2.51
    assert invoice.total == Decimal("2.76")
    assert sum(line.amount for line in invoice.lines) == invoice.total


def test_a_credit_note_negates_every_line_and_total() -> None:
    rows = [row(3, prompt_tokens=5000, completion_tokens=800, gpu_hours="2", energy_kwh="1")]
    invoice = rate(rows)
    draft = build_document(
        invoice,  # type: ignore[arg-type]
        rows,
        issuer="op",
        idle_policy="separate",
        rate_card_sha256="0" * 64,
    )
    final = finalized(draft, "INV-000001", date(2026, 4, 4))
    note = credit_note(final, number="CN-000001", issued_on=date(2026, 4, 9), reason="wrong plan")
    assert note.kind == "credit_note" and note.voids == "INV-000001"
    assert note.total == -final.total != 0
    assert sum(line.amount for line in note.lines) == note.total
    assert [line.amount for line in note.lines] == [-line.amount for line in final.lines]
    with pytest.raises(ValueError, match="final invoice"):
        credit_note(draft, number="CN-2", issued_on=date(2026, 4, 9), reason="x")


def test_the_document_serialises_to_the_same_bytes_every_time() -> None:
    rows = [row(3, prompt_tokens=5000, completion_tokens=800, gpu_hours="2", energy_kwh="1")]
    invoice = rate(rows)
    kwargs = {"issuer": "op", "idle_policy": "separate", "rate_card_sha256": "a" * 64}
    first = canonical_json(build_document(invoice, rows, **kwargs))  # type: ignore[arg-type]
    second = canonical_json(build_document(rate(list(rows)), rows, **kwargs))  # type: ignore[arg-type]
    assert first == second and content_hash(first) == content_hash(second)
    assert b'"total": "' in first  # decimals as text, never floats
    summary = build_document(invoice, rows, **kwargs).usage[0]  # type: ignore[arg-type]
    assert summary.j_per_output_token == Decimal("4500.0000")  # 1 kWh / 800 tokens


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=-(10**9), max_value=10**9),
    st.lists(
        st.decimals(min_value=0, max_value=10**6, places=4, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=12,
    ).filter(lambda ws: sum(ws) > 0),
)
def test_split_quantity_is_exact_and_fair(units: int, weights: list[Decimal]) -> None:
    from fractions import Fraction

    from models.billing_usage import split_quantity

    total = Decimal(units).scaleb(-6)
    parts = split_quantity(total, weights)
    assert sum(parts, Decimal(0)) == total
    weight_sum = sum(Fraction(w) for w in weights)
    for part, weight in zip(parts, weights, strict=True):
        exact = Fraction(total) * Fraction(weight) / weight_sum
        # Each part is within one unit (1e-6) of its exact share.
        assert abs(Fraction(part) - exact) < Fraction(1, 10**6)
