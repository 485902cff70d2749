"""The invoice lifecycle end to end, on a real broker, Prometheus, lake, dbt and Dagster.

A small fleet runs from 31 March 22:00 to 1 April 02:00 UTC. March is drafted and
finalized; then a March usage event is published late, ingested and allocated, and
April is drafted: the March invoice's bytes are unchanged, April carries the late
usage as adjustment lines naming March's invoice, and the adjustment's lineage is
exactly the late request.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from ingest.catalog import connect
from ingest.settings import Settings
from ingest.usage_publisher import publish
from models.errors import InputError
from pipelines.billing.cycle import draft_period, finalize_period, void_invoice
from pipelines.billing.explain import explain_line
from pipelines.billing.store import InvoiceStore
from pipelines.cli.invoice import example_card_text
from pipelines.materialize import materialize_all, materialize_allocation, materialize_ingest
from tests.conftest import running_stack, simulate_small_fleet

pytestmark = pytest.mark.integration

START = datetime(2026, 3, 31, 22, tzinfo=UTC)
LATE_HOUR = datetime(2026, 3, 31, 23, tzinfo=UTC)
LATE_PROMPT, LATE_COMPLETION = 120_000, 90_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_stack(
        tmp_path_factory.mktemp("invoice-lifecycle") / "state",
        kafka={"topic": "gpuledger.usage.v1", "topic_partitions": 2},
        telemetry={"retries": 1, "backoff_s": 0.01},
    ) as settings:
        yield settings


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def late_event(settings: Settings, tenant: str) -> tuple[str, bytes]:
    """A new usage event of `tenant` that ended in LATE_HOUR, on a GPU that served one."""
    with connect(settings) as con:
        columns = [d[0] for d in con.sql("select * from raw.usage_events limit 0").description]
        row = con.sql(
            "select * from raw.usage_events where tenant = $t and hour_start = $h "
            "order by event_id limit 1",
            params={"t": tenant, "h": LATE_HOUR},
        ).fetchall()[0]
    seen = dict(zip(columns, row, strict=True))

    def ts(moment: datetime) -> str:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    event_id = str(uuid.uuid4())
    event = {
        "specversion": "1.0",
        "id": event_id,
        "source": seen["source"],
        "type": "io.gpuledger.inference.usage.v1",
        "time": ts(seen["end_time"]),
        "subject": tenant,
        "datacontenttype": "application/json",
        "data": {
            "model": seen["model"],
            "model_version": seen["model_version"],
            "prompt_tokens": LATE_PROMPT,
            "completion_tokens": LATE_COMPLETION,
            "cached_prompt_tokens": 0,
            "arrival_time": ts(seen["arrival_time"]),
            "first_token_time": ts(seen["first_token_time"]),
            "end_time": ts(seen["end_time"]),
            "hostname": seen["hostname"],
            "gpu_uuids": list(seen["gpu_uuids"]),
            "status": "ok",
        },
    }
    return event_id, orjson.dumps(event)


@dataclass(frozen=True)
class Lifecycle:
    settings: Settings
    tenant: str
    march_number: str
    march_hashes_before: dict[str, str]
    march_hashes_after: dict[str, str]
    late_id: str


@pytest.fixture(scope="module")
def lifecycle(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Lifecycle:
    simulate_small_fleet(
        stack, tmp_path_factory.mktemp("run"), start=START, hours=4, seed=5, rate_per_s=0.3
    )
    assert materialize_all(stack, START, START + timedelta(hours=4)).success
    stack.rate_card_path.write_text(example_card_text())
    march = draft_period(stack, "2026-03")
    tenant = march.invoices[0].document.tenant
    finalize_period(stack, "2026-03")
    store = InvoiceStore(stack.invoices_path)
    march_dir = stack.invoices_path / "final" / "2026-03"
    before = file_hashes(march_dir)
    number = next(r.number for r in store.finals() if r.tenant == tenant)

    late_id, payload = late_event(stack, tenant)
    publish(stack, [late_id.encode()], [payload])
    hour = (LATE_HOUR, LATE_HOUR + timedelta(hours=1))
    assert materialize_ingest(stack, *hour).success
    assert materialize_allocation(stack, *hour).success
    draft_period(stack, "2026-04")
    return Lifecycle(stack, tenant, number, before, file_hashes(march_dir), late_id)


def test_the_finalized_march_invoice_keeps_its_bytes(lifecycle: Lifecycle) -> None:
    assert lifecycle.march_hashes_before  # pdf, json, csv, focus, usage, card per tenant
    assert any(name.endswith("invoice.pdf") for name in lifecycle.march_hashes_before)
    assert lifecycle.march_hashes_after == lifecycle.march_hashes_before
    assert InvoiceStore(lifecycle.settings.invoices_path).verify() == []


def test_april_carries_the_late_march_usage_as_adjustments(lifecycle: Lifecycle) -> None:
    store = InvoiceStore(lifecycle.settings.invoices_path)
    april = store.read_document(store.draft_dir("2026-04", lifecycle.tenant))
    adjustments = [line for line in april.lines if line.kind == "adjustment"]
    assert adjustments, "the late March event must show up on April's draft"
    assert {line.adjusts_invoice for line in adjustments} == {lifecycle.march_number}
    assert {line.adjusts_period for line in adjustments} == {"2026-03"}
    tokens = {
        line.token_class: line.quantity for line in adjustments if line.token_class is not None
    }
    assert tokens.get("prompt") == Decimal(LATE_PROMPT)
    assert tokens.get("completion") == Decimal(LATE_COMPLETION)
    assert april.adjustments_total == sum(line.amount for line in adjustments)
    assert sum(line.amount for line in april.lines) == april.total


def test_an_adjustment_traces_to_the_late_request_only(lifecycle: Lifecycle) -> None:
    store = InvoiceStore(lifecycle.settings.invoices_path)
    april = store.read_document(store.draft_dir("2026-04", lifecycle.tenant))
    line = next(li for li in april.lines if li.token_class == "completion" and li.adjusts_period)
    found = explain_line(
        lifecycle.settings, line.line_no, tenant=lifecycle.tenant, period="2026-04"
    )
    assert found.requests["request_id"].to_list() == [lifecycle.late_id]
    assert sum(q for _, q in found.rows) == Decimal(LATE_COMPLETION)
    march = store.read_document(
        next(r.path for r in store.finals() if r.number == lifecycle.march_number)
    )
    original = next(li for li in march.lines if li.token_class == "completion")
    billed = explain_line(lifecycle.settings, original.line_no, number=lifecycle.march_number)
    assert lifecycle.late_id not in billed.requests["request_id"].to_list()
    assert sum(q for _, q in billed.rows) == original.quantity
    assert billed.requests["completion_tokens"].sum() == original.quantity


def test_finalizing_april_bills_the_adjustment_once(lifecycle: Lifecycle) -> None:
    settings = lifecycle.settings
    store = InvoiceStore(settings.invoices_path)
    run = finalize_period(settings, "2026-04")
    april = next(i.document for i in run.invoices if i.document.tenant == lifecycle.tenant)
    assert april.number is not None and april.status == "final"
    assert any(line.adjusts_invoice == lifecycle.march_number for line in april.lines)
    again = draft_period(settings, "2026-04")
    assert again.invoices == [] and lifecycle.tenant in again.final
    assert again.pending == []
    # Finalizing again changes nothing.
    ledger = store.ledger_path.read_bytes()
    finalize_period(settings, "2026-04")
    assert store.ledger_path.read_bytes() == ledger
    # Voiding April issues a credit note and reopens April, late March usage included.
    note = void_invoice(settings, april.number, reason="test: wrong plan")
    credit = store.read_document(note.path)
    assert credit.kind == "credit_note" and credit.voids == april.number
    assert credit.total == -april.total
    reopened = draft_period(settings, "2026-04")
    redraft = next(i.document for i in reopened.invoices if i.document.tenant == lifecycle.tenant)
    assert redraft.adjustments_total == april.adjustments_total
    with pytest.raises(InputError, match="already voided"):
        void_invoice(settings, april.number, reason="again")


def test_a_period_cannot_close_before_its_grace(lifecycle: Lifecycle) -> None:
    with pytest.raises(InputError, match="closes at 2026-06-04"):
        finalize_period(lifecycle.settings, "2026-05", now=datetime(2026, 6, 2, tzinfo=UTC))


# The CSV twin of the same rows is validated in the opt-in slow suite (11 s), and both
# formats of the exporter are validated by tests/integration/test_focus_validator.py.
@pytest.mark.parametrize(
    "name", [pytest.param("focus.csv", marks=pytest.mark.slow), "focus.parquet"]
)
def test_the_pipelines_focus_files_pass_focus_validator(
    lifecycle: Lifecycle, name: str, tmp_path: Path
) -> None:
    """The real files of a final invoice (usage, true-up, Correction rows, credit, tax)
    pass the FinOps Foundation's validator; skipped where it is not installed."""
    from tests.integration.test_focus_validator import (
        _or_branches,
        _package_dir,
        _real_failures,
        _run,
        _validator,
    )

    validator = _validator()
    store = InvoiceStore(lifecycle.settings.invoices_path)
    finals = [r for r in store.finals() if r.kind == "invoice"]
    with_corrections = [r for r in finals if r.period == "2026-04"]
    for record in [*finals[:1], *with_corrections]:
        _, statuses, details = _run(validator, record.path / name, tmp_path)
        failures = _real_failures(statuses, _or_branches(_package_dir(validator)))
        assert failures == [], [f"{rule}: {details.get(rule)}" for rule in failures]
