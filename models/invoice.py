"""Invoice documents: what a tenant is sent, as data, plus adjustments and credit notes.

An `InvoiceDocument` is the rated `models.rating.Invoice` with what a reader needs
around it: its number (none while a draft), the period, the issuer, a usage summary
(tokens, GPU-hours, energy and J per output token per model and GPU type) and, for a
credit note, the invoice it voids. `canonical_json` is the one serialisation every
artifact is made from; its SHA-256 is the document's content hash.

Late usage (`adjustment_lines`): a finalized invoice never changes. When the usage of
its period grows (or shrinks) afterwards, the period is rated again with the rate card
it was finalized under, once from what was billed and once from the usage as it is now;
the differences of the usage and true-up lines become `adjustment` lines on the next
invoice, each naming the invoice and the line it corrects. Rating both sides the same
way prices late tokens at the tier they really fall in, and the differences of rounded
amounts are themselves at the minor unit.

A credit note (`credit_note`) negates every line and total of the invoice it voids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import date
from decimal import Decimal
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict

from models.billing_usage import UsageRow, monthly_usage, rows_by_key
from models.rate_card import RateCard
from models.rating import Invoice, InvoiceLine, LineKind, rate_month

__all__ = [
    "DocumentLine",
    "InvoiceDocument",
    "UsageSummary",
    "adjustment_lines",
    "build_document",
    "canonical_json",
    "content_hash",
    "credit_note",
    "period_bounds",
    "period_key",
    "usage_summary",
]

DocumentKind = Literal["invoice", "credit_note"]
DocumentStatus = Literal["draft", "final"]
#: Usage and true-up lines are what late usage can change.
_ADJUSTABLE: frozenset[str] = frozenset({"tokens", "gpu", "energy", "commitment"})


def period_key(year: int, month: int) -> str:
    return f"{year:04d}-{month:02d}"


def period_bounds(period: str) -> tuple[date, date]:
    """`2026-03` -> (2026-03-01, 2026-04-01)."""
    year, month = (int(part) for part in period.split("-"))
    start = date(year, month, 1)
    return start, date(year + month // 12, month % 12 + 1, 1)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class DocumentLine(_Frozen):
    """One line as printed and exported; `amount` is at the currency's minor unit."""

    line_no: int
    line_id: str
    kind: LineKind
    description: str
    quantity: Decimal
    unit: str
    unit_price: Decimal
    price_per: int
    amount: Decimal
    period_start: date | None = None
    period_end: date | None = None
    model: str | None = None
    token_class: str | None = None
    tier: int | None = None
    gpu_type: str | None = None
    tou_window: str | None = None
    adjusts_invoice: str | None = None
    adjusts_period: str | None = None
    adjusts_line: str | None = None


class UsageSummary(_Frozen):
    """A model on a GPU type over the period: what the tenant's requests used."""

    model: str
    gpu_type: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    gpu_hours: Decimal
    energy_kwh: Decimal
    #: Allocated energy per completion token, J (None without completion tokens).
    j_per_output_token: Decimal | None


class InvoiceDocument(_Frozen):
    """An invoice or credit note of one tenant for one billing period."""

    kind: DocumentKind = "invoice"
    status: DocumentStatus
    number: str | None = None
    tenant: str
    period: str
    period_start: date
    period_end: date
    issued_on: date | None = None
    issuer: str
    currency: str
    idle_policy: str
    rate_card_sha256: str
    lines: tuple[DocumentLine, ...]
    usage: tuple[UsageSummary, ...] = ()
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
    #: A credit note: the number of the invoice it voids, and why.
    voids: str | None = None
    reason: str | None = None


def _document_line(line_no: int, line: InvoiceLine) -> DocumentLine:
    return DocumentLine(line_no=line_no, line_id=line.line_id, **asdict(line))


_J_PLACES = Decimal("0.0001")


def usage_summary(rows: Sequence[UsageRow]) -> tuple[UsageSummary, ...]:
    """Per model and GPU type: requests, tokens, GPU-hours, kWh and J per output token."""
    merged: dict[tuple[str, str], list[UsageRow]] = {}
    for row in rows:
        merged.setdefault((row.model, row.gpu_type), []).append(row)
    out = []
    for (model, gpu_type), group in sorted(merged.items()):
        completion = sum(r.completion_tokens for r in group)
        kwh = sum((r.energy_kwh for r in group), Decimal(0))
        per_token = (kwh * 3_600_000 / completion).quantize(_J_PLACES) if completion else None
        out.append(
            UsageSummary(
                model=model,
                gpu_type=gpu_type,
                requests=sum(r.requests for r in group),
                prompt_tokens=sum(r.prompt_tokens for r in group),
                cached_tokens=sum(r.cached_tokens for r in group),
                completion_tokens=completion,
                gpu_hours=sum((r.gpu_hours for r in group), Decimal(0)),
                energy_kwh=kwh,
                j_per_output_token=per_token,
            )
        )
    return tuple(out)


