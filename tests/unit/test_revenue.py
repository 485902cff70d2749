"""What an invoice billed per model (models/revenue.py): exact splits of usage lines."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.billing_usage import UsageRow, gpu_hours_from_seconds, kwh_from_joules, monthly_usage
from models.invoice import DocumentLine, InvoiceDocument, UsageSummary, build_document
from models.money import is_at_minor_unit, minor_units
from models.rate_card import load_rate_card
from models.rating import USAGE_KINDS, rate_month
from models.revenue import ModelRevenue, billed_by_model

UNATTRIBUTED = "(unattributed)"
MODELS = ("alpha", "beta", "gamma", "delta")
GPU_TYPES = ("H100", "A100", "L4")
EXCLUDED_KINDS = ("commitment", "adjustment", "credit", "tax")


def line(
    kind: str,
    amount: Decimal | str,
    *,
    model: str | None = None,
    gpu_type: str | None = None,
    line_no: int = 1,
) -> DocumentLine:
    return DocumentLine(
        line_no=line_no,
        line_id=f"{kind}/{line_no}",
        kind=kind,  # type: ignore[arg-type]
        description=kind,
        quantity=Decimal(1),
        unit="unit",
        unit_price=Decimal(amount),
        price_per=1,
        amount=Decimal(amount),
        model=model,
        gpu_type=gpu_type,
    )


def summary(model: str, gpu_type: str, gpu_hours: str = "0", kwh: str = "0") -> UsageSummary:
    return UsageSummary(
        model=model,
        gpu_type=gpu_type,
        requests=1,
        prompt_tokens=0,
        cached_tokens=0,
        completion_tokens=0,
        gpu_hours=Decimal(gpu_hours),
        energy_kwh=Decimal(kwh),
        j_per_output_token=None,
    )


def document(
    lines: list[DocumentLine], usage: list[UsageSummary], currency: str = "USD"
) -> InvoiceDocument:
    numbered = tuple(
        entry.model_copy(update={"line_no": i + 1, "line_id": f"{entry.kind}/{i + 1}"})
        for i, entry in enumerate(lines)
    )
    zero = Decimal(0)
    usage_total = sum((entry.amount for entry in numbered if entry.kind in USAGE_KINDS), zero)
    return InvoiceDocument(
        status="draft",
        tenant="t",
        period="2026-03",
        period_start=date(2026, 3, 1),
        period_end=date(2026, 4, 1),
        issuer="issuer",
        currency=currency,
        idle_policy="separate",
        rate_card_sha256="0" * 64,
        lines=numbered,
        usage=tuple(usage),
        usage_subtotal=usage_total,
        commitment_true_up=zero,
        adjustments_total=zero,
        subtotal=usage_total,
        credits_applied=zero,
        taxable_subtotal=usage_total,
        tax_rate=zero,
        tax=zero,
        total=usage_total,
        opening_credit=zero,
        credits_granted=zero,
        closing_credit=zero,
    )


def as_dict(parts: list[ModelRevenue]) -> dict[str, Decimal]:
    return {part.model: part.billed for part in parts}


# -- hand-computed examples -------------------------------------------------------------


def test_usage_lines_are_attributed_and_other_lines_left_out() -> None:
    usage = [
        summary("alpha", "H100", gpu_hours="1", kwh="1"),
        summary("beta", "H100", gpu_hours="2", kwh="1"),
        summary("gamma", "A100", gpu_hours="5", kwh="2"),
    ]
    lines = [
        line("tokens", "5.00", model="alpha"),
        # 10.00 by H100 hours 1:2 = 3.333.. / 6.666..: the cent left goes to beta
        # (remainder 0.67 > 0.33); gamma ran on A100 only and gets none of it.
        line("gpu", "10.00", gpu_type="H100"),
        # 1.00 by kWh 1:1:2.
        line("energy", "1.00"),
        line("commitment", "20.00"),
        line("adjustment", "4.00", model="alpha"),
        line("credit", "-2.00"),
        line("tax", "3.00"),
    ]
    parts = billed_by_model(document(lines, usage))
    assert parts == [
        ModelRevenue("alpha", Decimal("8.58")),
        ModelRevenue("beta", Decimal("6.92")),
        ModelRevenue("gamma", Decimal("0.50")),
    ]
    assert sum(p.billed for p in parts) == Decimal("16.00")


def test_jpy_split_has_no_fraction_and_ties_go_to_the_first_model_by_name() -> None:
    usage = [summary(m, "H100", gpu_hours="1.5") for m in ("gamma", "alpha", "beta")]
    parts = as_dict(billed_by_model(document([line("gpu", "100", gpu_type="H100")], usage, "JPY")))
    assert parts == {"alpha": Decimal(34), "beta": Decimal(33), "gamma": Decimal(33)}
    assert all(amount == amount.to_integral_value() for amount in parts.values())


def test_gpu_line_of_a_type_no_model_ran_on_is_unattributed() -> None:
    usage = [summary("alpha", "H100", gpu_hours="3", kwh="1")]
    lines = [line("gpu", "7.00", gpu_type="L4"), line("gpu", "2.00", gpu_type="H100")]
    assert as_dict(billed_by_model(document(lines, usage))) == {
        "alpha": Decimal("2.00"),
        UNATTRIBUTED: Decimal("7.00"),
    }


def test_energy_line_without_any_kwh_is_unattributed_and_zero_weights_get_nothing() -> None:
    usage = [summary("alpha", "H100", gpu_hours="0", kwh="0")]
    lines = [line("energy", "0.31"), line("gpu", "0.05", gpu_type="H100")]
    assert as_dict(billed_by_model(document(lines, usage))) == {UNATTRIBUTED: Decimal("0.36")}


def test_a_model_with_zero_hours_on_the_type_gets_no_share_of_its_gpu_line() -> None:
    usage = [summary("alpha", "H100", gpu_hours="4"), summary("beta", "H100", gpu_hours="0")]
    parts = as_dict(billed_by_model(document([line("gpu", "9.99", gpu_type="H100")], usage)))
    assert parts == {"alpha": Decimal("9.99")}


def test_energy_is_split_by_a_models_kwh_over_all_its_gpu_types() -> None:
    # alpha: 1 + 2 = 3 kWh over two GPU types, beta 1 kWh -> 3:1.
    usage = [
        summary("alpha", "H100", kwh="1"),
        summary("alpha", "A100", kwh="2"),
        summary("beta", "A100", kwh="1"),
    ]
    parts = as_dict(billed_by_model(document([line("energy", "4.00")], usage)))
    assert parts == {"alpha": Decimal("3.00"), "beta": Decimal("1.00")}


def test_credit_note_lines_split_negative() -> None:
    usage = [summary("alpha", "H100", gpu_hours="1"), summary("beta", "H100", gpu_hours="2")]
    parts = as_dict(billed_by_model(document([line("gpu", "-10.00", gpu_type="H100")], usage)))
    assert parts == {"alpha": Decimal("-3.33"), "beta": Decimal("-6.67")}


# -- documents rated from usage -----------------------------------------------------------

CARD_YAML = """
currency: {currency}
tax_rate: "0.10"
tou_timezone: UTC
plans:
  default:
    - effective_from: 2026-01-01
      models:
        m: {{prompt_per_1m: "{p}", completion_per_1m: "{c}", cached_per_1m: "1"}}
        v: {{prompt_per_1m: "{p}", completion_per_1m: "{c}", cached_per_1m: "0"}}
      gpu_hour: {{H100: "{gpu}", A100: "{gpu2}"}}
      energy:
        default_per_kwh: "{kwh}"
        windows: [{{name: peak, start_hour: 8, end_hour: 20, per_kwh: "{peak}"}}]
      minimum_commitment: "{commit}"
