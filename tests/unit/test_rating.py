"""Rating a tenant's month: every charge model, tier bounds, true-up, credits, tax."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from models.money import round_line
from models.rate_card import RateCard, load_rate_card
from models.rating import (
    EnergyUsage,
    GpuUsage,
    Invoice,
    InvoiceLine,
    MonthlyUsage,
    TokenUsage,
    UnpricedUsage,
    rate_month,
)

CARD_YAML = """
currency: USD
tax_rate: "0.10"
tou_timezone: Europe/Berlin
plans:
  default:
    - effective_from: 2026-01-01
      models:
        small: {prompt_per_1m: 0.10, completion_per_1m: 0.40, cached_per_1m: 0.05}
        large:
          tier_mode: graduated
          tiers:
            - {up_to_tokens: 1000000, prompt_per_1m: 1.00, completion_per_1m: 3.00,
               cached_per_1m: 0.50}
            - {up_to_tokens: 3000000, prompt_per_1m: 0.80, completion_per_1m: 2.40,
               cached_per_1m: 0.40}
            - {prompt_per_1m: 0.50, completion_per_1m: 1.50, cached_per_1m: 0.25}
        bulk:
          tier_mode: volume
          tiers:
            - {up_to_tokens: 1000000, prompt_per_1m: 1.00, completion_per_1m: 3.00,
               cached_per_1m: 0.50}
            - {prompt_per_1m: 0.60, completion_per_1m: 1.80, cached_per_1m: 0.30}
      gpu_hour: {H100: 2.50, A100: 1.10}
      energy:
        default_per_kwh: 0.12
        windows:
          - {name: morning, start_hour: 7, end_hour: 9, per_kwh: 0.25}
          - {name: peak, start_hour: 17, end_hour: 21, per_kwh: 0.30}
    - effective_from: 2026-03-15
      models:
        small: {prompt_per_1m: 0.08, completion_per_1m: 0.32, cached_per_1m: 0.04}
        large:
          tier_mode: graduated
          tiers:
            - {up_to_tokens: 1000000, prompt_per_1m: 0.90, completion_per_1m: 2.70,
               cached_per_1m: 0.45}
            - {prompt_per_1m: 0.70, completion_per_1m: 2.10, cached_per_1m: 0.35}
      gpu_hour: {H100: 2.00}
      minimum_commitment: 50.00
  committed:
    - effective_from: 2026-01-01
      models:
        small: {prompt_per_1m: 0.10, completion_per_1m: 0.40, cached_per_1m: 0.05}
      minimum_commitment: 100.00
tenants:
  acme:
    credits:
      - {amount: 500.00, granted_on: 2026-01-10}
  beta:
    plan: committed
    tax_rate: "0.19"
  exempt:
    tax_rate: 0
"""

JPY_CARD_YAML = """
currency: JPY
tax_rate: 0.10
plans:
  default:
    - effective_from: 2026-01-01
      models:
        small: {prompt_per_1m: 15, completion_per_1m: 45, cached_per_1m: 7.5}
      gpu_hour: {H100: 333}
