"""The invoice lifecycle: drafts on every run, finalize after the grace, void by credit note.

- `draft_period(settings, period)` rates every tenant with usage in the period (or a
  pending adjustment, or a minimum commitment) and rewrites its draft files. A tenant
  whose invoice for the period is final is left alone: its late usage is reported as
  pending and carried by the tenant's next draft instead.
- `finalize_period(settings, period, now=...)` is refused before the period's end plus
  `billing.grace_days` (unless forced) and while an earlier period still has drafts;
  it rates afresh, numbers each invoice (gapless, `INV-000001`), writes its files once,
  read-only, with the usage rows, Kafka watermarks and rate card it was made from, and
  records their hashes in the ledger. Finalizing twice changes nothing.
- `void_invoice(settings, number, reason)` issues a credit note that negates the
  invoice; the period is open again and its next draft bills it anew. An invoice whose
  period's late usage was carried by a later invoice cannot be voided (void that one
  first), or the late usage would be billed twice.

Late usage: the usage of a finalized period is compared, on every draft run, with
what its final invoices billed; a difference becomes adjustment lines
(`models.invoice.adjustment_lines`, rated with the card the period was finalized
under) on each open draft of a later period, and is billed by the first of them to be
finalized, which records the rows it billed for that period.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import polars as pl

from ingest.settings import Settings
from models.billing_usage import (
    DayResources,
    LineSource,
    UsageRow,
    line_sources,
    monthly_usage,
    row_delta,
    rows_by_key,
    token_line_resources,
)
from models.errors import InputError
from models.invoice import (
    InvoiceDocument,
    adjustment_lines,
    build_document,
    content_hash,
    credit_note,
    finalized,
    period_bounds,
)
from models.rate_card import RateCard, load_rate_card
from models.rating import Invoice, InvoiceLine, rate_month
from pipelines.allocation import load_allocation_config
from pipelines.billing.artifacts import render_artifacts
from pipelines.billing.index import write_period_revenue
from pipelines.billing.store import FinalRecord, InvoiceStore, rows_frame
from pipelines.billing.usage import period_rows, period_window, watermarks

__all__ = [
    "BillingRun",
    "TenantInvoice",
    "draft_period",
    "finalize_period",
    "load_card",
    "period_closes_at",
    "void_invoice",
]


@dataclass(frozen=True)
class LoadedCard:
    card: RateCard
    text: str
    sha256: str


def load_card(settings: Settings) -> LoadedCard:
    """The rate card of `settings` (`billing.rate_card_file`, else <state>/rate_card.yaml)."""
    path = settings.rate_card_path
    if not path.is_file():
        raise InputError(
            f"rate card {path} does not exist: write one (see README, 'Invoices') or set "
            "GPULEDGER_BILLING__RATE_CARD_FILE"
        )
    text = path.read_text()
    return LoadedCard(load_rate_card(text, source=str(path)), text, content_hash(text.encode()))


@dataclass(frozen=True)
class TenantInvoice:
    """A tenant's document of the run, with what it was made from."""

    document: InvoiceDocument
    #: The rating the document was built from (its lines in the document's order).
    invoice: Invoice
    rows: list[UsageRow]
    #: Periods it adjusts: period -> (rows of the difference, the invoice corrected).
    adjusted: dict[str, tuple[list[UsageRow], str | None]] = field(default_factory=dict)
    path: str = ""


@dataclass
class BillingRun:
    period: str
    invoices: list[TenantInvoice] = field(default_factory=list)
    #: Tenants whose invoice for the period is final already.
    final: list[str] = field(default_factory=list)
    #: Closed periods whose usage changed since: (tenant, period, the invoice or
    #: "not invoiced") awaiting the tenant's next invoice.
    pending: list[tuple[str, str, str]] = field(default_factory=list)


def period_closes_at(settings: Settings, period: str) -> datetime:
    _, end = period_window(period)
    return end + timedelta(days=settings.billing.grace_days)


