"""The files of one invoice document: JSON, CSV of lines, PDF, FOCUS CSV and Parquet.

Every artifact is made from the one `InvoiceDocument` (and, for FOCUS, the usage rows
behind its lines), so they agree: the CSV's amounts are the JSON's, the PDF prints the
JSON's content hash. Each file holds one tenant's data only.

FOCUS rows: a usage line of the period is split into one row per UTC day it covers,
its rounded amount split over the days by the largest-remainder method in proportion
to each day's quantity, so the day rows add up to the line exactly; every other line
(true-up, adjustment, credit, tax) is one row. Adjustments and credit-note lines are
`Correction` rows: charges for an earlier period, billed in this one.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from models.billing_usage import DayResources, LineSource
from models.focus import FocusCharge, focus_frame
from models.invoice import DocumentLine, InvoiceDocument, canonical_json, content_hash
from models.invoice_pdf import render_pdf
from models.money import largest_remainder

__all__ = ["CSV_COLUMNS", "SERVICE_NAME", "focus_charges", "lines_csv", "render_artifacts"]

SERVICE_NAME = "LLM Inference"

CSV_COLUMNS = (
    "tenant",
    "document",
    "number",
    "status",
    "period",
    "currency",
    "line_no",
    "line_id",
    "kind",
    "description",
    "model",
    "token_class",
    "tier",
    "gpu_type",
    "tou_window",
    "period_start",
    "period_end",
    "quantity",
    "unit",
    "unit_price",
    "price_per",
    "amount",
    "adjusts_invoice",
    "adjusts_period",
    "adjusts_line",
)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def lines_csv(document: InvoiceDocument) -> bytes:
    """One row per line; amounts as decimal text, exactly the JSON's."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    head = {
        "tenant": document.tenant,
        "document": document.kind,
        "number": document.number or "draft",
        "status": document.status,
        "period": document.period,
        "currency": document.currency,
    }
    for line in document.lines:
        values = {**head, **line.model_dump()}
        writer.writerow([_text(values.get(column)) for column in CSV_COLUMNS])
    return buffer.getvalue().encode()


