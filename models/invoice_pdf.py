"""The invoice PDF: an `InvoiceDocument` as pages a finance person reads and files.

`render_pdf` is pure (document in, bytes out) and deterministic: the same document
gives the same bytes, because the PDF of a finalized invoice is content-addressed and
must be reproducible from the stored `canonical_json`. What would otherwise vary
between two renders, and how it is pinned:
- the creation date: reportlab stamps the wall clock (or `$SOURCE_DATE_EPOCH`, even
  in invariant mode); we stamp the issue date, or reportlab's invariant epoch
  (2000-01-01) for a draft, which has none;
- the file identifier (`/ID`): reportlab hashes that timestamp and the title,
  author, subject and keywords; the keywords carry the full content hash, so the ID
  is fixed by the content and differs between documents;
- invariant mode (`invariant=True`) drops the remaining run-dependent comments.
The bytes also depend on the reportlab version (and zlib, which compresses the page
streams): a reproduced PDF is identical under the pinned versions, which is why the
artifact of a finalized invoice is stored, not re-rendered after an upgrade.

Layout (A4, built-in Helvetica, so no font files are needed): header with the
document's identity and a DRAFT banner for drafts; the lines in sections in the
rating's order (tokens, GPU-hours, energy, commitment true-up, adjustments, prepaid
credit, tax), each a table whose header row repeats when it breaks across pages;
the totals and the prepaid credit balance; the usage and energy summary per model
and GPU type. Every page has a footer with the content hash, the number and
"page X of Y" (the total is known only after the layout, so pages are kept until
the end and numbered then).

Text only uses characters of the standard fonts' encoding (WinAnsi): amounts carry
the ISO code, never a symbol such as "₹" that Helvetica cannot draw, and negative
amounts an ASCII minus sign.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from functools import partial
from hashlib import md5
from typing import Any
from xml.sax.saxutils import escape

from babel.dates import format_date
from babel.numbers import format_currency, format_decimal
from reportlab.lib import colors
from reportlab.lib.enums import TA_LEFT, TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    CondPageBreak,
    Flowable,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from models.invoice import DocumentLine, InvoiceDocument, UsageSummary
from models.money import minor_units
from models.rating import OFF_PEAK, TOKENS_PER_PRICE_UNIT, LineKind

__all__ = ["render_pdf"]

LOCALE = "en_US"
CREATOR = "gpuledger"

PAGE_WIDTH: float = A4[0]
PAGE_HEIGHT: float = A4[1]
MARGIN_X: float = 15 * mm
MARGIN_TOP = 20 * mm  # room for the running header of pages 2 and on
MARGIN_BOTTOM = 20 * mm  # room for the footer
#: SimpleDocTemplate's frame pads its content by 6 pt on each side; tables sized to the
#: page margins would stick out of it (and be centred over the padding).
FRAME_PADDING = 6.0
CONTENT_LEFT = MARGIN_X + FRAME_PADDING
FRAME_WIDTH = PAGE_WIDTH - 2 * CONTENT_LEFT
#: Room a section needs below its heading (heading, column headings, a few lines):
#: with less left on the page, the section starts on the next one instead of leaving
#: its heading alone at the bottom.
SECTION_MIN_HEIGHT = 35 * mm
#: Every line table ends with an amount column of this width, so that the amounts
#: of all sections line up under each other.
AMOUNT_WIDTH = 24 * mm
NO_WIDTH = 8 * mm

GREY = colors.HexColor("#5f6368")
RULE = colors.HexColor("#c8ccd0")
HEAD_BG = colors.HexColor("#eef1f4")
DRAFT_BG = colors.HexColor("#b3261e")

DASH = "—"
_SHA256 = re.compile(r"[0-9a-f]{64}")

# --- styles ---------------------------------------------------------------------------

_BODY = ParagraphStyle("body", fontName="Helvetica", fontSize=8, leading=10)
_CELL = ParagraphStyle("cell", parent=_BODY, alignment=TA_LEFT)
_CELL_NUM = ParagraphStyle("cell_num", parent=_BODY, alignment=TA_RIGHT)
_CELL_HEAD = ParagraphStyle("cell_head", parent=_BODY, fontName="Helvetica-Bold")
_CELL_HEAD_NUM = ParagraphStyle("cell_head_num", parent=_CELL_HEAD, alignment=TA_RIGHT)
_TITLE = ParagraphStyle("title", fontName="Helvetica-Bold", fontSize=20, leading=24)
_ISSUER = ParagraphStyle(
    "issuer", fontName="Helvetica-Bold", fontSize=11, leading=14, alignment=TA_RIGHT
)
_SECTION = ParagraphStyle(
    "section",
    fontName="Helvetica-Bold",
    fontSize=10,
    leading=13,
    spaceBefore=10,
    spaceAfter=3,
)
_BANNER = ParagraphStyle(
    "banner",
    fontName="Helvetica-Bold",
    fontSize=12,
    leading=15,
    textColor=colors.white,
    alignment=TA_LEFT,
)
#: The usage summary has nine columns: a smaller size keeps ten-digit token counts on
#: one line.
_SMALL = ParagraphStyle("small", parent=_BODY, fontSize=7, leading=8.5)
_SMALL_NUM = ParagraphStyle("small_num", parent=_SMALL, alignment=TA_RIGHT)
_SMALL_HEAD = ParagraphStyle("small_head", parent=_SMALL, fontName="Helvetica-Bold")
_SMALL_HEAD_NUM = ParagraphStyle("small_head_num", parent=_SMALL_HEAD, alignment=TA_RIGHT)
_NOTE = ParagraphStyle("note", parent=_BODY, textColor=GREY, fontSize=7, leading=9)


# --- formatting -----------------------------------------------------------------------


def _text(value: str, style: ParagraphStyle = _CELL) -> Paragraph:
    """A cell that wraps inside its column (plain strings in a Table never wrap and
    would run over the neighbouring cells or off the page)."""
    return Paragraph(escape(value), style)


def _num(value: str) -> Paragraph:
    return Paragraph(escape(value), _CELL_NUM)


def _day(value: date) -> str:
    """`1 Mar 2026`: the month spelled, so no reader confuses day and month."""
    return format_date(value, "d MMM y", locale=LOCALE)


def _span(start: date, end: date) -> str:
    """An end-exclusive range of days as printed: both days inclusive."""
    return f"{_day(start)} – {_day(end - timedelta(days=1))}"


def _month(period: str) -> str:
    """`2026-02` -> `Feb 2026`."""
    year, month = (int(part) for part in period.split("-"))
    return format_date(date(year, month, 1), "MMM y", locale=LOCALE)


def _fraction_pattern(minimum: int, value: Decimal | None = None) -> str:
    """A babel pattern with grouping and at least `minimum` decimals, more when `value`
    has them (a quantity or unit price is printed exactly, never rounded away)."""
    digits = minimum
    if value is not None:
        exponent = value.normalize().as_tuple().exponent
        if isinstance(exponent, int):
            digits = max(minimum, -exponent)
    return "#,##0" + ("." + "0" * digits if digits else "")


def _amount(value: Decimal, currency: str) -> str:
    """An amount at the currency's minor unit without the code: `-1,234.50`, `1,235`
    (JPY), `12.345` (KWD). Amounts arrive rounded; nothing is rounded here."""
    pattern = _fraction_pattern(minor_units(currency))
    return format_decimal(value, format=pattern, locale=LOCALE, decimal_quantization=False)


def _money(value: Decimal, currency: str) -> str:
    """An amount with its ISO code, minus after the code: `USD -1,234.50`."""
    number = _fraction_pattern(minor_units(currency))
    return format_currency(
        value,
        currency,
        format=f"¤¤ {number};¤¤ -{number}",
        locale=LOCALE,
        currency_digits=False,
        decimal_quantization=False,
    )


def _quantity(value: Decimal) -> str:
    """A quantity exactly as rated, with thousands separators: `12,500,000`, `3.25`."""
    return format_decimal(
        value, format=_fraction_pattern(0, value), locale=LOCALE, decimal_quantization=False
    )


def _unit_price(value: Decimal, currency: str) -> str:
    """At least the minor unit's decimals, and every decimal the rate card has."""
    return format_decimal(
        value,
        format=_fraction_pattern(minor_units(currency), value),
        locale=LOCALE,
        decimal_quantization=False,
    )


