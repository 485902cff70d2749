"""Checks on a billing period's documents, for Dagster asset checks, the CLI and tests.

Each reads what the invoice store holds now (and, for tokens, the warehouse) and
returns a small report: `passed`, the `problems` found (each names the document or
file, the field and what was expected), and the figures it looked at.

- `lines_sum_to_totals`: in every document of the period (drafts, finals, credit
  notes) the line amounts add up to the total; `lines.csv` has the JSON's lines with
  the JSON's amounts; `BilledCost` of `focus.csv` and of `focus.parquet` adds up to the
  total. Amounts are read as `Decimal` from their text (CSV) or decimal column
  (Parquet), never through float.
- `tokens_billed`: per tenant, prompt tokens (cached included) and completion tokens
  of `marts.fct_tenant_usage_hourly` for the period equal the token lines of the
  period's documents plus the token quantities of `adjustment` lines for the period on
  any document. A voided invoice and its credit note cancel out, so every final
  document can be counted as it is. Where the tenant's invoice for the period is final
  and the usage grew (or shrank) since, the difference is *pending*, not a mismatch:
  a later draft carries it (or the next draft run will), and it is billed when that
  draft is finalized. Pending alone fails the check at WARN; a mismatch is an error.
- `tenant_isolation`: every file under a tenant's directories
  (`draft/<period>/<tenant>/`, `final/<period>/<tenant>/<number>/`) holds that tenant
  only: the `tenant` of JSON files, the `tenant` column of CSV and Parquet files, the
  FOCUS `BillingAccountId` (and `SubAccountId` where present), and no other known
  tenant id as a whole word in the PDF's text (or any other text file). Known tenants:
  those of the period's documents and directories, and of the rate card.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from ingest.settings import Settings
from models.errors import InputError
from models.invoice import InvoiceDocument
from pipelines.billing.cycle import load_card
from pipelines.billing.store import FinalRecord, InvoiceStore
from pipelines.billing.usage import period_rows, period_window

__all__ = [
    "IsolationReport",
    "SumsReport",
    "TokenDifference",
    "TokensReport",
    "lines_sum_to_totals",
    "tenant_isolation",
    "tokens_billed",
]

TokenKind = Literal["prompt", "completion"]
TOKEN_KINDS: tuple[TokenKind, ...] = ("prompt", "completion")
#: Token classes of token lines, by the kind of usage they bill: prompt tokens in the
#: usage include the cached ones, which the rating bills as their own class.
_KIND_OF_CLASS: dict[str, TokenKind] = {
    "prompt": "prompt",
    "cached": "prompt",
    "completion": "completion",
}
#: Characters of a tenant id (models.rate_card.TENANT_ID_PATTERN).
_ID_CHARS = "A-Za-z0-9._-"


# Documents of a period ------------------------------------------------------------


@dataclass(frozen=True)
class _Doc:
    label: str  # "draft 2026-05/acme" or "INV-000001"
    directory: Path
    status: Literal["draft", "final"]
    record: FinalRecord | None = None


def _period_docs(store: InvoiceStore, period: str) -> list[_Doc]:
    docs = [
        _Doc(f"draft {period}/{tenant}", store.draft_dir(period, tenant), "draft")
        for tenant in store.draft_tenants(period)
    ]
    docs += [
        _Doc(record.number, record.path, "final", record)
        for record in store.finals()
        if record.period == period
    ]
    return docs


def _all_docs(store: InvoiceStore) -> list[_Doc]:
    docs = [
        _Doc(f"draft {period}/{tenant}", store.draft_dir(period, tenant), "draft")
        for period in store.draft_periods()
        for tenant in store.draft_tenants(period)
    ]
    docs += [_Doc(r.number, r.path, "final", r) for r in store.finals()]
    return docs


@contextlib.contextmanager
def _consistent(store: InvoiceStore) -> Iterator[None]:
    """Hold the store's lock while reading, so no finalize is seen half done; a store
    that does not exist yet is not created."""
    if not store.root.is_dir():
        yield
        return
    with store.locked():
        yield


def _decimal(text: str | None, where: str) -> Decimal:
    if text is None or text.strip() == "":
        raise ValueError(f"{where}: empty, expected a decimal amount")
    try:
        return Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{where}: {text!r} is not a decimal amount") from None


# lines_sum_to_totals --------------------------------------------------------------


@dataclass
class SumsReport:
    period: str
    documents: int = 0
    lines: int = 0
    focus_rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _check_lines_csv(doc: _Doc, document: InvoiceDocument, report: SumsReport) -> None:
    path = doc.directory / "lines.csv"
    if not path.is_file():
        report.problems.append(f"{doc.label}: lines.csv is missing")
        return
    rows = _csv_rows(path)
    if len(rows) != len(document.lines):
        report.problems.append(
            f"{doc.label}: lines.csv has {len(rows)} lines, invoice.json {len(document.lines)}"
        )
    for row, line in zip(rows, document.lines, strict=False):
        where = f"{doc.label}: lines.csv line_no {row.get('line_no')}"
        if row.get("line_id") != line.line_id:
            report.problems.append(
                f"{where}: line_id {row.get('line_id')!r}, invoice.json has {line.line_id!r}"
            )
            continue
        try:
            amount = _decimal(row.get("amount"), f"{where} amount")
        except ValueError as exc:
            report.problems.append(str(exc))
            continue
        if amount != line.amount:
            report.problems.append(
                f"{where} ({line.line_id}): amount {amount}, invoice.json has {line.amount}"
            )


def _focus_csv_sum(path: Path) -> tuple[Decimal, int]:
    rows = _csv_rows(path)
    total = Decimal(0)
    for i, row in enumerate(rows):
        total += _decimal(row.get("BilledCost"), f"{path.name} row {i + 1} BilledCost")
    return total, len(rows)


def _focus_parquet_sum(path: Path) -> tuple[Decimal, int]:
    # A DECIMAL column reads back as decimal.Decimal: exact, no float on the way.
    values = pq.read_table(path, columns=["BilledCost"]).column("BilledCost").to_pylist()
    total = Decimal(0)
    for i, value in enumerate(values):
        if not isinstance(value, Decimal):
            raise ValueError(
                f"{path.name} row {i + 1} BilledCost: {value!r}, expected a decimal amount"
            )
        total += value
    return total, len(values)


def lines_sum_to_totals(settings: Settings, period: str) -> SumsReport:
    """Every document of `period`: lines add up to the total, in the JSON, the CSV and
    both FOCUS files (see the module doc)."""
    period_window(period)  # a bad period is an InputError, not a failed check
    store = InvoiceStore(settings.invoices_path)
    report = SumsReport(period)
    with _consistent(store):
        docs = _period_docs(store, period)
        for doc in docs:
            try:
                document = store.read_document(doc.directory)
            except (InputError, ValueError) as exc:
                report.problems.append(f"{doc.label}: invoice.json: {str(exc).splitlines()[0]}")
                continue
            report.documents += 1
            report.lines += len(document.lines)
            line_sum = sum((line.amount for line in document.lines), Decimal(0))
            if line_sum != document.total:
                report.problems.append(
                    f"{doc.label}: invoice.json lines add up to {line_sum}, "
                    f"its total is {document.total}"
                )
            _check_lines_csv(doc, document, report)
            for name, summed in (
                ("focus.csv", _focus_csv_sum),
                ("focus.parquet", _focus_parquet_sum),
            ):
                path = doc.directory / name
                if not path.is_file():
                    report.problems.append(f"{doc.label}: {name} is missing")
                    continue
                try:
                    billed, rows = summed(path)
                except (ValueError, OSError, KeyError) as exc:
                    report.problems.append(f"{doc.label}: {str(exc).splitlines()[0]}")
                    continue
                if name == "focus.csv":
                    report.focus_rows += rows
                if billed != document.total:
                    report.problems.append(
                        f"{doc.label}: {name} BilledCost adds up to {billed}, "
                        f"the total is {document.total}"
                    )
    return report


# tokens_billed --------------------------------------------------------------------


@dataclass(frozen=True)
class TokenDifference:
    tenant: str
    kind: TokenKind
    usage: int
    billed: int
    #: Of `billed`, what final documents bill; the rest is on drafts.
    billed_final: int
    detail: str

    def __str__(self) -> str:
        return (
            f"{self.tenant} {self.kind} tokens: usage {self.usage}, billed {self.billed} "
            f"({self.billed_final} on finals): {self.detail}"
        )


@dataclass
class TokensReport:
    period: str
    tenants: int = 0
    usage_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_KINDS, 0))
    billed_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_KINDS, 0))
    mismatches: list[TokenDifference] = field(default_factory=list)
    pending: list[TokenDifference] = field(default_factory=list)
    problems_reading: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not (self.mismatches or self.pending or self.problems_reading)

    @property
    def only_pending(self) -> bool:
        return bool(self.pending) and not (self.mismatches or self.problems_reading)

    @property
    def problems(self) -> list[str]:
        return [*self.problems_reading, *map(str, self.mismatches), *map(str, self.pending)]


_Counts = dict[tuple[str, TokenKind], int]


def _add_token_lines(counts: _Counts, document: InvoiceDocument, *, own: bool, period: str) -> None:
    """Token quantities a document bills for `period`: its token lines when it is a
    document of the period (`own`), and its adjustment lines for the period."""
    for line in document.lines:
        kind = _KIND_OF_CLASS.get(line.token_class or "")
        if kind is None:
            continue
        if (own and line.kind == "tokens") or (
            line.kind == "adjustment" and line.adjusts_period == period
        ):
            counts[document.tenant, kind] += int(line.quantity)


def _token_verdict(
    used: int, on_finals: int, on_drafts: int, *, recorded: int, final: bool, drafted: bool
) -> tuple[bool, str] | None:
    """None when the tokens are billed; else (pending?, why)."""
    billed = on_finals + on_drafts
    if not final:
        if used == billed:
            return None
        if drafted:
            return False, "the draft does not bill the usage"
        return False, "no draft or final invoice of the period bills it"
    if drafted:
        return False, "the tenant has a draft and an active final invoice for the period"
    if on_finals != recorded:
        return False, (
            f"final documents bill {on_finals}, the usage rows they recorded as billed "
            f"hold {recorded}"
        )
    if used == billed:
        if not on_drafts:
            return None
        return True, (
            f"late usage of {on_drafts} is on a draft adjustment, billed when that draft "
            "is finalized"
        )
    if used == on_finals:
        return True, (
            f"drafts adjust {on_drafts} the usage no longer has; the next draft run of the "
            "later period drops it"
        )
    return True, (
        f"late usage of {used - on_finals} since the invoice was finalized, drafts carry "
        f"{on_drafts}: the next draft run of a later period carries it"
    )


def tokens_billed(settings: Settings, period: str) -> TokensReport:
    """Tokens of the period's usage against what its documents bill (see the module doc)."""
    period_window(period)
    store = InvoiceStore(settings.invoices_path)
    report = TokensReport(period)
    with _consistent(store):
        usage_rows, _ = period_rows(settings, period)
        finals = store.finals()
        final_counts: _Counts = defaultdict(int)
        draft_counts: _Counts = defaultdict(int)
        drafted: set[str] = set()
        for doc in _all_docs(store):
            try:
                document = store.read_document(doc.directory)
            except (InputError, ValueError) as exc:
                report.problems_reading.append(
                    f"{doc.label}: invoice.json: {str(exc).splitlines()[0]}"
                )
                continue
            own = document.period == period
            if own and doc.status == "draft":
                drafted.add(document.tenant)
            counts = final_counts if doc.status == "final" else draft_counts
            _add_token_lines(counts, document, own=own, period=period)
        # What the active finals recorded as billed for the period (their usage rows).
        recorded: _Counts = defaultdict(int)
        final_tenants = set()
        for record in finals:
            if not record.active:
                continue
            if record.period == period:
                final_tenants.add(record.tenant)
            for row in store.billed_rows(record).get(period, []):
                recorded[record.tenant, "prompt"] += row.prompt_tokens
                recorded[record.tenant, "completion"] += row.completion_tokens
    usage: _Counts = defaultdict(int)
    for tenant, rows in usage_rows.items():
        for row in rows:
            usage[tenant, "prompt"] += row.prompt_tokens
            usage[tenant, "completion"] += row.completion_tokens
    tenants = sorted(
        {t for t, _ in usage} | {t for t, _ in final_counts} | {t for t, _ in draft_counts}
    )
    report.tenants = len(tenants)
    for tenant in tenants:
        for kind in TOKEN_KINDS:
            key = (tenant, kind)
            used, on_finals, on_drafts = usage[key], final_counts[key], draft_counts[key]
            report.usage_tokens[kind] += used
            report.billed_tokens[kind] += on_finals + on_drafts
            verdict = _token_verdict(
                used,
                on_finals,
                on_drafts,
                recorded=recorded[key],
                final=tenant in final_tenants,
                drafted=tenant in drafted,
            )
            if verdict is None:
                continue
            pending, detail = verdict
            difference = TokenDifference(
                tenant, kind, used, on_finals + on_drafts, on_finals, detail
            )
            (report.pending if pending else report.mismatches).append(difference)
    return report