"""


@pytest.fixture(scope="module")
def card() -> RateCard:
    return load_rate_card(CARD_YAML, known_models={"small", "large", "bulk"})


def usage(tenant: str = "t1", month: int = 1, **items: Any) -> MonthlyUsage:
    return MonthlyUsage(tenant=tenant, year=2026, month=month, **items)


def tokens(
    model: str, day: date, prompt: int = 0, completion: int = 0, cached: int = 0
) -> TokenUsage:
    return TokenUsage(
        day=day,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
    )


def amounts(invoice: Invoice, kind: str = "tokens") -> list[tuple[str, Decimal]]:
    return [(line.description, line.amount) for line in invoice.lines if line.kind == kind]


def assert_balanced(invoice: Invoice) -> None:
    assert sum((line.amount for line in invoice.lines), Decimal(0)) == invoice.total
    for line in invoice.lines:
        assert round_line(line.amount, invoice.currency) == line.amount


JAN5 = date(2026, 1, 5)


def test_flat_token_prices_per_class(card: RateCard) -> None:
    invoice = rate_month(
        card,
        usage(
            tokens=[tokens("small", JAN5, prompt=3_000_000, completion=500_000, cached=1_000_000)]
        ),
    )
    # Cached tokens are part of prompt_tokens but billed at the cached price.
    assert amounts(invoice) == [
        ("small prompt tokens", Decimal("0.20")),
        ("small completion tokens", Decimal("0.20")),
        ("small cached tokens", Decimal("0.05")),
    ]
    assert invoice.usage_subtotal == Decimal("0.45")
    assert invoice.tax == Decimal("0.04")  # 0.045 rounds half-even to 0.04
    assert invoice.total == Decimal("0.49")
    assert_balanced(invoice)


def test_each_line_is_rounded_once_half_even(card: RateCard) -> None:
    # 450,000 × 0.10 / 1M = 0.045 -> 0.04 (tie to even); 1,350,000 × 0.10 / 1M = 0.135
    # -> 0.14. Rounded per line, not per day: two days of 225,000 are one line.
    invoice = rate_month(
        card,
        usage(
            tokens=[
                tokens("small", JAN5, prompt=225_000),
                tokens("small", date(2026, 1, 6), prompt=225_000),
            ]
        ),
    )
    assert amounts(invoice) == [("small prompt tokens", Decimal("0.04"))]
    line = invoice.lines[0]
    assert line.quantity == Decimal(450_000)
    assert line.unit_price == Decimal("0.10")
    assert line.price_per == 1_000_000
    invoice = rate_month(card, usage(tokens=[tokens("small", JAN5, prompt=1_350_000)]))
    assert amounts(invoice) == [("small prompt tokens", Decimal("0.14"))]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (1_000_000, [("large prompt tokens, tier 1", Decimal("1.00"))]),  # exactly at bound
        (
            1_000_001,
            [
                ("large prompt tokens, tier 1", Decimal("1.00")),
                ("large prompt tokens, tier 2", Decimal("0.00")),  # one token at 0.80/1M
            ],
        ),
        (
            3_000_000,
            [
                ("large prompt tokens, tier 1", Decimal("1.00")),
                ("large prompt tokens, tier 2", Decimal("1.60")),
            ],
        ),
        (
            5_000_000,
            [
                ("large prompt tokens, tier 1", Decimal("1.00")),
                ("large prompt tokens, tier 2", Decimal("1.60")),
                ("large prompt tokens, tier 3", Decimal("1.00")),
            ],
        ),
    ],
)
def test_graduated_tiers_price_each_slice(
    card: RateCard, prompt: int, expected: list[tuple[str, Decimal]]
) -> None:
    invoice = rate_month(card, usage(tokens=[tokens("large", JAN5, prompt=prompt)]))
    assert amounts(invoice) == expected
    assert sum(line.quantity for line in invoice.lines if line.kind == "tokens") == prompt
    assert_balanced(invoice)


def test_graduated_tiers_run_over_the_month_not_the_day(card: RateCard) -> None:
    invoice = rate_month(
        card,
        usage(
            tokens=[
                tokens("large", JAN5, prompt=600_000),
                tokens("large", date(2026, 1, 20), prompt=600_000),
            ]
        ),
    )
    lines = [line for line in invoice.lines if line.kind == "tokens"]
    assert [(line.tier, line.quantity) for line in lines] == [
        (1, Decimal(1_000_000)),
        (2, Decimal(200_000)),
    ]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (1_000_000, Decimal("3.00")),  # exactly at the bound: tier 1 price
        (1_000_001, Decimal("1.80")),  # just over: the whole volume at tier 2
        (2_000_000, Decimal("3.60")),
    ],
)
def test_volume_tiers_price_the_whole_volume(
    card: RateCard, completion: int, expected: Decimal
) -> None:
    invoice = rate_month(card, usage(tokens=[tokens("bulk", JAN5, completion=completion)]))
    assert [amount for _, amount in amounts(invoice)] == [expected]


def test_gpu_hours_by_type(card: RateCard) -> None:
    invoice = rate_month(
        card,
        usage(
            gpu=[
                GpuUsage(day=JAN5, gpu_type="H100", gpu_hours=Decimal("10.5")),
                GpuUsage(day=date(2026, 1, 6), gpu_type="H100", gpu_hours="1.5"),
                GpuUsage(day=JAN5, gpu_type="A100", gpu_hours=3),
            ]
        ),
    )
    assert amounts(invoice, "gpu") == [
        ("A100 GPU-hours", Decimal("3.30")),
        ("H100 GPU-hours", Decimal("30.00")),
    ]


def test_energy_by_time_of_use_window_on_the_cards_clock(card: RateCard) -> None:
    def hour(h: int) -> datetime:
        return datetime(2026, 1, 5, h, tzinfo=UTC)

    invoice = rate_month(
        card,
        usage(
            energy=[
                EnergyUsage(hour_utc=hour(6), kwh=Decimal(10)),  # 07:00 Berlin: morning
                EnergyUsage(hour_utc=hour(16), kwh=Decimal(20)),  # 17:00 Berlin: peak
                EnergyUsage(hour_utc=hour(19), kwh=Decimal(5)),  # 20:00 Berlin: peak
                EnergyUsage(hour_utc=hour(20), kwh=Decimal("7.5")),  # 21:00: off-peak
                EnergyUsage(hour_utc=hour(23), kwh=Decimal("2.5")),  # 00:00 on the 6th
            ]
        ),
    )
    assert amounts(invoice, "energy") == [
        ("energy, morning", Decimal("2.50")),
        ("energy, off_peak", Decimal("1.20")),
        ("energy, peak", Decimal("7.50")),
    ]


def test_mid_period_price_change_splits_the_lines(card: RateCard) -> None:
    invoice = rate_month(
        card,
        usage(
            month=3,
            tokens=[
                tokens("small", date(2026, 3, 10), prompt=1_000_000),
                tokens("small", date(2026, 3, 15), prompt=1_000_000),  # new prices today
                tokens("large", date(2026, 3, 14), prompt=800_000),
                tokens("large", date(2026, 3, 20), prompt=800_000),
            ],
            gpu=[
                GpuUsage(day=date(2026, 3, 1), gpu_type="H100", gpu_hours=1),
                GpuUsage(day=date(2026, 3, 31), gpu_type="H100", gpu_hours=1),
            ],
        ),
    )
    lines = [line for line in invoice.lines if line.kind in ("tokens", "gpu")]
    summary = [
        (line.period_start, line.period_end, line.description, line.unit_price, line.amount)
        for line in lines
    ]
    before, after = (date(2026, 3, 1), date(2026, 3, 15)), (date(2026, 3, 15), date(2026, 4, 1))
    assert summary == [
        (*before, "large prompt tokens, tier 1", Decimal("1.00"), Decimal("0.80")),
        (*before, "small prompt tokens", Decimal("0.10"), Decimal("0.10")),
        # The month's volume runs on across the change: 800k already used 800k of tier 1.
        (*after, "large prompt tokens, tier 1", Decimal("0.90"), Decimal("0.18")),
        (*after, "large prompt tokens, tier 2", Decimal("0.70"), Decimal("0.42")),
        (*after, "small prompt tokens", Decimal("0.08"), Decimal("0.08")),
        (*before, "H100 GPU-hours", Decimal("2.50"), Decimal("2.50")),
        (*after, "H100 GPU-hours", Decimal("2.00"), Decimal("2.00")),
    ]
    # The version in force on the last day has a 50.00 minimum: 43.92 true-up.
    assert invoice.usage_subtotal == Decimal("6.08")
    assert invoice.commitment_true_up == Decimal("43.92")
    assert_balanced(invoice)


def test_commitment_true_up_when_below_the_minimum(card: RateCard) -> None:
    invoice = rate_month(
        card, usage(tenant="beta", tokens=[tokens("small", JAN5, completion=10_000_000)])
    )
    assert invoice.usage_subtotal == Decimal("4.00")
    assert amounts(invoice, "commitment") == [
        ("minimum commitment 100.00 USD, true-up", Decimal("96.00"))
    ]
    assert invoice.subtotal == Decimal("100.00")
    assert invoice.tax == Decimal("19.00")
    assert invoice.total == Decimal("119.00")
    assert_balanced(invoice)


def test_no_true_up_at_or_above_the_minimum(card: RateCard) -> None:
    # Exactly 100.00 of usage: 250M completion tokens at 0.40 per 1M.
    invoice = rate_month(
        card, usage(tenant="beta", tokens=[tokens("small", JAN5, completion=250_000_000)])
    )
    assert invoice.usage_subtotal == Decimal("100.00")
    assert invoice.commitment_true_up == Decimal("0.00")
    assert amounts(invoice, "commitment") == []


def test_credits_drawn_down_across_two_months(card: RateCard) -> None:
    january = rate_month(
        card,
        usage(
            tenant="acme",
            month=1,
            gpu=[GpuUsage(day=JAN5, gpu_type="H100", gpu_hours=120)],  # 300.00
        ),
    )
    assert january.credits_granted == Decimal("500.00")
    assert january.credits_applied == Decimal("300.00")
    assert amounts(january, "credit") == [
        ("prepaid credit applied (500.00 USD available)", Decimal("-300.00"))
    ]
    assert january.taxable_subtotal == Decimal("0.00")
    assert january.total == Decimal("0.00")
    assert january.closing_credit == Decimal("200.00")
    assert_balanced(january)

    february = rate_month(
        card,
        usage(
            tenant="acme",
            month=2,
            gpu=[GpuUsage(day=date(2026, 2, 3), gpu_type="H100", gpu_hours=140)],  # 350.00
        ),
        opening_credit=january.closing_credit,
    )
    assert february.credits_granted == Decimal("0.00")  # the January grant is not re-added
    assert february.credits_applied == Decimal("200.00")
    assert february.taxable_subtotal == Decimal("150.00")
    assert february.tax == Decimal("15.00")
    assert february.total == Decimal("165.00")
    assert february.closing_credit == Decimal("0.00")
    assert_balanced(february)


def test_tenant_tax_override(card: RateCard) -> None:
    invoice = rate_month(
        card, usage(tenant="exempt", gpu=[GpuUsage(day=JAN5, gpu_type="H100", gpu_hours=1)])
    )
    assert invoice.tax_rate == Decimal(0)
    assert invoice.total == Decimal("2.50")


def test_yen_has_no_minor_units() -> None:
    jpy = load_rate_card(JPY_CARD_YAML)
    invoice = rate_month(
        jpy,
        usage(
            tokens=[
                tokens("small", JAN5, prompt=2_500_000, completion=1_500_000, cached=1_000_000)
            ],
            gpu=[GpuUsage(day=JAN5, gpu_type="H100", gpu_hours=Decimal("0.5"))],
        ),
    )
    # prompt 1.5M × 15 = 22.5 -> 22 (even); completion 1.5M × 45 = 67.5 -> 68;
    # cached 1M × 7.5 = 7.5 -> 8; GPU 0.5 h × 333 = 166.5 -> 166.
    assert [line.amount for line in invoice.lines if line.kind in ("tokens", "gpu")] == [
        Decimal(22),
        Decimal(68),
        Decimal(8),
        Decimal(166),
    ]
    assert invoice.usage_subtotal == Decimal(264)
    assert invoice.tax == Decimal(26)  # 26.4
    assert invoice.total == Decimal(290)
    assert all(line.amount.as_tuple().exponent == 0 for line in invoice.lines)
    assert_balanced(invoice)


def test_unpriced_usage_is_named(card: RateCard) -> None:
    with pytest.raises(UnpricedUsage) as caught:
        rate_month(card, usage(month=3, tokens=[tokens("bulk", date(2026, 3, 20))]))
    assert caught.value.field == "tokens.0.model"  # bulk is gone from the March version
    with pytest.raises(UnpricedUsage) as caught:
        rate_month(card, usage(gpu=[GpuUsage(day=JAN5, gpu_type="H200", gpu_hours=1)]))
    assert caught.value.field == "gpu.0.gpu_type"
    with pytest.raises(UnpricedUsage) as caught:
        rate_month(
            card,
            usage(
                month=3,
                energy=[EnergyUsage(hour_utc=datetime(2026, 3, 20, tzinfo=UTC), kwh=1)],
            ),
        )
    assert caught.value.field == "energy.0"
    early = load_rate_card(CARD_YAML.replace("2026-01-01", "2026-01-10"))
    with pytest.raises(UnpricedUsage) as caught:
        rate_month(early, usage(tokens=[tokens("small", JAN5, prompt=1)]))
    assert caught.value.field == "tokens.0.day"
    with pytest.raises(UnpricedUsage) as caught:
        rate_month(card, usage(), opening_credit=Decimal("1.001"))
    assert caught.value.field == "opening_credit"


def test_bad_usage_is_refused() -> None:
    with pytest.raises(ValidationError, match="outside 2026-01"):
        usage(tokens=[tokens("small", date(2026, 2, 1), prompt=1)])
    with pytest.raises(ValidationError, match="cached_tokens"):
        tokens("small", JAN5, prompt=1, cached=2)
    with pytest.raises(ValidationError, match="float"):
        GpuUsage(day=JAN5, gpu_type="H100", gpu_hours=1.5)
    with pytest.raises(ValidationError, match="on the hour"):
        EnergyUsage(hour_utc=datetime(2026, 1, 5, 6, 30, tzinfo=UTC), kwh=1)
    with pytest.raises(ValidationError):
        EnergyUsage(hour_utc=datetime(2026, 1, 5, 6), kwh=1)  # noqa: DTZ001 - naive on purpose


def test_empty_month_is_a_zero_invoice(card: RateCard) -> None:
    invoice = rate_month(card, usage())
    assert invoice.total == Decimal("0.00")
    assert [line.kind for line in invoice.lines] == ["tax"]


def _line_strategy() -> st.SearchStrategy[TokenUsage]:
    return st.builds(
        lambda model, day, prompt, completion, cached_share: tokens(
            model, date(2026, 3, day), prompt, completion, prompt * cached_share // 100
        ),
        st.sampled_from(["small", "large"]),
        st.integers(min_value=1, max_value=31),
        st.integers(min_value=0, max_value=50_000_000),
        st.integers(min_value=0, max_value=50_000_000),
        st.integers(min_value=0, max_value=100),
    )


@settings(max_examples=150, deadline=None)
@given(
    tenant=st.sampled_from(["t1", "acme", "beta", "exempt"]),
    token_items=st.lists(_line_strategy(), max_size=12),
    gpu_hours=st.lists(
        st.decimals(min_value=0, max_value=1000, places=3, allow_nan=False), max_size=5
    ),
    kwh=st.lists(st.decimals(min_value=0, max_value=500, places=4, allow_nan=False), max_size=5),
    opening_cents=st.integers(min_value=0, max_value=100_000),
)
def test_lines_always_sum_to_the_total(
    card: RateCard,
    tenant: str,
    token_items: list[TokenUsage],
    gpu_hours: list[Decimal],
    kwh: list[Decimal],
    opening_cents: int,
) -> None:
    if tenant == "beta":
        token_items = [t for t in token_items if t.model == "small"]
        gpu_hours = []
    month = usage(
        tenant=tenant,
        month=3,
        tokens=token_items,
        gpu=[
            GpuUsage(day=date(2026, 3, 1 + i * 7), gpu_type="H100", gpu_hours=h)
            for i, h in enumerate(gpu_hours)
        ],
        energy=[
            EnergyUsage(hour_utc=datetime(2026, 3, 1 + i, 3 * i, tzinfo=UTC), kwh=k)
            for i, k in enumerate(kwh)
        ]
        if tenant != "beta"
        else [],
    )
    if month.energy:
        # Energy is priced only before the March 15 change in this card.
        assert all(e.hour_utc.day < 15 for e in month.energy)
    opening = Decimal(opening_cents).scaleb(-2)
    invoice = rate_month(card, month, opening_credit=opening)
    assert_balanced(invoice)
    usage_lines: list[InvoiceLine] = [
        line for line in invoice.lines if line.kind in ("tokens", "gpu", "energy")
    ]
    assert sum((line.amount for line in usage_lines), Decimal(0)) == invoice.usage_subtotal
    assert invoice.closing_credit >= 0
    assert invoice.closing_credit + invoice.credits_applied == opening + invoice.credits_granted
    assert invoice.total >= 0
    billed = sum(t.prompt_tokens + t.completion_tokens for t in token_items)
    assert sum(line.quantity for line in invoice.lines if line.kind == "tokens") == billed