def _fixed(value: Decimal, places: int) -> str:
    quantum = Decimal(1).scaleb(-places)
    return format_decimal(
        value.quantize(quantum, rounding=ROUND_HALF_EVEN),
        format=_fraction_pattern(places),
        locale=LOCALE,
    )


def _count(value: int) -> str:
    return format_decimal(value, format="#,##0", locale=LOCALE)


def _percent(rate: Decimal) -> str:
    """`0.19` -> `19%`, `0.0725` -> `7.25%`."""
    percent = rate * 100
    return f"{format_decimal(percent, format=_fraction_pattern(0, percent), locale=LOCALE)}%"


def _negated(value: Decimal) -> Decimal:
    """`-value` without a negative zero (`-Decimal(0)` is `Decimal('-0')`)."""
    return Decimal(0) - value


def _kind_label(document: InvoiceDocument) -> str:
    return "Credit note" if document.kind == "credit_note" else "Invoice"


def _number(document: InvoiceDocument) -> str:
    return document.number or "draft"


# --- tables ---------------------------------------------------------------------------


def _grid(
    rows: list[list[Any]],
    widths: Sequence[float],
    *,
    header: bool = True,
    total_row: bool = False,
    extra: Sequence[tuple[Any, ...]] = (),
) -> Table:
    commands: list[tuple[Any, ...]] = [
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("LEFTPADDING", (0, 0), (-1, -1), 3),
        ("RIGHTPADDING", (0, 0), (-1, -1), 3),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
        ("LINEBELOW", (0, 0), (-1, -1), 0.25, RULE),
    ]
    if header:
        commands += [
            ("BACKGROUND", (0, 0), (-1, 0), HEAD_BG),
            ("LINEBELOW", (0, 0), (-1, 0), 0.75, GREY),
            ("VALIGN", (0, 0), (-1, 0), "BOTTOM"),
        ]
    if total_row:
        commands.append(("LINEABOVE", (0, -1), (-1, -1), 0.75, GREY))
    commands.extend(extra)
    # repeatRows: a table broken across pages shows its column headings on each page.
    table = Table(rows, colWidths=list(widths), repeatRows=1 if header else 0)
    table.setStyle(TableStyle(commands))
    return table