def _previous_periods(period: str, finals: Sequence[FinalRecord]) -> list[str]:
    """Closed periods before `period`: those with a final invoice in force."""
    return sorted({r.period for r in finals if r.active and r.period < period})


def _billed_rows(
    store: InvoiceStore, finals: Sequence[FinalRecord], tenant: str, period: str
) -> list[UsageRow]:
    rows: list[UsageRow] = []
    for record in finals:
        if record.tenant == tenant and record.active:
            rows.extend(store.billed_rows(record).get(period, []))
    return list(rows_by_key(rows).values())


def _original(finals: Sequence[FinalRecord], tenant: str, period: str) -> FinalRecord | None:
    for record in finals:
        if record.tenant == tenant and record.period == period and record.active:
            return record
    return None


def _period_card(
    store: InvoiceStore, finals: Sequence[FinalRecord], period: str, tenant: str
) -> RateCard:
    """The card `period` was finalized with: the tenant's own invoice's, else (a tenant
    first seen after the close) that of any final invoice of the period."""
    record = _original(finals, tenant, period) or next(
        r for r in finals if r.active and r.period == period
    )
    sha256 = store.final_document(record).rate_card_sha256
    return load_rate_card(store.card_text(sha256), source=str(store.card_path(sha256)))


def _late_rows(
    settings: Settings,
    store: InvoiceStore,
    finals: Sequence[FinalRecord],
    tenant: str,
    period: str,
    cache: dict[str, dict[str, list[UsageRow]]],
) -> tuple[list[UsageRow], list[UsageRow], list[UsageRow]] | None:
    """(current, billed, difference) of a closed `period` for `tenant`, or None when
    nothing changed or the period is open again for the tenant (a draft of it exists:
    it is billed by finalizing that draft)."""
    if (store.draft_dir(period, tenant) / "invoice.json").is_file():
        return None
    if period not in cache:
        cache[period] = period_rows(settings, period)[0]
    current = cache[period].get(tenant, [])
    billed = _billed_rows(store, finals, tenant, period)
    delta = row_delta(current, billed)
    return (current, billed, delta) if delta else None


def _adjustments(
    settings: Settings,
    store: InvoiceStore,
    finals: Sequence[FinalRecord],
    tenant: str,
    before: str,
    cache: dict[str, dict[str, list[UsageRow]]],
) -> tuple[list[InvoiceLine], dict[str, tuple[list[UsageRow], str | None]]]:
    """Adjustment lines for every closed period before `before` whose usage of `tenant`
    changed since it was billed, including a tenant whose first usage of a closed period
    arrived after the close (no invoice to name: the whole usage is the adjustment)."""
    lines: list[InvoiceLine] = []
    adjusted: dict[str, tuple[list[UsageRow], str | None]] = {}
    for period in _previous_periods(before, finals):
        late = _late_rows(settings, store, finals, tenant, period, cache)
        if late is None:
            continue
        current, billed, delta = late
        original = _original(finals, tenant, period)
        number = original.number if original else None
        card = _period_card(store, finals, period, tenant)
        lines.extend(
            adjustment_lines(
                card, tenant, period, billed=billed, current=current, invoice_number=number
            )
        )
        adjusted[period] = (delta, number)
    return lines, adjusted


def _opening_credit(
    card: RateCard,
    store: InvoiceStore,
    finals: Sequence[FinalRecord],
    tenant: str,
    period: str,
    drafts_before: Sequence[InvoiceDocument],
) -> Decimal:
    start, _ = period_bounds(period)
    granted = sum(
        (g.amount for g in card.terms_for(tenant).credits if g.granted_on < start), Decimal(0)
    )
    applied = Decimal(0)
    for record in finals:
        if record.tenant == tenant and record.active and record.period < period:
            applied += store.final_document(record).credits_applied
    applied += sum((d.credits_applied for d in drafts_before), Decimal(0))
    return max(granted - applied, Decimal(0))


