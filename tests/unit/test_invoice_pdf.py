"""The invoice PDF: what a reader finds in it (via pypdf's text), and same bytes twice."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

from models.invoice import (
    DocumentLine,
    InvoiceDocument,
    UsageSummary,
    canonical_json,
    content_hash,
    credit_note,
    finalized,
)
from models.invoice_pdf import render_pdf
from models.money import round_line

MARCH = (date(2026, 3, 1), date(2026, 4, 1))
PRICE_CHANGE = date(2026, 3, 15)
HEADER_PERIOD = "1 Mar 2026 – 31 Mar 2026"


# --- fixtures: documents built the way `models.rating` lays them out -------------------


def _usage_line(
    kind: str,
    quantity: str,
    price: str,
    currency: str,
    *,
    price_per: int = 1,
    unit: str,
    description: str,
    days: tuple[date, date] = MARCH,
    **labels: Any,
) -> dict[str, Any]:
    qty, unit_price = Decimal(quantity), Decimal(price)
    return {
        "kind": kind,
        "description": description,
        "quantity": qty,
        "unit": unit,
        "unit_price": unit_price,
        "price_per": price_per,
        "amount": round_line(qty * unit_price / price_per, currency),
        "period_start": days[0],
        "period_end": days[1],
        **labels,
    }


def _tokens(
    model: str,
    token_class: str,
    tier: int,
    quantity: str,
    price: str,
    currency: str,
    days: tuple[date, date] = MARCH,
) -> dict[str, Any]:
    return _usage_line(
        "tokens",
        quantity,
        price,
        currency,
        price_per=1_000_000,
        unit="token",
        description=f"{model} {token_class} tokens, tier {tier}",
        days=days,
        model=model,
        token_class=token_class,
        tier=tier,
    )


def _gpu(gpu_type: str, hours: str, price: str, currency: str) -> dict[str, Any]:
    return _usage_line(
        "gpu",
        hours,
        price,
        currency,
        unit="GPU-hour",
        description=f"{gpu_type} GPU-hours",
        gpu_type=gpu_type,
    )


def _energy(window: str, kwh: str, price: str, currency: str) -> dict[str, Any]:
    return _usage_line(
        "energy",
        kwh,
        price,
        currency,
        unit="kWh",
        description=f"energy, {window}",
        tou_window=window,
    )


def _document(
    usage_lines: Sequence[dict[str, Any]],
    *,
    currency: str,
    tax_rate: str,
    minimum_commitment: str = "0",
    adjustments: Sequence[dict[str, Any]] = (),
    opening_credit: str = "0",
    credits_granted: str = "0",
    usage: Sequence[UsageSummary] = (),
    status: str = "draft",
    number: str | None = None,
    issued_on: date | None = None,
) -> InvoiceDocument:
    """An invoice whose lines add up to its totals, as `models.rating.rate_month`'s do."""
    lines = [dict(line) for line in usage_lines]
    zero = round_line(Decimal(0), currency)
    usage_subtotal = sum((line["amount"] for line in lines), zero)
    true_up = max(zero, Decimal(minimum_commitment) - usage_subtotal)
    if true_up:
        lines.append(
            {
                "kind": "commitment",
                "description": f"minimum commitment {minimum_commitment} {currency}, true-up",
                "quantity": Decimal(1),
                "unit": "month",
                "unit_price": true_up,
                "amount": true_up,
                "period_start": MARCH[0],
                "period_end": MARCH[1],
            }
        )
    lines.extend(adjustments)
    adjustments_total = sum((line["amount"] for line in adjustments), zero)
    subtotal = usage_subtotal + true_up + adjustments_total
    available = Decimal(opening_credit) + Decimal(credits_granted)
    applied = max(zero, min(available, subtotal))
    if applied:
        lines.append(
            {
                "kind": "credit",
                "description": f"prepaid credit applied ({available} {currency} available)",
                "quantity": Decimal(0),
                "amount": -applied,
                "period_start": MARCH[0],
                "period_end": MARCH[1],
            }
        )
    taxable = subtotal - applied
    rate = Decimal(tax_rate)
    tax = round_line(taxable * rate, currency)
    lines.append(
        {
            "kind": "tax",
            "description": f"tax at {rate}",
            "quantity": taxable,
            "unit": currency,
            "unit_price": rate,
            "amount": tax,
            "period_start": MARCH[0],
            "period_end": MARCH[1],
        }
    )
    document_lines = tuple(
        DocumentLine(
            line_no=i + 1,
            line_id=f"{line['kind']}/{i + 1}",
            **{"unit": "", "unit_price": Decimal(0), "price_per": 1, **line},
        )
        for i, line in enumerate(lines)
    )
    return InvoiceDocument(
        status=status,
        number=number,
        tenant="acme-robotics",
        period="2026-03",
        period_start=MARCH[0],
        period_end=MARCH[1],
        issued_on=issued_on,
        issuer="Example GPU Cloud GmbH",
        currency=currency,
        idle_policy="separate",
        rate_card_sha256="ab" * 32,
        lines=document_lines,
        usage=tuple(usage),
        usage_subtotal=usage_subtotal,
        commitment_true_up=true_up,
        adjustments_total=adjustments_total,
        subtotal=subtotal,
        credits_applied=applied,
        taxable_subtotal=taxable,
        tax_rate=rate,
        tax=tax,
        total=taxable + tax,
        opening_credit=Decimal(opening_credit),
        credits_granted=Decimal(credits_granted),
        closing_credit=available - applied,
    )


