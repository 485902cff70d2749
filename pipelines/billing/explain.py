"""Lineage of an invoice line: line -> hourly usage rows -> request ids.

For a usage line the rows are those the line was rated from (a final invoice: the rows
it stored as billed; a draft: the warehouse's rows now), each with the part of the
line's quantity it makes (`models.billing_usage.line_sources`). For an adjustment line
they are the rows of the difference it billed for the earlier period. The requests are
the ids in `marts.fct_request_allocation` behind those rows, cut by the Kafka
watermarks the invoices stored: an original line's requests are those at or below its
invoice's watermark, an adjustment's those above the watermark of what was billed
before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import polars as pl

from ingest.settings import Settings
from models.billing_usage import RowKey, UsageRow, line_sources, monthly_usage, row_delta
from models.errors import InputError
from models.invoice import DocumentLine, InvoiceDocument, period_bounds
from models.rate_card import load_rate_card
from models.rating import rate_month
from pipelines.billing.cycle import load_card
from pipelines.billing.store import FinalRecord, InvoiceStore
from pipelines.billing.usage import Watermarks, as_watermarks, period_rows, requests_for

__all__ = ["Explanation", "explain_line", "find_document"]


@dataclass(frozen=True)
class Explanation:
    document: InvoiceDocument
    line: DocumentLine
    #: (row key, the row's part of the line's quantity), in hour order.
    rows: list[tuple[RowKey, Decimal]]
    requests: pl.DataFrame
    rows_period: str
    path: Path


def find_document(
    settings: Settings, *, number: str | None, tenant: str | None, period: str | None
) -> tuple[InvoiceDocument, FinalRecord | None, Path]:
    store = InvoiceStore(settings.invoices_path)
    if number:
        record = store.find(number)
        return store.read_document(record.path), record, record.path
    if not (tenant and period):
        raise InputError("invoice explain: give NUMBER, or --tenant and --period for a draft")
    directory = store.draft_dir(period, tenant)
    if not (directory / "invoice.json").is_file():
        raise InputError(f"invoice explain: no draft for tenant {tenant!r} in {period}")
    return store.read_document(directory), None, directory


def _marks(store: InvoiceStore, record: FinalRecord, period: str) -> Watermarks:
    frame = store.watermarks(record)
    if frame is None:
        return {}
    return as_watermarks(frame.filter(pl.col("period") == period).drop("period"))


def explain_line(
    settings: Settings,
    line_no: int,
    *,
    number: str | None = None,
    tenant: str | None = None,
    period: str | None = None,
) -> Explanation:
    document, record, path = find_document(settings, number=number, tenant=tenant, period=period)
    lines = {line.line_no: line for line in document.lines}
    if line_no not in lines:
        raise InputError(
            f"invoice explain: line {line_no} does not exist "
            f"({document.number or 'draft'} has lines 1-{len(document.lines)})"
        )
    line = lines[line_no]
    store = InvoiceStore(settings.invoices_path)
    finals = [r for r in store.finals() if r.tenant == document.tenant and r.active]
    if line.kind == "adjustment" and line.adjusts_period:
        target = line.adjusts_period
        earlier = [r for r in finals if r.path != path]
        billed_before: list[UsageRow] = []
        above: Watermarks = {}
        for other in earlier:
            if record is not None and other.finalized_at >= record.finalized_at:
                continue
            billed_before.extend(store.billed_rows(other).get(target, []))
            above.update(_marks(store, other, target))
        if record is not None:
            delta = store.billed_rows(record).get(target, [])
            up_to: Watermarks | None = _marks(store, record, target)
        else:
            current = period_rows(settings, target, tenants=[document.tenant])[0]
            delta = row_delta(current.get(document.tenant, []), billed_before)
            up_to = None
        rows = [(r.key, _line_part(line, r)) for r in delta if _matches(line, r)]
        requests = requests_for(
            settings, document.tenant, [k for k, _ in rows], above=above, up_to=up_to
        )
        return Explanation(document, line, rows, requests, target, path)
    if line.kind not in {"tokens", "gpu", "energy"}:
        return Explanation(document, line, [], pl.DataFrame(), document.period, path)
    if record is not None:
        rows_all = store.billed_rows(record).get(document.period, [])
        sha256 = document.rate_card_sha256
        card = load_rate_card(store.card_text(sha256), source=str(store.card_path(sha256)))
        marks: Watermarks | None = _marks(store, record, document.period)
    else:
        rows_all = period_rows(settings, document.period, tenants=[document.tenant])[0].get(
            document.tenant, []
        )
        card = load_card(settings).card
        marks = None
    start, _ = period_bounds(document.period)
    invoice = rate_month(
        card, monthly_usage(card, document.tenant, start.year, start.month, rows_all)
    )
    sources = dict(
        zip(
            (li.line_id for li in invoice.lines),
            line_sources(card, invoice, rows_all),
            strict=True,
        )
    )
    found = sources.get(line.line_id, [])
    rows = [(s.key, s.quantity) for s in found]
    requests = requests_for(settings, document.tenant, [k for k, _ in rows], up_to=marks)
    return Explanation(document, line, rows, requests, document.period, path)


def _matches(line: DocumentLine, row: UsageRow) -> bool:
    if line.model is not None and line.token_class is not None:
        return row.model == line.model and row.tokens(line.token_class) != 0  # type: ignore[arg-type]
    if line.gpu_type is not None:
        return row.gpu_type == line.gpu_type and row.gpu_hours != 0
    if line.tou_window is not None:
        return row.energy_kwh != 0
    return not row.is_zero


def _line_part(line: DocumentLine, row: UsageRow) -> Decimal:
    if line.token_class is not None:
        return Decimal(row.tokens(line.token_class))  # type: ignore[arg-type]
    if line.gpu_type is not None:
        return row.gpu_hours
    if line.tou_window is not None:
        return row.energy_kwh
    return Decimal(row.requests)