tenants:
  t: {{}}
"""
CARDS = {
    "USD": load_rate_card(
        CARD_YAML.format(
            currency="USD",
            p="3",
            c="9",
            gpu="2.37",
            gpu2="1.13",
            kwh="0.11",
            peak="0.29",
            commit="500",
        )
    ),
    "JPY": load_rate_card(
        CARD_YAML.format(
            currency="JPY",
            p="450",
            c="1350",
            gpu="357",
            gpu2="171",
            kwh="17",
            peak="43",
            commit="75000",
        )
    ),
}
MARCH = datetime(2026, 3, 1, tzinfo=UTC)

usage_rows = st.builds(
    lambda hour, model, gpu, prompt, completion, gpu_s, energy_j: UsageRow(
        event_hour=MARCH + timedelta(hours=hour),
        model=model,
        gpu_type=gpu,
        requests=1,
        prompt_tokens=prompt,
        completion_tokens=completion,
        gpu_hours=gpu_hours_from_seconds(gpu_s),
        energy_kwh=kwh_from_joules(energy_j),
    ),
    st.integers(min_value=0, max_value=31 * 24 - 1),
    st.sampled_from(["m", "v"]),
    st.sampled_from(["H100", "A100"]),
    st.integers(min_value=0, max_value=50_000_000),
    st.integers(min_value=0, max_value=20_000_000),
    st.integers(min_value=0, max_value=3600),
    st.integers(min_value=0, max_value=3_000_000),
)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(CARDS)),
    st.lists(usage_rows, max_size=20).map(lambda rows: list({r.key: r for r in rows}.values())),
)
def test_rated_document_parts_sum_to_its_usage_subtotal(
    currency: str, rows: list[UsageRow]
) -> None:
    card = CARDS[currency]
    invoice = rate_month(card, monthly_usage(card, "t", 2026, 3, rows))
    doc = build_document(invoice, rows, issuer="i", idle_policy="separate", rate_card_sha256="x")
    parts = billed_by_model(doc)
    usage_lines = [entry for entry in doc.lines if entry.kind in USAGE_KINDS]
    total = sum((p.billed for p in parts), Decimal(0))
    assert total == sum((entry.amount for entry in usage_lines), Decimal(0))
    assert total == doc.usage_subtotal
    assert all(is_at_minor_unit(p.billed, currency) for p in parts)
    # Every model with usage that was billed, and nothing else (no excluded line leaks in).
    ran = {r.model for r in rows if r.gpu_hours or r.energy_kwh}
    tokens = {entry.model for entry in usage_lines if entry.kind == "tokens" and entry.amount}
    assert {p.model for p in parts if p.billed} <= ran | tokens


# -- invariants over arbitrary documents --------------------------------------------------

amounts_minor = st.integers(min_value=-(10**7), max_value=10**7)
quantities = st.integers(min_value=0, max_value=10**6).map(lambda n: Decimal(n).scaleb(-3))


@st.composite
def documents(draw: st.DrawFn) -> InvoiceDocument:
    currency = draw(st.sampled_from(["USD", "JPY"]))
    units = minor_units(currency)
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from(MODELS), st.sampled_from(GPU_TYPES)),
            unique=True,
            max_size=8,
        )
    )
    usage = [
        summary(model, gpu, gpu_hours=str(draw(quantities)), kwh=str(draw(quantities)))
        for model, gpu in pairs
    ]
    entries = []
    for kind in draw(st.lists(st.sampled_from([*USAGE_KINDS, *EXCLUDED_KINDS]), max_size=12)):
        amount = Decimal(draw(amounts_minor)).scaleb(-units)
        if kind == "tokens":
            entries.append(line(kind, amount, model=draw(st.sampled_from(MODELS))))
        elif kind == "gpu":
            entries.append(line(kind, amount, gpu_type=draw(st.sampled_from(GPU_TYPES))))
        else:
            entries.append(line(kind, amount))
    return document(entries, usage, currency)


@settings(max_examples=300, deadline=None)
@given(documents())
def test_parts_sum_exactly_to_the_usage_lines_at_the_minor_unit(doc: InvoiceDocument) -> None:
    parts = billed_by_model(doc)
    usage_total = sum(
        (entry.amount for entry in doc.lines if entry.kind in USAGE_KINDS), Decimal(0)
    )
    assert sum((p.billed for p in parts), Decimal(0)) == usage_total
    assert all(is_at_minor_unit(p.billed, doc.currency) for p in parts)
    assert [p.model for p in parts] == sorted({p.model for p in parts})


@settings(max_examples=300, deadline=None)
@given(documents())
def test_attribution_is_the_sum_of_each_lines_own_attribution(doc: InvoiceDocument) -> None:
    """Lines are split independently: no line's split depends on another line."""
    whole = as_dict(billed_by_model(doc))
    by_line: dict[str, Decimal] = defaultdict(Decimal)
    for entry in doc.lines:
        for part in billed_by_model(doc.model_copy(update={"lines": (entry,)})):
            by_line[part.model] += part.billed
    assert whole == dict(by_line)