# tenant_isolation -----------------------------------------------------------------


@dataclass
class IsolationReport:
    period: str
    directories: int = 0
    files: int = 0
    known_tenants: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def _tenant_dirs(store: InvoiceStore, period: str) -> list[tuple[str, Path]]:
    """(tenant, directory) of every draft and final document directory of `period`."""
    dirs = [(t, store.draft_dir(period, t)) for t in store.draft_tenants(period)]
    final_root = store.root / "final" / period
    if final_root.is_dir():
        for tenant_dir in sorted(p for p in final_root.iterdir() if p.is_dir()):
            # Hidden directories are finals being written (renamed into place whole).
            dirs += [
                (tenant_dir.name, number_dir)
                for number_dir in sorted(tenant_dir.iterdir())
                if number_dir.is_dir() and not number_dir.name.startswith(".")
            ]
            dirs += [
                (tenant_dir.name, tenant_dir / f.name)
                for f in tenant_dir.iterdir()
                if f.is_file()  # a file beside the numbers: checked as the tenant's too
            ]
    return dirs


def _card_tenants(settings: Settings) -> set[str]:
    try:
        return set(load_card(settings).card.tenants)
    except InputError:
        return set()  # no card (yet): the documents still name their tenants


def _word_pattern(tenants: Iterable[str]) -> re.Pattern[str] | None:
    names = sorted(set(tenants), key=len, reverse=True)
    if not names:
        return None
    # A whole id: not inside a longer id (acme vs acme-2), a sentence's full stop allowed.
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(?<![{_ID_CHARS}])({alternatives})(?![A-Za-z0-9_-])(?!\.[A-Za-z0-9])")


