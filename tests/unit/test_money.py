"""Money helpers: minor units from ISO 4217, half-even rounding, exact splits."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.money import (
    MoneyError,
    largest_remainder,
    minor_unit,
    minor_units,
    round_line,
    to_decimal,
    validate_currency,
)


@pytest.mark.parametrize(
    ("currency", "units"),
    [("USD", 2), ("EUR", 2), ("JPY", 0), ("KRW", 0), ("KWD", 3), ("BHD", 3), ("CHF", 2)],
)
def test_minor_units_follow_iso_4217(currency: str, units: int) -> None:
    assert minor_units(currency) == units
    assert minor_unit(currency) == Decimal(1).scaleb(-units)


@pytest.mark.parametrize("code", ["ZZZ", "usd", "US", "XXX", "XAU", "", "EURO"])
def test_unknown_or_non_invoice_currency_is_refused(code: str) -> None:
    with pytest.raises(MoneyError) as caught:
        validate_currency(code)
    assert caught.value.field == "currency"


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("0.125", "USD", "0.12"),  # tie to even
        ("0.135", "USD", "0.14"),  # tie to even
        ("0.1251", "USD", "0.13"),
        ("-0.125", "USD", "-0.12"),
        ("2.5", "JPY", "2"),
        ("3.5", "JPY", "4"),
        ("1.0005", "KWD", "1.000"),
        ("1.0015", "KWD", "1.002"),
        ("7", "USD", "7.00"),
    ],
)
def test_round_line_is_half_even_to_the_minor_unit(
    amount: str, currency: str, expected: str
) -> None:
    rounded = round_line(Decimal(amount), currency)
    assert rounded == Decimal(expected)
    assert str(rounded) == expected  # the exponent is the minor unit's


def test_floats_are_refused_at_the_boundary() -> None:
    """Guards against 0.1 + 0.2 style binary error reaching an invoice."""
    with pytest.raises(MoneyError, match="float"):
        to_decimal(0.1, "price")
    with pytest.raises(MoneyError, match="float"):
        round_line(0.125, "USD")  # type: ignore[arg-type]
    with pytest.raises(MoneyError, match="boolean"):
        to_decimal(True)


def test_to_decimal_accepts_int_str_decimal() -> None:
    assert to_decimal(3) == Decimal(3)
    assert to_decimal("0.10") == Decimal("0.10")
    assert to_decimal("1_000.5") == Decimal("1000.5")
    assert to_decimal(Decimal("2.50")) == Decimal("2.50")
    with pytest.raises(MoneyError, match="not a decimal"):
        to_decimal("ten")
    with pytest.raises(MoneyError, match="finite"):
        to_decimal("NaN")


def test_largest_remainder_gives_leftover_cents_to_largest_remainders() -> None:
    # 100.00 in thirds: 33.33 each, the leftover cent to the first (equal remainders).
    assert largest_remainder(Decimal("100.00"), [Decimal(1)] * 3, "USD") == [
        Decimal("33.34"),
        Decimal("33.33"),
        Decimal("33.33"),
    ]
    # 10.00 by 1:2:3 -> 1.666.., 3.333.., 5.00: the cent goes to the largest remainder.
    assert largest_remainder(Decimal("10.00"), [Decimal(1), Decimal(2), Decimal(3)], "USD") == [
        Decimal("1.67"),
        Decimal("3.33"),
        Decimal("5.00"),
    ]


def test_largest_remainder_in_yen_has_no_fractions() -> None:
    parts = largest_remainder(Decimal(1000), [Decimal(1)] * 7, "JPY")
    assert parts == [Decimal(143)] * 6 + [Decimal(142)]
    assert sum(parts) == Decimal(1000)


def test_largest_remainder_negative_and_zero() -> None:
    assert largest_remainder(Decimal("-1.00"), [Decimal(1)] * 3, "USD") == [
        Decimal("-0.34"),
        Decimal("-0.33"),
        Decimal("-0.33"),
    ]
    assert largest_remainder(Decimal("0.00"), [Decimal(0), Decimal(0)], "USD") == [
        Decimal("0.00"),
        Decimal("0.00"),
    ]


def test_largest_remainder_refuses_bad_input() -> None:
    with pytest.raises(MoneyError) as caught:
        largest_remainder(Decimal("1.005"), [Decimal(1)], "USD")
    assert caught.value.field == "total"
    with pytest.raises(MoneyError) as caught:
        largest_remainder(Decimal("1.00"), [Decimal(1), Decimal(-1)], "USD")
    assert caught.value.field == "weights[1]"
    with pytest.raises(MoneyError) as caught:
        largest_remainder(Decimal("1.00"), [Decimal(0)], "USD")
    assert caught.value.field == "weights"
    with pytest.raises(MoneyError):
        largest_remainder(Decimal("1.00"), [], "USD")


currencies = st.sampled_from(["USD", "JPY", "KWD", "EUR"])


@given(
    currency=currencies,
    total_minor=st.integers(min_value=-(10**12), max_value=10**12),
    weights=st.lists(
        st.decimals(min_value=0, max_value=10**6, places=4, allow_nan=False),
        min_size=1,
        max_size=30,
    ).filter(lambda ws: sum(ws) > 0),
)
def test_largest_remainder_parts_sum_to_the_total(
    currency: str, total_minor: int, weights: list[Decimal]
) -> None:
    total = Decimal(total_minor).scaleb(-minor_units(currency))
    parts = largest_remainder(total, weights, currency)
    assert len(parts) == len(weights)
    assert sum(parts, Decimal(0)) == total
    for part, weight in zip(parts, weights, strict=True):
        assert round_line(part, currency) == part
        # Each part is within one minor unit of its exact share.
        exact = total * weight / sum(weights)
        assert abs(part - exact) < minor_unit(currency)