def _rate_period(
    settings: Settings,
    store: InvoiceStore,
    loaded: LoadedCard,
    period: str,
) -> BillingRun:
    run = BillingRun(period)
    finals = store.finals()
    rows_by_tenant, policies = period_rows(settings, period)
    idle_policy = "/".join(sorted(policies)) or "separate"
    cache: dict[str, dict[str, list[UsageRow]]] = {period: rows_by_tenant}
    start, end = period_bounds(period)
    # Tenants the card commits to a minimum owe it even in a month without usage.
    committed = {
        name
        for name, terms in loaded.card.tenants.items()
        if any(
            v.minimum_commitment > 0 and v.effective_from < end
            for v in loaded.card.plans[terms.plan]
        )
    }
    tenants = set(rows_by_tenant) | committed
    closed = _previous_periods(period, finals)
    for earlier in closed:
        if earlier not in cache:
            cache[earlier] = period_rows(settings, earlier)[0]
        tenants |= set(cache[earlier])
    # A tenant whose usage of a closed period shrank to nothing is owed an adjustment.
    tenants |= {r.tenant for r in finals if r.active and r.period < period}
    for tenant in sorted(tenants):
        if _original(finals, tenant, period) is not None:
            run.final.append(tenant)
            continue
        lines, adjusted = _adjustments(settings, store, finals, tenant, period, cache)
        rows = rows_by_tenant.get(tenant, [])
        if not rows and not lines and tenant not in committed:
            continue
        drafts_before = [
            store.read_document(store.draft_dir(p, tenant))
            for p in store.draft_periods()
            if p < period and (store.draft_dir(p, tenant) / "invoice.json").is_file()
        ]
        opening = _opening_credit(loaded.card, store, finals, tenant, period, drafts_before)
        usage = monthly_usage(loaded.card, tenant, start.year, start.month, rows)
        invoice = rate_month(loaded.card, usage, opening_credit=opening, adjustments=lines)
        document = build_document(
            invoice,
            rows,
            issuer=settings.billing.issuer,
            idle_policy=idle_policy,
            rate_card_sha256=loaded.sha256,
        )
        run.invoices.append(TenantInvoice(document, invoice, rows, adjusted))
        run.pending.extend(
            (tenant, p, number or "not invoiced") for p, (_, number) in adjusted.items()
        )
    # Where the tenant's invoice of this period is final already, its late usage (of this
    # period or an earlier one) waits for the tenant's next draft.
    for tenant in run.final:
        for earlier in [*closed, period]:
            if _late_rows(settings, store, finals, tenant, earlier, cache) is not None:
                original = _original(finals, tenant, earlier)
                run.pending.append(
                    (tenant, earlier, original.number if original else "not invoiced")
                )
    return run


@dataclass(frozen=True)
class _Lineage:
    sources: list[list[LineSource]]
    resources: list[dict[date, DayResources]]


def _lineage(
    loaded: LoadedCard, item: TenantInvoice, weights: tuple[dict[str, Decimal], Decimal]
) -> _Lineage:
    """Per document line: its usage rows, and (token lines) the energy and GPU time
    behind it per day. Adjustment and derived lines have no rows of this period."""
    sources = line_sources(loaded.card, item.invoice, item.rows)
    resources = token_line_resources(item.invoice.lines, sources, item.rows, *weights)
    return _Lineage(sources, resources)


def _prefill_weights(settings: Settings) -> tuple[dict[str, Decimal], Decimal]:
    """The allocation's configured prefill weights (for the FOCUS token rows' energy)."""
    config = load_allocation_config(settings)
    weights = {m: Decimal(repr(w.w_prefill)) for m, w in config.model_weights.items()}
    return weights, Decimal(repr(config.default_weights.w_prefill))


def draft_period(settings: Settings, period: str) -> BillingRun:
    """Rate the period and rewrite its drafts (see the module doc)."""
    store = InvoiceStore(settings.invoices_path)
    loaded = load_card(settings)
    weights = _prefill_weights(settings)
    with store.locked():
        run = _rate_period(settings, store, loaded, period)
        keep = set()
        for i, item in enumerate(run.invoices):
            lineage = _lineage(loaded, item, weights)
            files = render_artifacts(item.document, lineage.sources, lineage.resources)
            path = store.write_draft(period, item.document.tenant, files)
            run.invoices[i] = replace(item, path=str(path))
            keep.add(item.document.tenant)
        for tenant in store.draft_tenants(period):
            if tenant not in keep:
                store.remove_draft(period, tenant)
        write_period_revenue(settings, period)
    return run


