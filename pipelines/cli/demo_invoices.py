"""Demo step 7: the simulated period's invoices (drafts: the month is still open).

Writes the example rate card into the state directory when none is configured, runs
the billing assets for the month of the simulated day (drafts, with the billing checks)
and prints per tenant its plan, lines, usage, credits, tax and total, and where the
PDF, CSV, JSON and FOCUS files are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from rich.table import Table

from ingest.settings import Settings
from ingest.simulator.run import SimulationResult
from pipelines.billing.cycle import load_card, period_closes_at
from pipelines.cli.invoice import example_card_text
from pipelines.cli.progress import StepProgress
from pipelines.cli.simulate import console


def ensure_rate_card(settings: Settings) -> str:
    path = settings.rate_card_path
    if path.is_file():
        return f"rate card {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(example_card_text())
    return f"rate card {path} (the example card, written now; edit it and run again)"


def invoice_month(settings: Settings, result: SimulationResult) -> None:
    from pipelines.materialize_billing import materialize_invoices

    start = datetime.fromtimestamp(result.window_start_ms / 1000, UTC)
    period = f"{start:%Y-%m}"
    console.print(f"  {ensure_rate_card(settings)}")
    with StepProgress(console) as progress:
        run = progress.run(
            f"drafting the invoices of {period} (Dagster: invoice_drafts)",
            lambda: materialize_invoices(settings, period),
        )
    console.print(
        f"  run {run.run_id[:8]}: partition {period}, "
        f"{'succeeded' if run.success else 'FAILED'}; "
        f"{sum(c.passed for c in run.checks)}/{len(run.checks)} checks passed"
    )
    for check in run.checks:
        verdict = "passed" if check.passed else f"failed ({check.severity})"
        console.print(f"  check {check.name}: {verdict}")
        if not check.passed and check.description:
            console.print(f"    {check.description}")
    from pipelines.billing.store import InvoiceStore

    card = load_card(settings).card
    store = InvoiceStore(settings.invoices_path)
    table = Table(title=f"Invoices of {period} (drafts)", title_justify="left")
    for column in ("tenant", "plan", "lines", "usage", "credit", "tax", "total", "J/out tok"):
        table.add_column(column, justify="left" if column in {"tenant", "plan"} else "right")
    grand = Decimal(0)
    currency = card.currency
    for tenant in store.draft_tenants(period):
        doc = store.read_document(store.draft_dir(period, tenant))
        kwh = sum((u.energy_kwh for u in doc.usage), Decimal(0))
        completion = sum(u.completion_tokens for u in doc.usage)
        per_token = f"{float(kwh) * 3.6e6 / completion:.3f}" if completion else "—"
        table.add_row(
            tenant,
            card.terms_for(tenant).plan,
            str(len(doc.lines)),
            f"{doc.usage_subtotal + doc.commitment_true_up:,}",
            f"{-doc.credits_applied:,}",
            f"{doc.tax:,}",
            f"{doc.total:,}",
            per_token,
        )
        grand += doc.total
    console.print(table)
    console.print(f"  all tenants: {grand:,} {currency}")
    directory = store.root / "draft" / period
    console.print(
        f"  files: {directory}/<tenant>/invoice.pdf, lines.csv, invoice.json, focus.csv, "
        "focus.parquet (FOCUS 1.2)"
    )
    tenants = store.draft_tenants(period)
    if tenants:
        console.print(
            "  trace a line to its usage rows and requests: [cyan].venv/bin/gpuledger invoice "
            f"explain --tenant {tenants[0]} --period {period} --line 1[/cyan]"
        )
    closes = period_closes_at(settings, period)
    console.print(
        f"  {period} closes at {closes:%Y-%m-%d %H:%M} UTC; then [cyan].venv/bin/gpuledger "
        f"invoice finalize --period {period}[/cyan] numbers, hashes and freezes them"
    )
