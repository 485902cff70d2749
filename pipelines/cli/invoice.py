"""`gpuledger invoice …`: drafts, finalize, void, list, explain, verify, the example card."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ingest.settings import Settings
from models.errors import InputError
from pipelines.cli.app import app, state
from pipelines.cli.progress import StepProgress
from pipelines.cli.simulate import console

if TYPE_CHECKING:
    from pipelines.billing.cycle import TenantInvoice

invoice_app = typer.Typer(
    help="Invoices: drafts, period close, credit notes, lineage.", no_args_is_help=True
)
app.add_typer(invoice_app, name="invoice")

_PERIOD = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def parse_period(text: str | None) -> str:
    if text is None:
        return f"{datetime.now(UTC):%Y-%m}"
    if not _PERIOD.match(text):
        raise InputError(f"--period: {text!r} is not a month (YYYY-MM, e.g. 2026-03)")
    return text


def example_card_text() -> str:
    return resources.files("models").joinpath("rate_cards/example.yaml").read_text()


def print_run(run_invoices: list[tuple[str, str, str, str, str]], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("tenant", "document", "lines", "total", "files"):
        table.add_column(column, justify="right" if column in {"lines", "total"} else "left")
    for row in run_invoices:
        table.add_row(*row)
    console.print(table)


def _rows(
    settings: Settings, invoices: Sequence[TenantInvoice]
) -> list[tuple[str, str, str, str, str]]:
    out = []
    for item in invoices:
        doc = item.document
        path = Path(item.path)
        with_root = (
            path.relative_to(settings.state_dir)
            if path.is_relative_to(settings.state_dir)
            else path
        )
        out.append(
            (
                doc.tenant,
                doc.number or "draft",
                str(len(doc.lines)),
                f"{doc.total:,} {doc.currency}",
                str(with_root),
            )
        )
    return out


@invoice_app.command("draft")
def draft_command(
    ctx: typer.Context,
    period: Annotated[str | None, typer.Option(help="Month YYYY-MM. [default: this month]")] = None,
) -> None:
    """Rate the period's usage and rewrite every tenant's draft (PDF, CSV, JSON, FOCUS)."""
    from pipelines.billing.cycle import draft_period

    settings = state(ctx).settings()
    month = parse_period(period)
    with StepProgress(console) as progress:
        run = progress.run(f"rating {month}", lambda: draft_period(settings, month))
    print_run(_rows(settings, run.invoices), f"Drafts for {month}")
    for tenant in run.final:
        console.print(f"  {tenant}: final already (late usage goes on its next invoice)")
    for tenant, late_period, number in run.pending:
        console.print(
            f"  {tenant}: usage of {late_period} changed since {number}: adjustment pending"
        )


@invoice_app.command("finalize")
def finalize_command(
    ctx: typer.Context,
    period: Annotated[str, typer.Option(help="Month YYYY-MM to close.")],
    force: Annotated[
        bool, typer.Option(help="Finalize before the period end + grace days.")
    ] = False,
) -> None:
    """Close a period: number, hash and store every tenant's invoice; never rewritten."""
    from pipelines.billing.cycle import finalize_period

    settings = state(ctx).settings()
    month = parse_period(period)
    with StepProgress(console) as progress:
        run = progress.run(
            f"finalizing {month}", lambda: finalize_period(settings, month, force=force)
        )
    print_run(_rows(settings, run.invoices), f"Finalized {month}")
    for tenant in run.final:
        console.print(f"  {tenant}: final already")


@invoice_app.command("void")
def void_command(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="The final invoice to void, e.g. INV-000003.")],
    reason: Annotated[str, typer.Option(help="Why; printed on the credit note.")],
) -> None:
    """Void a final invoice by issuing a credit note; its period is billed anew."""
    from pipelines.billing.cycle import void_invoice

    settings = state(ctx).settings()
    record = void_invoice(settings, number, reason=reason)
    console.print(f"{number} voided by credit note {record.number}: {record.path}")