USAGE = (
    UsageSummary(
        model="llama-3.1-70b",
        gpu_type="H100",
        requests=48_213,
        prompt_tokens=4_900_000,
        cached_tokens=400_000,
        completion_tokens=2_234_567,
        gpu_hours=Decimal("101.2345678"),
        energy_kwh=Decimal("412.3456"),
        j_per_output_token=Decimal("664.3122"),
    ),
    UsageSummary(
        model="qwen3-14b",
        gpu_type="A100",
        requests=1_204_511,
        prompt_tokens=12_345_678,
        cached_tokens=0,
        completion_tokens=5_456_789,
        gpu_hours=Decimal("32.7214322"),
        energy_kwh=Decimal("114.0834"),
        j_per_output_token=Decimal("75.2634"),
    ),
    UsageSummary(
        model="embedding-small",
        gpu_type="A100",
        requests=310,
        prompt_tokens=91_000,
        cached_tokens=0,
        completion_tokens=0,
        gpu_hours=Decimal("0.25"),
        energy_kwh=Decimal("0.0712"),
        j_per_output_token=None,
    ),
)


def usd_lines() -> list[dict[str, Any]]:
    usd = "USD"
    return [
        _tokens("llama-3.1-70b", "prompt", 1, "1000000", "1.00", usd),
        _tokens("llama-3.1-70b", "prompt", 2, "3500000", "0.80", usd),
        _tokens("llama-3.1-70b", "completion", 1, "1000000", "3.00", usd),
        _tokens("llama-3.1-70b", "completion", 2, "1234567", "2.40", usd),
        _tokens("llama-3.1-70b", "cached", 1, "400000", "0.50", usd),
        _tokens("qwen3-14b", "prompt", 1, "12345678", "0.10", usd),
        # A price change on the 15th splits a line: the days show under the model.
        _tokens("qwen3-14b", "completion", 1, "3456789", "0.40", usd, (MARCH[0], PRICE_CHANGE)),
        _tokens("qwen3-14b", "completion", 1, "2000000", "0.32", usd, (PRICE_CHANGE, MARCH[1])),
        _gpu("H100", "123.456", "2.50", usd),
        _gpu("A100", "10.5", "1.10", usd),
        _energy("off_peak", "345.678", "0.12", usd),
        _energy("morning", "60.25", "0.25", usd),
        _energy("peak", "120.5", "0.30", usd),
    ]


def usd_adjustments() -> list[dict[str, Any]]:
    late = _tokens("llama-3.1-70b", "completion", 2, "250000", "2.40", "USD")
    fewer = _gpu("H100", "-2.5", "2.50", "USD")
    corrects = {
        "tokens": "tokens/2026-02-01/llama-3.1-70b/completion/2",
        "gpu": "gpu/2026-02-01/H100",
    }
    out = []
    for line in (late, fewer):
        corrected = corrects[line["kind"]]
        out.append(
            {
                **line,
                "kind": "adjustment",
                "description": f"{line['description']} (2026-02, INV-000001): late usage",
                "period_start": date(2026, 2, 1),
                "period_end": date(2026, 3, 1),
                "adjusts_invoice": "INV-000001",
                "adjusts_period": "2026-02",
                "adjusts_line": corrected,
            }
        )
    return out