def build_document(
    invoice: Invoice,
    rows: Sequence[UsageRow],
    *,
    issuer: str,
    idle_policy: str,
    rate_card_sha256: str,
    status: DocumentStatus = "draft",
    number: str | None = None,
    issued_on: date | None = None,
) -> InvoiceDocument:
    start, end = period_bounds(period_key(invoice.year, invoice.month))
    return InvoiceDocument(
        status=status,
        number=number,
        tenant=invoice.tenant,
        period=period_key(invoice.year, invoice.month),
        period_start=start,
        period_end=end,
        issued_on=issued_on,
        issuer=issuer,
        currency=invoice.currency,
        idle_policy=idle_policy,
        rate_card_sha256=rate_card_sha256,
        lines=tuple(_document_line(i + 1, line) for i, line in enumerate(invoice.lines)),
        usage=usage_summary(rows),
        usage_subtotal=invoice.usage_subtotal,
        commitment_true_up=invoice.commitment_true_up,
        adjustments_total=invoice.adjustments_total,
        subtotal=invoice.subtotal,
        credits_applied=invoice.credits_applied,
        taxable_subtotal=invoice.taxable_subtotal,
        tax_rate=invoice.tax_rate,
        tax=invoice.tax,
        total=invoice.total,
        opening_credit=invoice.opening_credit,
        credits_granted=invoice.credits_granted,
        closing_credit=invoice.closing_credit,
    )


def finalized(document: InvoiceDocument, number: str, issued_on: date) -> InvoiceDocument:
    """The draft `document` as the final invoice `number`, issued on `issued_on`."""
    return document.model_copy(update={"status": "final", "number": number, "issued_on": issued_on})


def canonical_json(document: InvoiceDocument) -> bytes:
    """The document as JSON with sorted keys, decimals as strings: same document, same
    bytes."""
    return orjson.dumps(
        document.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2
    )


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rate_rows(card: RateCard, tenant: str, period: str, rows: Sequence[UsageRow]) -> Invoice:
    start, _ = period_bounds(period)
    usage = monthly_usage(card, tenant, start.year, start.month, rows)
    return rate_month(card, usage)


def adjustment_lines(
    card: RateCard,
    tenant: str,
    period: str,
    *,
    billed: Sequence[UsageRow],
    current: Sequence[UsageRow],
    invoice_number: str | None,
) -> list[InvoiceLine]:
    """Lines correcting finalized invoice `invoice_number` of `period` for usage that
    changed since (see the module doc); empty when nothing billable changed.
    `invoice_number` is None for a tenant without an invoice for the period (its first
    usage of the period arrived after the period was closed).

    `card` is the rate card the invoice was finalized under; `billed` the rows it (and
    earlier adjustments of the same period) billed, `current` the period's rows now.
    """
    if rows_by_key(billed) == rows_by_key(current):
        return []
    before = _rate_rows(card, tenant, period, billed)
    after = _rate_rows(card, tenant, period, current)
    old = {line.line_id: line for line in before.lines if line.kind in _ADJUSTABLE}
    new = {line.line_id: line for line in after.lines if line.kind in _ADJUSTABLE}
    lines = []
    for line_id in sorted(old.keys() | new.keys()):
        was, now = old.get(line_id), new.get(line_id)
        template = now or was
        assert template is not None
        amount = (now.amount if now else Decimal(0)) - (was.amount if was else Decimal(0))
        quantity = (now.quantity if now else Decimal(0)) - (was.quantity if was else Decimal(0))
        if not amount and not quantity:
            continue
        lines.append(
            replace(
                template,
                kind="adjustment",
                description=(
                    f"{template.description} ({period}, {invoice_number or 'not invoiced'}): "
                    "late usage"
                ),
                amount=amount,
                quantity=quantity,
                adjusts_invoice=invoice_number,
                adjusts_period=period,
                adjusts_line=line_id,
            )
        )
    return lines


def credit_note(
    voided: InvoiceDocument, *, number: str, issued_on: date, reason: str
) -> InvoiceDocument:
    """The credit note voiding final invoice `voided`: every line and total negated."""
    if voided.status != "final" or voided.number is None or voided.kind != "invoice":
        raise ValueError("only a final invoice can be voided by a credit note")
    lines = tuple(
        line.model_copy(
            update={
                "amount": -line.amount,
                "quantity": -line.quantity,
                "description": f"reversal of {voided.number} line {line.line_no}: "
                f"{line.description}",
            }
        )
        for line in voided.lines
    )
    negated = {
        name: -getattr(voided, name)
        for name in (
            "usage_subtotal",
            "commitment_true_up",
            "adjustments_total",
            "subtotal",
            "credits_applied",
            "taxable_subtotal",
            "tax",
            "total",
        )
    }
    return voided.model_copy(
        update={
            "kind": "credit_note",
            "number": number,
            "issued_on": issued_on,
            "lines": lines,
            "voids": voided.number,
            "reason": reason,
            "opening_credit": Decimal(0),
            "credits_granted": Decimal(0),
            "closing_credit": Decimal(0),
            **negated,
        }
    )