def _utc(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


_PRICING_UNITS = {"token": ("1M Tokens", "Tokens"), "GPU-hour": ("GPU-Hours", "GPU-Hours")}
_CATEGORY = {
    "tokens": "Usage",
    "gpu": "Usage",
    "energy": "Usage",
    "commitment": "Adjustment",
    "adjustment": "Usage",
    "credit": "Credit",
    "tax": "Tax",
}


def _charge(
    doc: InvoiceDocument,
    line: DocumentLine,
    *,
    start: datetime,
    end: datetime,
    amount: Decimal,
    quantity: Decimal | None,
    energy_kwh: Decimal | None,
    gpu_seconds: Decimal | None,
) -> FocusCharge:
    usage_like = line.kind in {"tokens", "gpu", "energy", "adjustment"} and line.unit != ""
    pricing_unit, consumed_unit = _PRICING_UNITS.get(line.unit, (line.unit, line.unit))
    pricing_quantity = None
    consumed = None
    if usage_like and quantity is not None:
        consumed = quantity
        pricing_quantity = quantity / line.price_per if line.price_per != 1 else quantity
    sku = None
    if line.model and line.token_class:
        sku = f"{line.model}/{line.token_class}"
    elif line.gpu_type:
        sku = f"gpu-hour/{line.gpu_type}"
    elif line.tou_window:
        sku = f"energy/{line.tou_window}"
    correction = doc.kind == "credit_note" or line.kind == "adjustment"
    return FocusCharge(
        line_id=line.line_id,
        tenant=doc.tenant,
        tenant_name=doc.tenant,
        invoice_id=doc.number,
        invoice_issuer=doc.issuer,
        provider_name=doc.issuer,
        currency=doc.currency,
        billing_period_start=_utc(doc.period_start),
        billing_period_end=_utc(doc.period_end),
        charge_period_start=start,
        charge_period_end=end,
        charge_category=_CATEGORY[line.kind],  # type: ignore[arg-type]
        is_correction=correction,
        description=line.description,
        billed_cost=amount,
        list_unit_price=line.unit_price if usage_like else None,
        pricing_quantity=pricing_quantity,
        pricing_unit=pricing_unit if usage_like else None,
        consumed_quantity=consumed,
        consumed_unit=consumed_unit if usage_like else None,
        sku_id=sku,
        sku_price_id=f"{sku}/{line.tier}" if sku and line.tier else sku,
        service_name=SERVICE_NAME,
        x_model=line.model,
        x_gpu_type=line.gpu_type,
        x_token_class=line.token_class,
        x_tier=line.tier,
        x_tou_window=line.tou_window,
        x_energy_kwh=energy_kwh,
        x_gpu_seconds=gpu_seconds,
        x_idle_policy=doc.idle_policy,
        x_adjusts_invoice_id=line.adjusts_invoice or doc.voids,
        # A minimum commitment recurs every month; other non-usage lines are one-off.
        charge_frequency="Recurring" if line.kind == "commitment" else None,
    )


def focus_charges(
    document: InvoiceDocument,
    sources: Sequence[Sequence[LineSource]] | None = None,
    resources: Sequence[Mapping[date, DayResources]] | None = None,
) -> list[FocusCharge]:
    """FOCUS charges of a document (see the module doc); `sources[i]` are the rows of
    line i (`models.billing_usage.line_sources`), absent for a credit note;
    `resources[i]` the energy and GPU time behind token line i per day
    (`models.billing_usage.token_line_resources`), carried in `x_EnergyKwh` and
    `x_GpuSeconds`."""
    charges: list[FocusCharge] = []
    period_start, period_end = _utc(document.period_start), _utc(document.period_end)
    for i, line in enumerate(document.lines):
        line_sources = sources[i] if sources is not None and i < len(sources) else []
        per_day: dict[date, Decimal] = defaultdict(Decimal)
        for source in line_sources:
            per_day[source.day] += source.quantity
        days = sorted(d for d, q in per_day.items() if q > 0)
        split = (
            document.kind == "invoice"
            and line.kind in {"tokens", "gpu", "energy"}
            and days
            and sum(per_day[d] for d in days) == line.quantity
        )
        behind = resources[i] if resources is not None and i < len(resources) else {}
        if split:
            parts = largest_remainder(line.amount, [per_day[d] for d in days], document.currency)
            for day, amount in zip(days, parts, strict=True):
                quantity = per_day[day]
                energy, gpu_s = _resources_on(line, quantity, behind.get(day))
                charges.append(
                    _charge(
                        document,
                        line,
                        start=_utc(day),
                        end=_utc(day + timedelta(days=1)),
                        amount=amount,
                        quantity=quantity,
                        energy_kwh=energy,
                        gpu_seconds=gpu_s,
                    )
                )
            continue
        start = _utc(line.period_start) if line.period_start else period_start
        end = _utc(line.period_end) if line.period_end else period_end
        total = DayResources(
            sum((r.energy_kwh for r in behind.values()), Decimal(0)),
            sum((r.gpu_hours for r in behind.values()), Decimal(0)),
        )
        energy, gpu_s = (
            _resources_on(line, line.quantity, total if behind else None)
            if line.unit
            else (None, None)
        )
        charges.append(
            _charge(
                document,
                line,
                start=start,
                end=end,
                amount=line.amount,
                quantity=line.quantity if line.unit else None,
                energy_kwh=energy,
                gpu_seconds=gpu_s,
            )
        )
    return charges


def _resources_on(
    line: DocumentLine, quantity: Decimal, behind: DayResources | None
) -> tuple[Decimal | None, Decimal | None]:
    """(kWh, GPU-seconds) behind `quantity` of `line`."""
    if line.unit == "kWh":
        return quantity, None
    if line.unit == "GPU-hour":
        return None, quantity * 3600
    if behind is None:
        return None, None
    return behind.energy_kwh, behind.gpu_hours * 3600


def render_artifacts(
    document: InvoiceDocument,
    sources: Sequence[Sequence[LineSource]] | None = None,
    resources: Sequence[Mapping[date, DayResources]] | None = None,
) -> dict[str, bytes]:
    """Every file of the document, by name; the PDF prints the JSON's content hash."""
    from pipelines.billing.focus_export import focus_bytes

    data = canonical_json(document)
    charges = focus_charges(document, sources, resources)
    focus_csv, focus_parquet = focus_bytes(focus_frame(charges))
    return {
        "invoice.json": data,
        "lines.csv": lines_csv(document),
        "invoice.pdf": render_pdf(document, content_sha256=content_hash(data)),
        "focus.csv": focus_csv,
        "focus.parquet": focus_parquet,
    }