@pytest.fixture(scope="module")
def usd_draft() -> InvoiceDocument:
    return _document(
        usd_lines(),
        currency="USD",
        tax_rate="0.19",
        minimum_commitment="1000.00",
        adjustments=usd_adjustments(),
        opening_credit="250.00",
        credits_granted="100.00",
        usage=USAGE,
    )


@pytest.fixture(scope="module")
def usd_final(usd_draft: InvoiceDocument) -> InvoiceDocument:
    return finalized(usd_draft, "INV-000042", date(2026, 4, 2))


@pytest.fixture(scope="module")
def jpy_final() -> InvoiceDocument:
    jpy = "JPY"
    lines = [
        _tokens("qwen3-14b", "prompt", 1, "12345678", "15", jpy),
        _tokens("qwen3-14b", "completion", 1, "3456789", "60", jpy),
        _gpu("H100", "123.456", "380", jpy),
        _energy("off_peak", "345.678", "18", jpy),
    ]
    return _document(
        lines,
        currency=jpy,
        tax_rate="0.10",
        usage=USAGE[1:],
        status="final",
        number="INV-000077",
        issued_on=date(2026, 4, 1),
    )


@pytest.fixture(scope="module")
def voiding(usd_final: InvoiceDocument) -> InvoiceDocument:
    return credit_note(
        usd_final,
        number="CN-000003",
        issued_on=date(2026, 4, 20),
        reason="billed under the wrong rate card; reissued as INV-000051",
    )


LONG_MODEL = "meta-llama/Llama-3.1-405B-Instruct-FP8-dynamic-with-an-absurdly-long-deployment-name"


@pytest.fixture(scope="module")
def long_invoice() -> InvoiceDocument:
    """200 lines: 50 models of 4 lines each, one with a name longer than its column."""
    lines = []
    for i in range(50):
        model = LONG_MODEL if i == 7 else f"tenant-finetune-{i:02d}"
        for token_class, tier, price in (
            ("prompt", 1, "0.90"),
            ("prompt", 2, "0.70"),
            ("completion", 1, "2.70"),
            ("cached", 1, "0.45"),
        ):
            lines.append(_tokens(model, token_class, tier, str(1_000_003 * (i + 1)), price, "USD"))
    return _document(
        lines[:198],
        currency="USD",
        tax_rate="0.0725",
        opening_credit="120.00",
        usage=USAGE,
        status="final",
        number="INV-000200",
        issued_on=date(2026, 4, 1),
    )


# --- helpers ------------------------------------------------------------------------


def _hash(document: InvoiceDocument) -> str:
    return content_hash(canonical_json(document))


def _render(document: InvoiceDocument) -> bytes:
    return render_pdf(document, content_sha256=_hash(document))


def _pages(pdf: bytes) -> list[str]:
    reader = PdfReader(io.BytesIO(pdf))
    return [page.extract_text() or "" for page in reader.pages]


def _text(pdf: bytes) -> str:
    """All pages' text, whitespace collapsed (wrapped cells break lines anywhere)."""
    return re.sub(r"\s+", " ", "\n".join(_pages(pdf)))


def _money(amount: Decimal, places: int) -> str:
    """The expected printing of an amount: grouping, the currency's decimals, ASCII -."""
    return f"{amount:,.{places}f}"


# --- tests --------------------------------------------------------------------------


def test_draft_shows_identity_banner_and_totals(usd_draft: InvoiceDocument) -> None:
    pdf = _render(usd_draft)
    text = _text(pdf)
    assert pdf.startswith(b"%PDF-")
    assert "INVOICE" in text
    assert "DRAFT — not a valid invoice" in text
    assert "acme-robotics" in text
    assert "Example GPU Cloud GmbH" in text
    assert HEADER_PERIOD in text
    assert "not issued" in text
    assert "separate" in text
    assert f"TOTAL DUE USD {_money(usd_draft.total, 2)}" in text
    assert f"Tax (19%) USD {_money(usd_draft.tax, 2)}" in text
    # Prepaid credit: opening 250 + granted 100, all of it applied.
    assert "Opening balance USD 250.00" in text
    assert "Granted this period USD 100.00" in text
    assert "Prepaid credit applied USD -350.00" in text
    assert "Closing balance USD 0.00" in text