def _head(*labels: str, numeric_from: int, small: bool = False) -> list[Paragraph]:
    """Header cells; columns from `numeric_from` on hold numbers and align right."""
    left, right = (_SMALL_HEAD, _SMALL_HEAD_NUM) if small else (_CELL_HEAD, _CELL_HEAD_NUM)
    return [_text(label, right if i >= numeric_from else left) for i, label in enumerate(labels)]


def _heading(title: str) -> list[Flowable]:
    """A section heading that is never the last thing on a page."""
    return [CondPageBreak(SECTION_MIN_HEIGHT), Paragraph(escape(title), _SECTION)]


def _flex(*fixed: float) -> float:
    """The width left for the one wrapping column of a table of full frame width."""
    return FRAME_WIDTH - sum(fixed)


def _with_period(label: str, line: DocumentLine, document: InvoiceDocument) -> Paragraph:
    """`label`, and below it the days the line covers when that is not the whole
    period (a price change inside the month splits usage lines by plan version; the
    reader needs the days to see why one model has two prices)."""
    text = escape(label)
    start, end = line.period_start, line.period_end
    if start and end and (start, end) != (document.period_start, document.period_end):
        text += f'<br/><font size="7" color="#5f6368">{escape(_span(start, end))}</font>'
    return Paragraph(text, _CELL)


