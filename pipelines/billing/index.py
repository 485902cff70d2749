"""What the analysts' snapshot and the efficiency mart read of the invoice store.

- `invoice_index`: every document (drafts, finals, credit notes) with its status and
  folder, for the published `mart_invoices` and the dashboard's downloads.
- `write_period_revenue`: per tenant and model, what the period's invoice billed
  (`models.revenue`), written to the lake (`billing/revenue/period=<p>/revenue.parquet`)
  where dbt's `mart_tenant_efficiency` reads it. A tenant's final invoice wins over its
  draft; a voided invoice bills nothing until the period is billed anew.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pyarrow as pa

from ingest.lake import REVENUE_SCHEMA, Lake, write_parquet_atomic
from ingest.settings import Settings
from models.invoice import InvoiceDocument
from models.revenue import billed_by_model
from pipelines.billing.store import InvoiceStore

__all__ = [
    "INVOICE_INDEX_SCHEMA",
    "invoice_index",
    "write_period_revenue",
]

_PL_MONEY = pl.Decimal(18, 6)
INVOICE_INDEX_SCHEMA = {
    "period": pl.String,
    "tenant": pl.String,
    "kind": pl.String,
    "number": pl.String,
    "status": pl.String,
    "currency": pl.String,
    "subtotal": _PL_MONEY,
    "tax": _PL_MONEY,
    "total": _PL_MONEY,
    "issued_on": pl.Date,
    "voids": pl.String,
    "voided_by": pl.String,
    "folder": pl.String,
}


def _documents(
    store: InvoiceStore, period: str | None = None
) -> list[tuple[str, str | None, InvoiceDocument, Path]]:
    """(status, voided_by, document, folder) of every document, or of one period's."""
    out: list[tuple[str, str | None, InvoiceDocument, Path]] = []
    for record in store.finals():
        if period is not None and record.period != period:
            continue
        status = "void" if record.voided_by is not None else "final"
        out.append((status, record.voided_by, store.final_document(record), record.path))
    periods = [period] if period is not None else store.draft_periods()
    for p in periods:
        for tenant in store.draft_tenants(p):
            folder = store.draft_dir(p, tenant)
            if (folder / "invoice.json").is_file():
                out.append(("draft", None, store.read_document(folder), folder))
    return out


def invoice_index(settings: Settings) -> pl.DataFrame:
    store = InvoiceStore(settings.invoices_path)
    rows = [
        {
            "period": document.period,
            "tenant": document.tenant,
            "kind": document.kind,
            "number": document.number,
            "status": status,
            "currency": document.currency,
            "subtotal": document.subtotal,
            "tax": document.tax,
            "total": document.total,
            "issued_on": document.issued_on,
            "voids": document.voids,
            "voided_by": voided_by,
            "folder": str(folder.resolve()),
        }
        for status, voided_by, document, folder in _documents(store)
    ]
    return pl.DataFrame(rows, schema=INVOICE_INDEX_SCHEMA).sort(["period", "tenant", "kind"])


def write_period_revenue(settings: Settings, period: str) -> int:
    """Rewrite the period's revenue file from the store; returns its row count."""
    store = InvoiceStore(settings.invoices_path)
    chosen: dict[str, tuple[str, InvoiceDocument]] = {}
    for status, _, document, _ in _documents(store, period):
        if document.kind != "invoice" or status == "void":
            continue
        if status == "final" or document.tenant not in chosen:
            chosen[document.tenant] = (status, document)
    written_at = datetime.now(UTC)
    rows: dict[str, list[object]] = {name: [] for name in REVENUE_SCHEMA.names}
    for tenant, (status, document) in sorted(chosen.items()):
        for item in billed_by_model(document):
            values = (
                period,
                tenant,
                item.model,
                document.currency,
                item.billed.quantize(Decimal("0.000001")),
                status,
                document.number,
                written_at,
            )
            for name, value in zip(REVENUE_SCHEMA.names, values, strict=True):
                rows[name].append(value)
    table = pa.table(rows, schema=REVENUE_SCHEMA)
    write_parquet_atomic(
        table, Lake(settings.lake_path).billing_revenue / f"period={period}" / "revenue.parquet"
    )
    return table.num_rows