def test_every_line_amount_appears(usd_draft: InvoiceDocument) -> None:
    text = _text(_render(usd_draft))
    kinds = {line.kind for line in usd_draft.lines}
    assert kinds == {"tokens", "gpu", "energy", "commitment", "adjustment", "credit", "tax"}
    for line in usd_draft.lines:
        assert _money(line.amount, 2) in text, line.line_id
    # Quantities carry thousands separators; split lines show their days.
    assert "12,345,678" in text
    assert "1 Mar 2026 – 14 Mar 2026" in text
    assert "15 Mar 2026 – 31 Mar 2026" in text
    assert "prompt (cached)" in text


def test_adjustments_name_the_invoice_and_period_they_correct(
    usd_draft: InvoiceDocument,
) -> None:
    text = _text(_render(usd_draft))
    assert "Adjustments to earlier invoices" in text
    assert text.count("INV-000001 Feb 2026") == 2
    # A correction downwards prints with a minus sign.
    assert "-2.5 GPU-hour -6.25" in text


def test_usage_summary_table(usd_draft: InvoiceDocument) -> None:
    text = _text(_render(usd_draft))
    assert "GPU usage and energy" in text
    # GPU-hours, kWh and J per token at 3 decimals; "—" without completion tokens.
    assert "llama-3.1-70b H100 48,213 4,900,000 400,000 2,234,567 101.235 412.346 664.312" in (text)
    assert "embedding-small A100 310 91,000 0 0 0.250 0.071 —" in text
    # Totals row; J per output token over all rows is energy over completion tokens.
    total_kwh = sum((u.energy_kwh for u in USAGE), Decimal(0))
    completion = sum(u.completion_tokens for u in USAGE)
    j = (total_kwh * 3_600_000 / completion).quantize(Decimal("0.001"))
    assert f"Total 1,253,034 17,336,678 400,000 7,691,356 134.206 526.500 {j}" in text


def test_final_invoice_has_no_banner_and_a_number(usd_final: InvoiceDocument) -> None:
    pdf = _render(usd_final)
    text = _text(pdf)
    assert "DRAFT" not in text
    assert "INV-000042" in text
    assert "2 Apr 2026" in text
    reader = PdfReader(io.BytesIO(pdf))
    meta = reader.metadata
    assert meta is not None
    assert meta.title == "Invoice INV-000042 — acme-robotics — 2026-03"
    assert meta.author == "Example GPU Cloud GmbH"
    assert meta.creator == "gpuledger"
    assert meta.subject == f"Invoice for acme-robotics, billing period {HEADER_PERIOD}"
    # The creation date is the issue date: deterministic and meaningful.
    assert str(meta["/CreationDate"]).startswith("D:20260402000000")


def test_jpy_amounts_have_no_decimals(jpy_final: InvoiceDocument) -> None:
    text = _text(_render(jpy_final))
    for line in jpy_final.lines:
        printed = _money(line.amount, 0)
        assert re.search(rf"(?<![\d,.]){re.escape(printed)}(?![\d,]|\.\d)", text), printed
    assert f"TOTAL DUE JPY {_money(jpy_final.total, 0)}" in text
    # Every amount with the code is whole yen.
    printed_money = re.findall(r"JPY -?[\d,]+(?:\.\d+)?", text)
    assert printed_money
    assert all("." not in m for m in printed_money), printed_money


def test_kwd_amounts_have_three_decimals(usd_draft: InvoiceDocument) -> None:
    kwd = _document(usd_lines()[:3], currency="KWD", tax_rate="0")
    text = _text(_render(kwd))
    assert f"TOTAL DUE KWD {_money(kwd.total, 3)}" in text
    assert "Tax (0%) KWD 0.000" in text