def _pdf_text(path: Path) -> str:
    # Imported here: without pypdf only this check fails, not loading the definitions.
    from pypdf import PdfReader

    reader = PdfReader(path)
    return "\n".join(page.extract_text() or "" for page in reader.pages)


def _column_values(path: Path, columns: Iterable[str]) -> dict[str, set[str]]:
    """Distinct values of those of `columns` that a CSV or Parquet file has."""
    wanted = list(columns)
    if path.suffix == ".csv":
        rows = _csv_rows(path)
        present = [c for c in wanted if rows and c in rows[0]]
        return {c: {r[c] for r in rows} for c in present}
    schema = pq.read_schema(path)
    present = [c for c in wanted if c in schema.names]
    if not present:
        return {}
    table = pq.read_table(path, columns=present)
    return {c: {str(v) for v in table.column(c).to_pylist() if v is not None} for c in present}


_ID_COLUMNS = ("tenant", "BillingAccountId", "SubAccountId")


def _file_tenants(path: Path, others: re.Pattern[str] | None) -> tuple[set[str], str]:
    """Tenant ids `path` names (by field), and the first other tenant its text names."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        data: Any = json.loads(path.read_bytes())
        named = {str(data["tenant"])} if isinstance(data, dict) and "tenant" in data else set()
        return named, ""
    if suffix in {".csv", ".parquet"}:
        values = _column_values(path, _ID_COLUMNS)
        return {v for column in values.values() for v in column if v != ""}, ""
    text = _pdf_text(path) if suffix == ".pdf" else path.read_bytes().decode("utf-8", "replace")
    found = others.search(text) if others is not None else None
    return set(), found.group(1) if found else ""


def tenant_isolation(settings: Settings, period: str) -> IsolationReport:
    """Every file in a tenant's directories of `period` holds that tenant only (see the
    module doc)."""
    period_window(period)
    store = InvoiceStore(settings.invoices_path)
    report = IsolationReport(period)
    with _consistent(store):
        dirs = _tenant_dirs(store, period)
        known = {tenant for tenant, _ in dirs} | _card_tenants(settings)
        for doc in _period_docs(store, period):
            with contextlib.suppress(InputError, ValueError):
                known.add(store.read_document(doc.directory).tenant)
        report.known_tenants = sorted(known)
        report.directories = len({d for _, d in dirs if d.is_dir()})
        for tenant, directory in dirs:
            others = _word_pattern(known - {tenant})
            files = sorted(directory.rglob("*")) if directory.is_dir() else [directory]
            for path in files:
                if not path.is_file():
                    continue
                report.files += 1
                where = path.relative_to(store.root)
                try:
                    named, mentioned = _file_tenants(path, others)
                except Exception as exc:  # unreadable: it cannot be shown to hold one tenant
                    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    report.problems.append(f"{where}: cannot be read ({first})")
                    continue
                foreign = sorted(named - {tenant})
                if foreign:
                    report.problems.append(
                        f"{where}: holds tenant {', '.join(foreign)}, expected {tenant} only"
                    )
                if mentioned:
                    report.problems.append(
                        f"{where}: its text names tenant {mentioned}, expected {tenant} only"
                    )
    return report