@settings(max_examples=300, deadline=None)
@given(documents(), st.sampled_from(EXCLUDED_KINDS))
def test_commitment_adjustment_credit_and_tax_lines_attribute_nothing(
    doc: InvoiceDocument, kind: str
) -> None:
    extra = line(kind, "123", model=MODELS[0], gpu_type=GPU_TYPES[0])
    widened = doc.model_copy(update={"lines": (*doc.lines, extra)})
    assert billed_by_model(widened) == billed_by_model(doc)


@settings(max_examples=300, deadline=None)
@given(documents(), st.sampled_from(MODELS), amounts_minor)
def test_a_token_line_goes_whole_to_its_model(
    doc: InvoiceDocument, model: str, amount_minor: int
) -> None:
    amount = Decimal(amount_minor).scaleb(-minor_units(doc.currency))
    before = as_dict(billed_by_model(doc))
    after = as_dict(
        billed_by_model(
            doc.model_copy(update={"lines": (*doc.lines, line("tokens", amount, model=model))})
        )
    )
    expected = dict(before)
    expected[model] = expected.get(model, Decimal(0)) + amount
    assert after == expected


def assert_largest_remainder(
    parts: dict[str, Decimal], amount: Decimal, weights: dict[str, Decimal], currency: str
) -> None:
    """`parts` is Hamilton's split of `amount` by `weights` (positive weights only)."""
    positive = {m: Fraction(w) for m, w in weights.items() if w > 0}
    if not positive:
        assert parts == {UNATTRIBUTED: amount}
        return
    assert set(parts) <= set(positive)
    assert sum(parts.values(), Decimal(0)) == amount
    scale = 10 ** minor_units(currency)
    magnitude = abs(int(amount * scale))
    total_weight = sum(positive.values(), Fraction(0))
    sign = -1 if amount < 0 else 1
    rounded_up, rounded_down = [], []
    for model, weight in positive.items():
        quota = magnitude * weight / total_weight
        got = sign * int(parts.get(model, Decimal(0)) * scale)
        assert got in (quota.__floor__(), quota.__ceil__()), (model, got, quota)
        if got > quota.__floor__():
            rounded_up.append(quota - quota.__floor__())
        elif quota != quota.__floor__():
            rounded_down.append(quota - quota.__floor__())
    if rounded_up and rounded_down:
        assert min(rounded_up) >= max(rounded_down)