@invoice_app.command("list")
def list_command(
    ctx: typer.Context,
    period: Annotated[str | None, typer.Option(help="Only this month (YYYY-MM).")] = None,
) -> None:
    """Final invoices and credit notes from the ledger, and the drafts on disk."""
    from pipelines.billing.store import InvoiceStore

    settings = state(ctx).settings()
    month = parse_period(period) if period else None
    store = InvoiceStore(settings.invoices_path)
    table = Table(title="Invoices", title_justify="left")
    for column in ("number", "kind", "tenant", "period", "status", "total"):
        table.add_column(column, justify="right" if column == "total" else "left")
    for record in store.finals():
        if month and record.period != month:
            continue
        document = store.read_document(record.path)
        status = f"void ({record.voided_by})" if record.voided_by else "final"
        if record.voids:
            status = f"voids {record.voids}"
        table.add_row(
            record.number,
            record.kind.replace("_", " "),
            record.tenant,
            record.period,
            status,
            f"{document.total:,} {document.currency}",
        )
    for draft_period in store.draft_periods():
        if month and draft_period != month:
            continue
        for tenant in store.draft_tenants(draft_period):
            document = store.read_document(store.draft_dir(draft_period, tenant))
            table.add_row(
                "draft",
                "invoice",
                tenant,
                draft_period,
                "draft",
                f"{document.total:,} {document.currency}",
            )
    console.print(table)


@invoice_app.command("explain")
def explain_command(
    ctx: typer.Context,
    number: Annotated[str | None, typer.Argument(help="A final invoice or credit note.")] = None,
    line: Annotated[int, typer.Option(min=1, help="Line number on the invoice.")] = 1,
    tenant: Annotated[str | None, typer.Option(help="For a draft: the tenant.")] = None,
    period: Annotated[str | None, typer.Option(help="For a draft: the month.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Request ids to print.")] = 10,
    requests_csv: Annotated[
        Path | None, typer.Option(help="Write every request id behind the line to this CSV.")
    ] = None,
) -> None:
    """Trace an invoice line to its hourly usage rows and from there to request ids."""
    from pipelines.billing.explain import explain_line

    settings = state(ctx).settings()
    found = explain_line(
        settings,
        line,
        number=number,
        tenant=tenant,
        period=parse_period(period) if period else None,
    )
    doc, item = found.document, found.line
    console.print(
        f"[bold]{doc.number or 'draft'}[/bold] {doc.kind.replace('_', ' ')} of {doc.tenant} "
        f"for {doc.period} ({doc.status})"
    )
    console.print(
        f"line {item.line_no} ({item.line_id}): {item.description}: "
        f"{item.quantity:,} {item.unit} x {item.unit_price} per {item.price_per:,} "
        f"= {item.amount:,} {doc.currency}"
    )
    if not found.rows:
        console.print("  a derived line: no usage rows of its own")
        return
    total = sum((q for _, q in found.rows), start=type(found.rows[0][1])(0))
    console.print(
        f"  <- {len(found.rows)} hourly usage rows of {found.rows_period} "
        f"(marts.fct_tenant_usage_hourly), summing to {total:,} {item.unit}"
    )
    table = Table(show_header=True)
    for column in ("event hour (UTC)", "model", "GPU type", f"part ({item.unit})"):
        table.add_column(column, justify="right" if column.startswith("part") else "left")
    for (hour, model, gpu_type), part in found.rows[:20]:
        table.add_row(f"{hour:%Y-%m-%d %H:00}", model, gpu_type, f"{part:,}")
    if len(found.rows) > 20:
        table.add_row("…", f"{len(found.rows) - 20} more", "", "")
    console.print(table)
    requests = found.requests
    console.print(
        f"  <- {requests.height:,} requests (marts.fct_request_allocation, usage events "
        "by Kafka partition and offset)"
    )
    for request_id in requests.head(limit)["request_id"].to_list() if requests.height else []:
        console.print(f"     {request_id}")
    if requests_csv is not None:
        requests.write_csv(requests_csv)
        console.print(f"  all {requests.height:,} written to {requests_csv}")


@invoice_app.command("verify")
def verify_command(ctx: typer.Context) -> None:
    """Re-hash every final invoice's files against the ledger."""
    from pipelines.billing.store import InvoiceStore

    settings = state(ctx).settings()
    store = InvoiceStore(settings.invoices_path)
    problems = store.verify()
    finals = store.finals()
    for problem in problems:
        console.print(f"  {problem}")
    if problems:
        raise InputError(f"{len(problems)} files of final invoices differ from the ledger")
    console.print(f"{len(finals)} final documents, every file matches its ledger hash")


@invoice_app.command("example-card")
def example_card_command(
    ctx: typer.Context,
    write: Annotated[
        bool, typer.Option(help="Write it to the configured rate card path (not over one).")
    ] = False,
) -> None:
    """Print the example rate card (or write it where the settings look for one)."""
    text = example_card_text()
    if not write:
        typer.echo(text, nl=False)
        return
    settings = state(ctx).settings()
    path = settings.rate_card_path
    if path.exists():
        raise InputError(f"rate card {path} exists already; not overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    console.print(f"example rate card written to {path}")
