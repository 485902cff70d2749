"""Money: `Decimal` amounts in a currency's minor unit, rounded half-even, split exactly.

Rules
- Money is `Decimal` (or an `int` or a decimal string at the boundary), never `float`:
  a float cannot hold 0.10 exactly, so `to_decimal` refuses one instead of guessing.
- A currency's minor units come from the ISO 4217 data that Babel ships (CLDR): USD
  and EUR have 2, JPY and KRW 0, KWD, BHD and TND 3. Babel answers 2 for a code it does
  not know, so an unknown code is refused first (`minor_units`).
- `round_line` rounds once, half-even (banker's rounding: a tie goes to the even
  digit, so ties do not bias a long invoice upwards).
- `largest_remainder` splits an amount already at the minor unit into parts that add
  up to it exactly (Hamilton's method, in integer minor units): each part gets the
  floor of its exact share; the units left over go one each to the parts with the
  largest remainders, ties to the earlier part. Same inputs, same split.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from fractions import Fraction

from babel.numbers import get_currency_precision, is_currency

from models.errors import InputError

#: Codes ISO 4217 lists that are not money one can invoice in: precious metals, SDR
#: and bond-market units, the testing code and "no currency". Babel knows them all.
NOT_INVOICE_CURRENCIES = frozenset(
    {"XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XDR", "XPD", "XPT", "XSU", "XTS", "XUA", "XXX"}
)

#: Enough digits that no sum or product of invoice amounts is ever rounded by the
#: context; the only rounding is the explicit quantize in `round_line`.
_CONTEXT = Context(prec=60, rounding=ROUND_HALF_EVEN)


class MoneyError(InputError, ValueError):
    """A money value or currency the caller must fix; names the field and the rule.

    Also a `ValueError`, so that pydantic validators that call these helpers report
    it as a validation error at the field's location.
    """

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def validate_currency(code: str, field: str = "currency") -> str:
    """Return `code` if it is an ISO 4217 currency one can invoice in, else raise."""
    if not isinstance(code, str) or len(code) != 3 or not code.isalpha() or not code.isupper():
        raise MoneyError(field, f"{code!r} is not an ISO 4217 code (three capital letters)")
    if not is_currency(code) or code in NOT_INVOICE_CURRENCIES:
        raise MoneyError(field, f"{code!r} is not an ISO 4217 currency one can invoice in")
    return code


def minor_units(currency: str) -> int:
    """Digits after the decimal point of `currency`'s minor unit (USD 2, JPY 0, KWD 3)."""
    return int(get_currency_precision(validate_currency(currency)))


def minor_unit(currency: str) -> Decimal:
    """The smallest amount of `currency` as a Decimal: 0.01 for USD, 1 for JPY."""
    return Decimal(1).scaleb(-minor_units(currency))


def to_decimal(value: object, field: str = "amount") -> Decimal:
    """A finite Decimal from a Decimal, an int or a decimal string; floats are refused.

    YAML and JSON numbers with a fraction arrive as floats unless the loader keeps
    their text (`models.rate_card.load_rate_card` does); a float here is a bug.
    """
    if isinstance(value, bool):
        raise MoneyError(field, f"expected a decimal amount, got the boolean {value!r}")
    if isinstance(value, float):
        raise MoneyError(
            field,
            f"got the float {value!r}; money must be a Decimal, an int or a decimal string "
            "(a float cannot hold most decimal fractions exactly)",
        )
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            raise MoneyError(field, f"{value!r} is not a decimal number") from None
    else:
        raise MoneyError(field, f"expected a decimal amount, got {type(value).__name__}")
    if not result.is_finite():
        raise MoneyError(field, f"{value!r} is not a finite number")
    return result


def is_at_minor_unit(amount: Decimal, currency: str) -> bool:
    """True when `amount` has no digits below `currency`'s minor unit."""
    return amount == round_line(amount, currency)


def round_line(amount: Decimal, currency: str) -> Decimal:
    """`amount` rounded half-even to `currency`'s minor unit (the one rounding of a line)."""
    exact = to_decimal(amount)
    return exact.quantize(minor_unit(currency), rounding=ROUND_HALF_EVEN, context=_CONTEXT)


def _to_minor(amount: Decimal, units: int) -> int:
    return int(amount.scaleb(units, context=_CONTEXT))


def _from_minor(amount_minor: int, units: int) -> Decimal:
    return Decimal(amount_minor).scaleb(-units, context=_CONTEXT)


def largest_remainder(total: Decimal, weights: Sequence[Decimal], currency: str) -> list[Decimal]:
    """Split `total` (at `currency`'s minor unit) in proportion to `weights`, exactly.

    The parts are at the minor unit and `sum(parts) == total`. Weights are non-negative
    with a positive sum (all zero is allowed only for a zero total, giving zeros). A
    negative total is split like its absolute value, with every part negated.
    """
    amount = to_decimal(total, "total")
    if not is_at_minor_unit(amount, currency):
        raise MoneyError(
            "total",
            f"{amount} has digits below the minor unit of {currency}; round it first",
        )
    exact_weights = [to_decimal(w, f"weights[{i}]") for i, w in enumerate(weights)]
    for i, weight in enumerate(exact_weights):
        if weight < 0:
            raise MoneyError(f"weights[{i}]", f"{weight} is negative")
    if not exact_weights:
        raise MoneyError("weights", "expected at least one weight")
    units = minor_units(currency)
    total_minor = _to_minor(amount, units)
    weight_sum = sum((Fraction(w) for w in exact_weights), Fraction(0))
    if weight_sum == 0:
        if total_minor != 0:
            raise MoneyError("weights", "all weights are zero; cannot split a non-zero total")
        return [_from_minor(0, units) for _ in exact_weights]
    sign = -1 if total_minor < 0 else 1
    magnitude = abs(total_minor)
    shares = [magnitude * Fraction(w) / weight_sum for w in exact_weights]
    floors = [share.numerator // share.denominator for share in shares]
    left_over = magnitude - sum(floors)
    # Largest remainder first; equal remainders in input order (deterministic).
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - floors[i]), i))
    for i in order[:left_over]:
        floors[i] += 1
    return [_from_minor(sign * part, units) for part in floors]