@settings(max_examples=300, deadline=None)
@given(documents(), st.sampled_from(GPU_TYPES), amounts_minor)
def test_a_gpu_line_is_split_over_its_types_models_by_gpu_hours(
    doc: InvoiceDocument, gpu_type: str, amount_minor: int
) -> None:
    amount = Decimal(amount_minor).scaleb(-minor_units(doc.currency))
    alone = doc.model_copy(update={"lines": (line("gpu", amount, gpu_type=gpu_type),)})
    parts = as_dict(billed_by_model(alone))
    weights: dict[str, Decimal] = defaultdict(Decimal)
    for entry in doc.usage:
        if entry.gpu_type == gpu_type:
            weights[entry.model] += entry.gpu_hours
    assert_largest_remainder(parts, amount, weights, doc.currency)


@settings(max_examples=300, deadline=None)
@given(documents(), amounts_minor)
def test_an_energy_line_is_split_over_all_models_by_kwh(
    doc: InvoiceDocument, amount_minor: int
) -> None:
    amount = Decimal(amount_minor).scaleb(-minor_units(doc.currency))
    alone = doc.model_copy(update={"lines": (line("energy", amount),)})
    parts = as_dict(billed_by_model(alone))
    weights: dict[str, Decimal] = defaultdict(Decimal)
    for entry in doc.usage:
        weights[entry.model] += entry.energy_kwh
    assert_largest_remainder(parts, amount, weights, doc.currency)


@pytest.mark.parametrize("kind", ["gpu", "energy"])
def test_usage_line_with_no_usage_summary_is_unattributed(kind: str) -> None:
    doc = document([line(kind, "12.34", gpu_type="H100")], usage=[])
    assert billed_by_model(doc) == [ModelRevenue(UNATTRIBUTED, Decimal("12.34"))]