_TOKEN_CLASS_LABELS = {
    "prompt": "prompt (uncached)",
    "cached": "prompt (cached)",
    "completion": "completion",
}


def _per(line: DocumentLine, standard: int) -> str:
    """The pricing unit when a line is priced per another amount than its section's."""
    return "" if line.price_per == standard else f" / {_count(line.price_per)}"


def _token_table(lines: Sequence[DocumentLine], doc: InvoiceDocument, cur: str) -> Table:
    widths = [NO_WIDTH, 0.0, 26 * mm, 10 * mm, 26 * mm, 22 * mm, AMOUNT_WIDTH]
    widths[1] = _flex(*widths)
    rows: list[list[Any]] = [
        _head(
            "#", "Model", "Token class", "Tier", "Tokens", "Price per 1M", "Amount", numeric_from=3
        )
    ]
    for line in lines:
        token_class = line.token_class or ""
        rows.append(
            [
                _num(str(line.line_no)),
                _with_period(line.model or line.description, line, doc),
                _text(_TOKEN_CLASS_LABELS.get(token_class, token_class)),
                _num(str(line.tier) if line.tier is not None else DASH),
                _num(_quantity(line.quantity)),
                _num(_unit_price(line.unit_price, cur) + _per(line, TOKENS_PER_PRICE_UNIT)),
                _num(_amount(line.amount, cur)),
            ]
        )
    return _section_total(rows, lines, cur, widths)


def _gpu_table(lines: Sequence[DocumentLine], doc: InvoiceDocument, cur: str) -> Table:
    widths = [NO_WIDTH, 0.0, 30 * mm, 30 * mm, AMOUNT_WIDTH]
    widths[1] = _flex(*widths)
    rows: list[list[Any]] = [
        _head("#", "GPU type", "GPU-hours", "Price per GPU-hour", "Amount", numeric_from=2)
    ]
    for line in lines:
        rows.append(
            [
                _num(str(line.line_no)),
                _with_period(line.gpu_type or line.description, line, doc),
                _num(_quantity(line.quantity)),
                _num(_unit_price(line.unit_price, cur) + _per(line, 1)),
                _num(_amount(line.amount, cur)),
            ]
        )
    return _section_total(rows, lines, cur, widths)


def _window_label(window: str | None) -> str:
    if window is None or window == OFF_PEAK:
        return "off-peak (outside every time-of-use window)"
    return window


def _energy_table(lines: Sequence[DocumentLine], doc: InvoiceDocument, cur: str) -> Table:
    widths = [NO_WIDTH, 0.0, 30 * mm, 30 * mm, AMOUNT_WIDTH]
    widths[1] = _flex(*widths)
    rows: list[list[Any]] = [
        _head("#", "Time-of-use window", "Energy, kWh", "Price per kWh", "Amount", numeric_from=2)
    ]
    for line in lines:
        rows.append(
            [
                _num(str(line.line_no)),
                _with_period(_window_label(line.tou_window), line, doc),
                _num(_quantity(line.quantity)),
                _num(_unit_price(line.unit_price, cur) + _per(line, 1)),
                _num(_amount(line.amount, cur)),
            ]
        )
    return _section_total(rows, lines, cur, widths)


def _plain_table(lines: Sequence[DocumentLine], doc: InvoiceDocument, cur: str) -> Table:
    """Commitment true-up and prepaid credit: what the line is, and its amount."""
    widths = [NO_WIDTH, 0.0, AMOUNT_WIDTH]
    widths[1] = _flex(*widths)
    rows: list[list[Any]] = [_head("#", "Description", "Amount", numeric_from=2)]
    for line in lines:
        rows.append(
            [
                _num(str(line.line_no)),
                _with_period(line.description, line, doc),
                _num(_amount(line.amount, cur)),
            ]
        )
    return _section_total(rows, lines, cur, widths)


