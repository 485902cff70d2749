"""The invoice store: drafts that are rewritten, finals that never are, and the ledger.

Layout under `settings.invoices_path`::

    ledger.jsonl                              append-only: finalized / voided, fsync'ed
    cards/<sha256>.yaml                       every rate card a final was rated with
    draft/<period>/<tenant>/                  rewritten on every run
    final/<period>/<tenant>/<number>/         written once, read-only, hashed
        invoice.json invoice.pdf lines.csv focus.csv focus.parquet
        billed_usage.parquet                  the usage rows it billed, per period
        watermarks.parquet                    Kafka offsets of the requests it billed
        manifest.json                         SHA-256 of every file above

The rate card a final was rated with is kept by content hash under `cards/` (the
document names it in `rate_card_sha256`), outside the tenant's folder: a card lists
every tenant's terms, and a tenant's folder holds that tenant's data only.

A final directory is built beside its place and renamed into it, so it appears whole
or not at all; its files are then made read-only. The ledger names each final with the
hashes of its files, so `verify` can prove no byte changed. Every change to the store
(finalize, void) holds an exclusive lock on `.lock`; numbers are gapless per prefix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl

from ingest.lake import atomic_path, fsync_dir
from models.billing_usage import UsageRow
from models.errors import InputError
from models.invoice import InvoiceDocument, content_hash

__all__ = ["FinalRecord", "InvoiceStore", "rows_frame", "rows_from_frame"]

_DEC = pl.Decimal(24, 6)
ROWS_SCHEMA = {
    "period": pl.String,
    "event_hour": pl.Datetime("us", "UTC"),
    "model": pl.String,
    "gpu_type": pl.String,
    "requests": pl.Int64,
    "prompt_tokens": pl.Int64,
    "cached_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "gpu_hours": _DEC,
    "energy_kwh": _DEC,
}


def rows_frame(rows_by_period: Mapping[str, list[UsageRow]]) -> pl.DataFrame:
    records = [
        {
            "period": period,
            "event_hour": row.event_hour,
            "model": row.model,
            "gpu_type": row.gpu_type,
            "requests": row.requests,
            "prompt_tokens": row.prompt_tokens,
            "cached_tokens": row.cached_tokens,
            "completion_tokens": row.completion_tokens,
            "gpu_hours": row.gpu_hours,
            "energy_kwh": row.energy_kwh,
        }
        for period, rows in sorted(rows_by_period.items())
        for row in rows
    ]
    return pl.DataFrame(records, schema=ROWS_SCHEMA)


def rows_from_frame(frame: pl.DataFrame) -> dict[str, list[UsageRow]]:
    out: dict[str, list[UsageRow]] = {}
    for r in frame.iter_rows(named=True):
        out.setdefault(r["period"], []).append(
            UsageRow(
                event_hour=r["event_hour"].astimezone(UTC),
                model=r["model"],
                gpu_type=r["gpu_type"],
                requests=r["requests"],
                prompt_tokens=r["prompt_tokens"],
                cached_tokens=r["cached_tokens"],
                completion_tokens=r["completion_tokens"],
                gpu_hours=Decimal(r["gpu_hours"]),
                energy_kwh=Decimal(r["energy_kwh"]),
            )
        )
    return out


@dataclass(frozen=True)
class FinalRecord:
    """A finalized document as the ledger lists it."""

    number: str
    kind: str
    tenant: str
    period: str
    path: Path
    sha256: dict[str, str]
    finalized_at: str
    voided_by: str | None = None
    voids: str | None = None

    @property
    def active(self) -> bool:
        return self.voided_by is None and self.kind == "invoice"


class InvoiceStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        # A final's files never change: what one store reads of them, it reads once.
        self._billed: dict[Path, dict[str, list[UsageRow]]] = {}
        self._finals: dict[Path, InvoiceDocument] = {}

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.jsonl"

    def card_path(self, sha256: str) -> Path:
        return self.root / "cards" / f"{sha256}.yaml"

    def save_card(self, text: str) -> str:
        """Keep a rate card by its content hash (once, read-only); returns the hash."""
        sha256 = content_hash(text.encode())
        path = self.card_path(sha256)
        if not path.is_file():
            with atomic_path(path) as tmp:
                tmp.write_text(text)
            path.chmod(0o444)
        return sha256

    def card_text(self, sha256: str) -> str:
        path = self.card_path(sha256)
        if not path.is_file():
            raise InputError(f"rate card {path} is missing: a final invoice was rated with it")
        text = path.read_text()
        if content_hash(text.encode()) != sha256:
            raise InputError(f"rate card {path} changed: its SHA-256 is no longer its name")
        return text

    def draft_dir(self, period: str, tenant: str) -> Path:
        return self.root / "draft" / period / tenant

    def final_dir(self, period: str, tenant: str, number: str) -> Path:
        return self.root / "final" / period / tenant / number

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # The ledger --------------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        if not self.ledger_path.is_file():
            return []
        entries = []
        for i, line in enumerate(self.ledger_path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(
                    f"invoice ledger {self.ledger_path}: line {i + 1} is not JSON"
                ) from None
        return entries

    def append(self, entry: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.ledger_path.open("a") as handle:
            handle.write(json.dumps(dict(entry), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(self.root)

    def finals(self) -> list[FinalRecord]:
        entries = self.entries()
        voided = {e["number"]: e["credit_note"] for e in entries if e["event"] == "voided"}
        records = []
        for entry in entries:
            if entry["event"] != "finalized":
                continue
            records.append(
                FinalRecord(
                    number=entry["number"],
                    kind=entry["kind"],
                    tenant=entry["tenant"],
                    period=entry["period"],
                    path=self.root / entry["path"],
                    sha256=entry["sha256"],
                    finalized_at=entry["at"],
                    voided_by=voided.get(entry["number"]),
                    voids=entry.get("voids"),
                )
            )
        return records

    def find(self, number: str) -> FinalRecord:
        for record in self.finals():
            if record.number == number:
                return record
        raise InputError(f"invoice {number!r}: no finalized invoice or credit note has it")

    def next_number(self, prefix: str) -> str:
        used = [r.number for r in self.finals() if r.number.startswith(f"{prefix}-")]
        return f"{prefix}-{len(used) + 1:06d}"

    # Documents ---------------------------------------------------------------------

    def write_draft(self, period: str, tenant: str, files: Mapping[str, bytes]) -> Path:
        directory = self.draft_dir(period, tenant)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            with atomic_path(directory / name) as tmp:
                tmp.write_bytes(data)
        for stale in directory.iterdir():
            if stale.is_file() and stale.name not in files:
                stale.unlink()
        return directory

    def remove_draft(self, period: str, tenant: str) -> None:
        directory = self.draft_dir(period, tenant)
        if directory.is_dir():
            shutil.rmtree(directory)

    def draft_tenants(self, period: str) -> list[str]:
        directory = self.root / "draft" / period
        return (
            sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
        )

    def draft_periods(self) -> list[str]:
        directory = self.root / "draft"
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_dir() and any(p.iterdir()))

    def write_final(
        self,
        document: InvoiceDocument,
        files: Mapping[str, bytes],
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> FinalRecord:
        """Write a final document's files whole, read-only, and record them in the ledger.

        Call inside `locked()`. Refuses to touch a directory that exists already.
        """
        assert document.number is not None and document.status == "final"
        final = self.final_dir(document.period, document.tenant, document.number)
        if final.exists():
            raise InputError(
                f"invoice {document.number}: {final} exists already; finals are never rewritten"
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{document.number}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            hashes = {}
            for name, data in sorted(files.items()):
                path = tmp / name
                path.write_bytes(data)
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
                hashes[name] = content_hash(data)
            manifest = json.dumps(
                {"number": document.number, "sha256": hashes}, indent=2, sort_keys=True
            )
            (tmp / "manifest.json").write_text(manifest + "\n")
            for path in tmp.iterdir():
                path.chmod(0o444)
            fsync_dir(tmp)
            tmp.rename(final)
            fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        at = datetime.now(UTC).isoformat()
        entry = {
            "event": "finalized",
            "kind": document.kind,
            "number": document.number,
            "tenant": document.tenant,
            "period": document.period,
            "path": str(final.relative_to(self.root)),
            "sha256": hashes,
            "total": str(document.total),
            "currency": document.currency,
            "at": at,
            **({"voids": document.voids} if document.voids else {}),
            **(dict(extra) if extra else {}),
        }
        self.append(entry)
        return FinalRecord(
            number=document.number,
            kind=document.kind,
            tenant=document.tenant,
            period=document.period,
            path=final,
            sha256=hashes,
            finalized_at=at,
            voids=document.voids,
        )

    def read_document(self, directory: Path) -> InvoiceDocument:
        path = directory / "invoice.json"
        try:
            return InvoiceDocument.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise InputError(f"invoice document {path} is missing") from None

    def final_document(self, record: FinalRecord) -> InvoiceDocument:
        if record.path not in self._finals:
            self._finals[record.path] = self.read_document(record.path)
        return self._finals[record.path]

    def billed_rows(self, record: FinalRecord) -> dict[str, list[UsageRow]]:
        if record.path not in self._billed:
            path = record.path / "billed_usage.parquet"
            self._billed[record.path] = (
                rows_from_frame(pl.read_parquet(path)) if path.is_file() else {}
            )
        return self._billed[record.path]

    def watermarks(self, record: FinalRecord) -> pl.DataFrame | None:
        path = record.path / "watermarks.parquet"
        return pl.read_parquet(path) if path.is_file() else None

    def verify(self) -> list[str]:
        """Files of finals whose bytes differ from the ledger's hashes (empty: all intact)."""
        problems = []
        for record in self.finals():
            for name, expected in sorted(record.sha256.items()):
                path = record.path / name
                if not path.is_file():
                    problems.append(f"{record.number}: {name} is missing")
                elif content_hash(path.read_bytes()) != expected:
                    problems.append(
                        f"{record.number}: {name} changed (sha256 differs from the ledger)"
                    )
        for card in sorted((self.root / "cards").glob("*.yaml")):
            if content_hash(card.read_bytes()) != card.stem:
                problems.append(f"rate card {card.name} changed (sha256 differs from its name)")
        return problems