def finalize_period(
    settings: Settings, period: str, *, now: datetime | None = None, force: bool = False
) -> BillingRun:
    """Finalize every tenant's invoice of `period` (see the module doc)."""
    moment = now or datetime.now(UTC)
    closes = period_closes_at(settings, period)
    if moment < closes and not force:
        raise InputError(
            f"billing period {period}: it closes at {closes:%Y-%m-%d %H:%M} UTC (period end + "
            f"{settings.billing.grace_days} grace days); finalize then, or pass --force"
        )
    store = InvoiceStore(settings.invoices_path)
    open_before = [p for p in store.draft_periods() if p < period]
    if open_before:
        raise InputError(
            f"billing period {period}: earlier periods have drafts that are not final "
            f"({', '.join(open_before)}); finalize them first"
        )
    loaded = load_card(settings)
    weights = _prefill_weights(settings)
    with store.locked():
        run = _rate_period(settings, store, loaded, period)
        issued_on = moment.astimezone(UTC).date()
        if run.invoices:
            store.save_card(loaded.text)
        for i, item in enumerate(run.invoices):
            tenant = item.document.tenant
            number = store.next_number(settings.billing.invoice_prefix)
            document = finalized(item.document, number, issued_on)
            lineage = _lineage(loaded, item, weights)
            files = dict(render_artifacts(document, lineage.sources, lineage.resources))
            billed = {period: item.rows, **{p: rows for p, (rows, _) in item.adjusted.items()}}
            files["billed_usage.parquet"] = _parquet(rows_frame(billed))
            marks = [watermarks(settings, p, tenant).with_columns(period=pl.lit(p)) for p in billed]
            files["watermarks.parquet"] = _parquet(pl.concat(marks, how="vertical"))
            record = store.write_final(
                document,
                files,
                extra={"adjusts": {p: n or "not invoiced" for p, (_, n) in item.adjusted.items()}},
            )
            store.remove_draft(period, tenant)
            run.invoices[i] = replace(item, document=document, path=str(record.path))
        for tenant in store.draft_tenants(period):
            store.remove_draft(period, tenant)  # nothing left to bill there
        write_period_revenue(settings, period)
    return run


def _parquet(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd", statistics=False)
    return buffer.getvalue()


def void_invoice(
    settings: Settings, number: str, *, reason: str, now: datetime | None = None
) -> FinalRecord:
    """Void final invoice `number` with a credit note; returns the credit note's record."""
    if not reason.strip():
        raise InputError("void: --reason is required (it is printed on the credit note)")
    store = InvoiceStore(settings.invoices_path)
    with store.locked():
        record = store.find(number)
        if record.kind != "invoice":
            raise InputError(
                f"void {number}: it is a {record.kind.replace('_', ' ')}, not an invoice"
            )
        if record.voided_by is not None:
            raise InputError(f"void {number}: already voided by {record.voided_by}")
        for other in store.finals():
            if (
                other.active
                and other.tenant == record.tenant
                and other.period > record.period
                and record.period in store.billed_rows(other)
            ):
                raise InputError(
                    f"void {number}: {other.number} carries late usage of {record.period}; "
                    f"void {other.number} first"
                )
        voided = store.read_document(record.path)
        moment = now or datetime.now(UTC)
        note = credit_note(
            voided,
            number=store.next_number(settings.billing.credit_note_prefix),
            issued_on=moment.astimezone(UTC).date(),
            reason=reason.strip(),
        )
        files = render_artifacts(note)
        written = store.write_final(note, files)
        store.append(
            {
                "event": "voided",
                "number": number,
                "credit_note": note.number,
                "reason": reason.strip(),
                "at": datetime.now(UTC).isoformat(),
            }
        )
        write_period_revenue(settings, record.period)
        return written