def _adjustment_table(lines: Sequence[DocumentLine], doc: InvoiceDocument, cur: str) -> Table:
    widths = [NO_WIDTH, 0.0, 26 * mm, 18 * mm, 28 * mm, AMOUNT_WIDTH]
    widths[1] = _flex(*widths)
    rows: list[list[Any]] = [
        _head(
            "#",
            "Description",
            "Corrects invoice",
            "Of period",
            "Quantity",
            "Amount",
            numeric_from=4,
        )
    ]
    for line in lines:
        unit = f" {line.unit}" if line.unit else ""
        rows.append(
            [
                _num(str(line.line_no)),
                _text(line.description),
                _text(line.adjusts_invoice or DASH),
                _text(_month(line.adjusts_period) if line.adjusts_period else DASH),
                _num(_quantity(line.quantity) + unit),
                _num(_amount(line.amount, cur)),
            ]
        )
    return _section_total(rows, lines, cur, widths)


def _tax_table(lines: Sequence[DocumentLine], doc: InvoiceDocument, cur: str) -> Table:
    widths = [NO_WIDTH, 0.0, 32 * mm, 16 * mm, AMOUNT_WIDTH]
    widths[1] = _flex(*widths)
    rows: list[list[Any]] = [
        _head("#", "Description", "Taxable amount", "Rate", "Amount", numeric_from=2)
    ]
    for line in lines:
        rows.append(
            [
                _num(str(line.line_no)),
                _with_period(line.description, line, doc),
                # The rating puts the taxable subtotal in the quantity and the rate in
                # the unit price of the tax line.
                _num(_amount(line.quantity, cur)),
                _num(_percent(line.unit_price)),
                _num(_amount(line.amount, cur)),
            ]
        )
    return _section_total(rows, lines, cur, widths)


def _section_total(
    rows: list[list[Any]], lines: Sequence[DocumentLine], cur: str, widths: Sequence[float]
) -> Table:
    """A subtotal row under a section of more than one line."""
    if len(lines) < 2:
        return _grid(rows, widths)
    total = sum((line.amount for line in lines), Decimal(0))
    label = Paragraph("Section total", _CELL_HEAD)
    row: list[Any] = ["", label] + [""] * (len(widths) - 3)
    row.append(Paragraph(escape(_amount(total, cur)), _CELL_HEAD_NUM))
    rows.append(row)
    span = [("SPAN", (1, -1), (-2, -1))]
    return _grid(rows, widths, total_row=True, extra=span)


_TableMaker = Callable[[Sequence[DocumentLine], InvoiceDocument, str], Table]

#: Sections in the rating's order (`models.rating`): what the reader adds up.
_SECTIONS: tuple[tuple[LineKind, str, _TableMaker], ...] = (
    ("tokens", "Token usage by model and token class", _token_table),
    ("gpu", "GPU-hours", _gpu_table),
    ("energy", "Energy by time-of-use window", _energy_table),
    ("commitment", "Minimum commitment true-up", _plain_table),
    ("adjustment", "Adjustments to earlier invoices (late usage)", _adjustment_table),
    ("credit", "Prepaid credit", _plain_table),
    ("tax", "Tax", _tax_table),
)


# --- blocks ---------------------------------------------------------------------------