def test_credit_note(voiding: InvoiceDocument, usd_final: InvoiceDocument) -> None:
    pdf = _render(voiding)
    text = _text(pdf)
    assert "CREDIT NOTE" in text
    assert "DRAFT" not in text
    assert "Voids invoice INV-000042" in text
    assert "billed under the wrong rate card; reissued as INV-000051" in text
    assert f"TOTAL DUE USD {_money(-usd_final.total, 2)}" in text
    assert _money(-usd_final.total, 2).startswith("-")
    for line in voiding.lines:
        assert _money(line.amount, 2) in text, line.line_id
    assert "reversal of INV-000042 line 1" in text
    # A credit note has no credit balance of its own.
    assert "Opening balance" not in text
    meta = PdfReader(io.BytesIO(pdf)).metadata
    assert meta is not None
    assert meta.title == "Credit note CN-000003 — acme-robotics — 2026-03"


def test_many_lines_flow_over_pages(long_invoice: InvoiceDocument) -> None:
    started = time.perf_counter()
    pdf = _render(long_invoice)
    elapsed = time.perf_counter() - started
    pages = _pages(pdf)
    count = len(pages)
    assert len(long_invoice.lines) == 200
    assert count >= 4
    for number, page in enumerate(pages, start=1):
        assert f"page {number} of {count}" in page
    # The token table's column headings repeat on every page it spans.
    token_pages = [p for p in pages if "tenant-finetune-" in p]
    assert len(token_pages) >= 3
    assert all("Token class" in p and "Price per 1M" in p for p in token_pages)
    # The long model name wraps inside its cell: all of it is there, none lost.
    text = _text(pdf)
    assert LONG_MODEL in text.replace(" ", "") or LONG_MODEL in text
    for line in long_invoice.lines:
        assert _money(line.amount, 2) in text, line.line_id
    assert f"TOTAL DUE USD {_money(long_invoice.total, 2)}" in text
    assert "Tax (7.25%)" in text
    # A budget, not a benchmark: a 200-line invoice renders in well under this.
    assert elapsed < 10, elapsed


def test_footer_on_every_page_has_hash_and_number(long_invoice: InvoiceDocument) -> None:
    digest = _hash(long_invoice)
    pages = _pages(_render(long_invoice))
    for page in pages:
        assert f"content hash sha256:{digest[:16]}…" in page
        assert "INV-000200" in page
    assert digest[16:32] not in "".join(pages)


def test_same_document_same_bytes(
    usd_draft: InvoiceDocument, usd_final: InvoiceDocument, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _render(usd_final)
    time.sleep(1.1)  # a timestamp with a resolution of seconds would now differ
    assert _render(usd_final) == first
    # reportlab honours SOURCE_DATE_EPOCH even in invariant mode; we must not.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert _render(usd_final) == first
    assert _render(usd_draft) == _render(usd_draft)
    assert _render(usd_draft) != first


def test_content_hash_changes_the_bytes(usd_final: InvoiceDocument) -> None:
    one = render_pdf(usd_final, content_sha256="0" * 64)
    other = render_pdf(usd_final, content_sha256="1" * 64)
    assert one != other
    assert "sha256:0000000000000000…" in _text(one)


def test_content_hash_must_be_a_sha256(usd_final: InvoiceDocument) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        render_pdf(usd_final, content_sha256="sha256:" + "0" * 64)


def test_page_renders_to_png(
    usd_draft: InvoiceDocument,
    voiding: InvoiceDocument,
    long_invoice: InvoiceDocument,
    jpy_final: InvoiceDocument,
    tmp_path: Path,
) -> None:
    """Rasterise the first and second pages (a reader other than pypdf accepts the file;
    the PNGs land in pytest's temporary directory, for a human to look at)."""
    pdftoppm = shutil.which("pdftoppm")
    if pdftoppm is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    for name, document in (
        ("draft", usd_draft),
        ("credit-note", voiding),
        ("long", long_invoice),
        ("jpy", jpy_final),
    ):
        pdf_path = tmp_path / f"{name}.pdf"
        pdf_path.write_bytes(_render(document))
        subprocess.run(
            [pdftoppm, "-png", "-r", "80", "-f", "1", "-l", "2", pdf_path, tmp_path / name],
            check=True,
            capture_output=True,
            timeout=60,
        )
        pngs = sorted(tmp_path.glob(f"{name}-*.png"))
        assert pngs, name
        assert all(png.read_bytes().startswith(b"\x89PNG") for png in pngs)