def _header(document: InvoiceDocument) -> list[Flowable]:
    title = "CREDIT NOTE" if document.kind == "credit_note" else "INVOICE"
    top = Table(
        [[Paragraph(title, _TITLE), Paragraph(escape(document.issuer), _ISSUER)]],
        colWidths=[FRAME_WIDTH / 2, FRAME_WIDTH / 2],
    )
    top.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                ("RIGHTPADDING", (0, 0), (-1, -1), 0),
            ]
        )
    )
    out: list[Flowable] = [top, Spacer(1, 4 * mm)]
    if document.status == "draft":
        banner = Table(
            [[Paragraph("DRAFT — not a valid invoice", _BANNER)]], colWidths=[FRAME_WIDTH]
        )
        banner.setStyle(
            TableStyle(
                [
                    ("BACKGROUND", (0, 0), (-1, -1), DRAFT_BG),
                    ("TOPPADDING", (0, 0), (-1, -1), 5),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 6),
                    ("LEFTPADDING", (0, 0), (-1, -1), 6),
                ]
            )
        )
        out += [banner, Spacer(1, 4 * mm)]

    fields: list[tuple[str, str]] = [
        ("Number", _number(document)),
        ("Issued on", _day(document.issued_on) if document.issued_on else "not issued"),
        ("Bill to", document.tenant),
        ("Billing period", _span(document.period_start, document.period_end)),
        ("Currency", document.currency),
        ("Idle-energy policy", document.idle_policy),
    ]
    if document.kind == "credit_note":
        fields += [
            ("Voids invoice", document.voids or DASH),
            ("Reason", document.reason or DASH),
        ]
    fields.append(("Rate card", f"sha256:{document.rate_card_sha256[:16]}…"))
    # Two label/value pairs per row; a value wraps within its own column.
    label_w, value_w = 28 * mm, FRAME_WIDTH / 2 - 28 * mm
    rows: list[list[Any]] = []
    for i in range(0, len(fields), 2):
        row: list[Any] = []
        for label, value in fields[i : i + 2]:
            row += [_text(label, _CELL_HEAD), _text(value)]
        rows.append(row + [""] * (4 - len(row)))
    details = Table(rows, colWidths=[label_w, value_w, label_w, value_w])
    details.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
            ]
        )
    )
    out.append(details)
    return out


def _lines(document: InvoiceDocument) -> list[Flowable]:
    out: list[Flowable] = []
    cur = document.currency
    for kind, title, make in _SECTIONS:
        lines = [line for line in document.lines if line.kind == kind]
        if not lines:
            continue
        out += _heading(f"{title} ({cur})")
        out.append(make(lines, document, cur))
    return out


def _totals(document: InvoiceDocument) -> list[Flowable]:
    cur = document.currency
    rows: list[tuple[str, Decimal]] = [
        ("Usage subtotal", document.usage_subtotal),
        ("Minimum commitment true-up", document.commitment_true_up),
        ("Adjustments", document.adjustments_total),
        ("Subtotal", document.subtotal),
        # `credits_applied` is what the credit paid (positive on an invoice); it
        # reduces the amount, so it prints with the sign it has on the credit line.
        ("Prepaid credit applied", _negated(document.credits_applied)),
        ("Taxable subtotal", document.taxable_subtotal),
        (f"Tax ({_percent(document.tax_rate)})", document.tax),
        ("TOTAL DUE", document.total),
    ]
    label_w, value_w = 60 * mm, 38 * mm
    table = Table(
        [[label, _money(value, cur)] for label, value in rows],
        colWidths=[label_w, value_w],
        hAlign="RIGHT",
    )
    table.setStyle(
        TableStyle(
            [
                ("FONT", (0, 0), (-1, -1), "Helvetica", 9),
                ("ALIGN", (1, 0), (1, -1), "RIGHT"),
                ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
                ("LINEABOVE", (0, 3), (-1, 3), 0.25, RULE),
                ("LINEABOVE", (0, 5), (-1, 5), 0.25, RULE),
                ("FONT", (0, -1), (-1, -1), "Helvetica-Bold", 11),
                ("TOPPADDING", (0, -1), (-1, -1), 4),
                ("LINEABOVE", (0, -1), (-1, -1), 1, colors.black),
                ("LINEBELOW", (0, -1), (-1, -1), 1, colors.black),
            ]
        )
    )
    out: list[Flowable] = [
        *_heading(f"Totals ({cur})"),
        # The totals belong together: never split them over two pages.
        KeepTogether([table]),
    ]
    if document.kind == "invoice":
        # A credit note carries no balance of its own (its opening, granted and closing
        # credit are zero), so the block would only mislead there.
        balance = Table(
            [
                ["Prepaid credit balance", ""],
                ["Opening balance", _money(document.opening_credit, cur)],
                ["Granted this period", _money(document.credits_granted, cur)],
                ["Applied to this invoice", _money(_negated(document.credits_applied), cur)],
                ["Closing balance", _money(document.closing_credit, cur)],
            ],
            colWidths=[label_w, value_w],
            hAlign="RIGHT",
        )
        balance.setStyle(
            TableStyle(
                [
                    ("FONT", (0, 0), (-1, -1), "Helvetica", 8.5),
                    ("FONT", (0, 0), (-1, 0), "Helvetica-Bold", 8.5),
                    ("TEXTCOLOR", (0, 1), (-1, -1), GREY),
                    ("ALIGN", (1, 0), (1, -1), "RIGHT"),
                    ("TOPPADDING", (0, 0), (-1, -1), 1),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                    ("LINEABOVE", (0, -1), (-1, -1), 0.25, RULE),
                ]
            )
        )
        out += [Spacer(1, 4 * mm), KeepTogether([balance])]
    return out


def _j_per_token(kwh: Decimal, completion: int) -> Decimal | None:
    return kwh * 3_600_000 / completion if completion else None


def _usage_table(usage: Sequence[UsageSummary]) -> list[Flowable]:
    if not usage:
        return []
    widths = [0.0, 18 * mm, 17 * mm, 20 * mm, 20 * mm, 20 * mm, 16 * mm, 16 * mm, 14 * mm]
    widths[0] = _flex(*widths)
    text = partial(_text, style=_SMALL)
    num = partial(_text, style=_SMALL_NUM)
    bold = partial(_text, style=_SMALL_HEAD_NUM)
    rows: list[list[Any]] = [
        _head(
            "Model",
            "GPU type",
            "Requests",
            "Prompt tokens",
            "Cached tokens",
            "Completion tokens",
            "GPU-hours",
            "Energy, kWh",
            "J per output token",
            numeric_from=2,
            small=True,
        )
    ]

    def j_cell(value: Decimal | None) -> Paragraph:
        return num(DASH if value is None else _fixed(value, 3))

    for item in usage:
        rows.append(
            [
                text(item.model),
                text(item.gpu_type),
                num(_count(item.requests)),
                num(_count(item.prompt_tokens)),
                num(_count(item.cached_tokens)),
                num(_count(item.completion_tokens)),
                num(_fixed(item.gpu_hours, 3)),
                num(_fixed(item.energy_kwh, 3)),
                j_cell(item.j_per_output_token),
            ]
        )
    kwh = sum((item.energy_kwh for item in usage), Decimal(0))
    completion = sum(item.completion_tokens for item in usage)
    totals = [
        _count(sum(item.requests for item in usage)),
        _count(sum(item.prompt_tokens for item in usage)),
        _count(sum(item.cached_tokens for item in usage)),
        _count(completion),
        _fixed(sum((item.gpu_hours for item in usage), Decimal(0)), 3),
        _fixed(kwh, 3),
        # Over all models: total energy over total completion tokens (a weighted mean,
        # not the mean of the rows).
        DASH if not completion else _fixed(_j_per_token(kwh, completion) or Decimal(0), 3),
    ]
    rows.append([_text("Total", _SMALL_HEAD), "", *(bold(value) for value in totals)])
    note = (
        "Energy is the GPU energy measured and allocated to this tenant's requests "
        "(idle energy per the policy above); J per output token is that energy over "
        "the completion tokens."
    )
    return [
        *_heading("GPU usage and energy"),
        _grid(rows, widths, total_row=True, extra=[("SPAN", (0, -1), (1, -1))]),
        Spacer(1, 1.5 * mm),
        Paragraph(escape(note), _NOTE),
    ]


# --- pages ----------------------------------------------------------------------------


class _FixedStamp:
    """Stands in for reportlab's `TimeStamp` (the attributes it reads) with a fixed
    UTC time instead of the clock or `$SOURCE_DATE_EPOCH`."""

    def __init__(self, when: datetime) -> None:
        self.t = when.timestamp()
        self.lt = when.timetuple()
        self.YMDhms = tuple(self.lt)[:6]
        self.dhh = 0
        self.dmm = 0
        self.tzname = "UTC"


#: reportlab's own invariant date, for a draft (which has no issue date).
_INVARIANT_DATE = datetime(2000, 1, 1, tzinfo=UTC)


class _PagedCanvas(Canvas):  # type: ignore[misc]  # reportlab is untyped
    """Keeps every page until the end, then draws the footer (and the running header)
    with the page count, which is known only once the whole document is laid out."""

    def __init__(
        self,
        *args: Any,
        footer: str,
        running_head: str,
        created: datetime,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._footer = footer
        self._running_head = running_head
        self._pages: list[dict[str, Any]] = []
        # Pin the creation date and the seed of the file ID (reportlab reads them from
        # the clock or the environment when the document object is made; see the
        # module doc). Private attributes: covered by the determinism test.
        stamp = _FixedStamp(created)
        self._doc._timeStamp = stamp
        signature = md5(usedforsecurity=False)
        signature.update(b"a reportlab document")
        signature.update(ascii(stamp.t).encode("ascii"))
        self._doc.signature = signature

    def showPage(self) -> None:  # noqa: N802 - reportlab's name
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        count = len(self._pages)
        for number, state in enumerate(self._pages, start=1):
            self.__dict__.update(state)
            self._decorate(number, count)
            super().showPage()
        super().save()

    def _decorate(self, page: int, pages: int) -> None:
        self.saveState()
        self.setFont("Helvetica", 7)
        self.setFillColor(GREY)
        self.setStrokeColor(RULE)
        self.setLineWidth(0.5)
        y = MARGIN_BOTTOM - 9 * mm
        left, right = CONTENT_LEFT, PAGE_WIDTH - CONTENT_LEFT
        self.line(left, y + 3.5 * mm, right, y + 3.5 * mm)
        self.drawString(left, y, self._footer)
        self.drawRightString(right, y, f"page {page} of {pages}")
        if page > 1:
            top = PAGE_HEIGHT - MARGIN_TOP + 7 * mm
            self.drawString(left, top, self._running_head)
            self.drawRightString(right, top, f"page {page} of {pages}")
        self.restoreState()


def render_pdf(document: InvoiceDocument, *, content_sha256: str) -> bytes:
    """The document as an A4 PDF; `content_sha256` is the hex SHA-256 of its
    `canonical_json`, printed in every footer and stored in the PDF's keywords."""
    if not _SHA256.fullmatch(content_sha256):
        # The footer is how a reader matches paper to record: refuse anything else.
        raise ValueError(f"content_sha256 must be 64 lowercase hex digits, got {content_sha256!r}")
    kind = _kind_label(document)
    number = _number(document)
    title = f"{kind} {number} — {document.tenant} — {document.period}"
    footer = f"{kind} {number}  ·  content hash sha256:{content_sha256[:16]}…"
    if document.status == "draft":
        footer = f"DRAFT  ·  {footer}"
    created = (
        datetime.combine(document.issued_on, time(), tzinfo=UTC)
        if document.issued_on
        else _INVARIANT_DATE
    )
    buffer = io.BytesIO()
    template = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=MARGIN_X,
        rightMargin=MARGIN_X,
        topMargin=MARGIN_TOP,
        bottomMargin=MARGIN_BOTTOM,
        title=title,
        author=document.issuer,
        subject=(
            f"{kind} for {document.tenant}, billing period "
            f"{_span(document.period_start, document.period_end)}"
        ),
        creator=CREATOR,
        keywords=f"sha256:{content_sha256}",
        invariant=True,
        lang="en-US",
    )
    story = [
        *_header(document),
        *_lines(document),
        *_totals(document),
        *_usage_table(document.usage),
    ]
    template.build(
        story,
        canvasmaker=partial(
            _PagedCanvas,
            footer=footer,
            running_head=f"{kind} {number} — {document.tenant} — "
            f"{_span(document.period_start, document.period_end)}",
            created=created,
        ),
    )
    return buffer.getvalue()
