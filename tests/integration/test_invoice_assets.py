"""The invoice assets against a real stack: usage to drafts to finals, with the checks.

Two simulated hours at the end of May 2026 are ingested and allocated on the module's
own stack, the example rate card is written (it prices the small fleet's model and
names two of its three tenants; the third gets the default plan), then May is drafted
and finalized through Dagster. Every invoice check must pass on the drafts and on the
finals; another tenant's files in a tenant's draft directory must fail
`invoice_tenant_isolation`, and an edited amount in lines.csv must fail
`invoice_lines_sum_to_totals`, until a draft run rewrites the drafts.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import dagster as dg
import pytest

from ingest.catalog import connect
from ingest.settings import Settings
from pipelines.billing.checks import lines_sum_to_totals, tenant_isolation, tokens_billed
from pipelines.billing.store import InvoiceStore
from pipelines.cli.invoice import example_card_text
from pipelines.materialize import materialize_all
from pipelines.materialize_billing import check_invoices, materialize_invoices
from tests.conftest import running_stack, simulate_small_fleet

pytestmark = pytest.mark.integration

START = datetime(2026, 5, 31, 22, 0, tzinfo=UTC)
END = START + timedelta(hours=2)
PERIOD = "2026-05"
KEY = "2026-05-01"
SEED = 11
CHECKS = {"invoice_lines_sum_to_totals", "invoice_tokens_billed", "invoice_tenant_isolation"}


@dataclass(frozen=True)
class Billing:
    settings: Settings
    instance: dg.DagsterInstance
    tenants: list[str]


@pytest.fixture(scope="module")
def billing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Billing]:
    with running_stack(
        tmp_path_factory.mktemp("invoice-assets") / "state",
        kafka={"topic": "gpuledger.usage.v1", "topic_partitions": 2},
        telemetry={"retries": 1, "backoff_s": 0.01},
    ) as settings:
        simulate_small_fleet(
            settings,
            tmp_path_factory.mktemp("run"),
            start=START,
            hours=2,
            seed=SEED,
            rate_per_s=0.3,
        )
        instance = dg.DagsterInstance.ephemeral()
        ingested = materialize_all(settings, START, END, instance=instance)
        assert ingested.success, ingested.failed_checks
        settings.rate_card_path.write_text(example_card_text())
        with connect(settings) as con:
            tenants = [
                row[0]
                for row in con.execute(
                    "select distinct tenant from marts.fct_tenant_usage_hourly order by 1"
                ).fetchall()
            ]
        yield Billing(settings, instance, tenants)


def draft(billing: Billing) -> None:
    result = materialize_invoices(
        billing.settings, PERIOD, efficiency=False, instance=billing.instance
    )
    assert result.success, result.failed_checks


def assert_checks_pass(result: object, assets: set[str], *, efficiency: bool = False) -> None:
    from pipelines.materialize import PipelineRunResult

    assert isinstance(result, PipelineRunResult)
    assert not result.failed_checks, result.failed_checks  # the dbt tests of the marts too
    invoice_checks = {(c.asset, c.name) for c in result.checks if not c.asset.startswith("marts/")}
    assert invoice_checks == {(a, n) for a in assets for n in CHECKS}
    if efficiency:
        # Every invoice run rebuilds the period's tenant efficiency mart and publishes it.
        assert {"marts/mart_tenant_efficiency", "analytics_period_snapshot"} <= set(
            result.materializations
        )


def test_drafting_the_month_passes_every_check(billing: Billing) -> None:
    assert billing.tenants == ["acme", "globex", "initech"]  # the small fleet's tenants
    result = materialize_invoices(billing.settings, PERIOD, instance=billing.instance)
    assert result.success
    assert result.partition_keys == (KEY,)
    assert_checks_pass(result, {"invoice_drafts"}, efficiency=True)
    metadata = result.metadata("invoice_drafts", KEY)
    assert metadata["tenants"] == billing.tenants
    assert set(metadata["totals"]) == set(billing.tenants)
    assert metadata["pending_adjustments"] == []
    store = InvoiceStore(billing.settings.invoices_path)
    assert store.draft_tenants(PERIOD) == billing.tenants
    tokens = result.check("invoice_tokens_billed").metadata
    assert tokens["usage_prompt_tokens"] == tokens["billed_prompt_tokens"] > 0
    assert tokens["usage_completion_tokens"] == tokens["billed_completion_tokens"] > 0
    isolation = result.check("invoice_tenant_isolation").metadata
    assert isolation["files"] == 5 * len(billing.tenants)  # json, csv, pdf, 2 x FOCUS
    assert set(billing.tenants) <= set(isolation["known_tenants"])


def test_another_tenants_files_in_a_draft_dir_fail_isolation(billing: Billing) -> None:
    draft(billing)
    store = InvoiceStore(billing.settings.invoices_path)
    acme, globex = store.draft_dir(PERIOD, "acme"), store.draft_dir(PERIOD, "globex")
    shutil.copy(globex / "invoice.json", acme / "globex-invoice.json")
    shutil.copy(globex / "invoice.pdf", acme / "globex-invoice.pdf")

    result = check_invoices(billing.settings, PERIOD, instance=billing.instance)
    assert not result.materializations  # only the checks ran
    isolation = result.check("invoice_tenant_isolation")
    assert not isolation.passed
    assert isolation.severity == "ERROR"
    problems = isolation.metadata["first_problems"]
    assert any(
        "acme/globex-invoice.json: holds tenant globex, expected acme only" in p for p in problems
    )
    assert any("acme/globex-invoice.pdf: its text names tenant globex" in p for p in problems)
    assert result.check("invoice_lines_sum_to_totals").passed

    draft(billing)  # a draft run rewrites the directory: the stray files are gone
    assert tenant_isolation(billing.settings, PERIOD).passed


def test_an_edited_lines_csv_amount_fails_the_sums(billing: Billing) -> None:
    draft(billing)
    path = InvoiceStore(billing.settings.invoices_path).draft_dir(PERIOD, "initech") / "lines.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    rows[0]["amount"] = str(Decimal(rows[0]["amount"]) + Decimal("0.01"))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(out.getvalue())

    result = check_invoices(billing.settings, PERIOD, instance=billing.instance)
    sums = result.check("invoice_lines_sum_to_totals")
    assert not sums.passed
    assert sums.severity == "ERROR"
    assert sums.metadata["problems"] == 1
    assert f"draft {PERIOD}/initech: lines.csv line_no 1" in sums.metadata["first_problems"][0]
    assert result.check("invoice_tenant_isolation").passed

    draft(billing)
    assert lines_sum_to_totals(billing.settings, PERIOD).passed


def test_finalizing_the_month_passes_every_check(billing: Billing) -> None:
    result = materialize_invoices(
        billing.settings, PERIOD, finalize=True, instance=billing.instance
    )
    assert result.success
    assert_checks_pass(result, {"invoice_drafts", "invoices_final"}, efficiency=True)
    final = result.metadata("invoices_final", KEY)
    assert final["tenants"] == billing.tenants
    assert sorted(final["numbers"].values()) == ["INV-000001", "INV-000002", "INV-000003"]
    store = InvoiceStore(billing.settings.invoices_path)
    assert store.draft_tenants(PERIOD) == []
    assert sorted(r.tenant for r in store.finals() if r.period == PERIOD) == billing.tenants
    sums = result.check("invoice_lines_sum_to_totals")
    assert sums.asset in {"invoice_drafts", "invoices_final"}
    for report in (
        lines_sum_to_totals(billing.settings, PERIOD),
        tokens_billed(billing.settings, PERIOD),
        tenant_isolation(billing.settings, PERIOD),
    ):
        assert report.passed, report.problems
    # The final directories hold the billed usage and watermarks too: still one tenant.
    assert tenant_isolation(billing.settings, PERIOD).files == 8 * len(billing.tenants)

    again = check_invoices(billing.settings, PERIOD, final=True, instance=billing.instance)
    assert_checks_pass(again, {"invoices_final"})


def test_a_final_invoice_is_not_finalized_twice(billing: Billing) -> None:
    result = materialize_invoices(
        billing.settings, PERIOD, finalize=True, efficiency=False, instance=billing.instance
    )
    assert result.success
    final = result.metadata("invoices_final", KEY)
    assert final["documents"] == 0
    assert final["already_final"] == billing.tenants
    assert len(InvoiceStore(billing.settings.invoices_path).finals()) == len(billing.tenants)


LATE_PROMPT_TOKENS = 1000


def test_late_usage_is_pending_until_a_later_invoice_bills_it(billing: Billing) -> None:
    """Guards against late usage of a final period read as a mismatch (or not at all)."""
    settings = billing.settings
    # Late usage of May after its invoices were finalized: the mart row grows.
    with connect(settings, read_only=False) as con:
        con.execute(
            "update marts.fct_tenant_usage_hourly set prompt_tokens = prompt_tokens + $n "
            "where rowid = (select min(rowid) from marts.fct_tenant_usage_hourly "
            "where tenant = 'initech' and event_hour >= $start)",
            {"n": LATE_PROMPT_TOKENS, "start": START},
        )
    not_drafted = tokens_billed(settings, PERIOD)
    assert not_drafted.only_pending, not_drafted.problems
    [pending] = not_drafted.pending
    assert (pending.tenant, pending.kind, pending.usage - pending.billed) == (
        "initech",
        "prompt",
        LATE_PROMPT_TOKENS,
    )
    assert "next draft run" in pending.detail
    checked = check_invoices(settings, PERIOD, final=True, instance=billing.instance)
    tokens = checked.check("invoice_tokens_billed")
    assert (tokens.passed, tokens.severity, tokens.metadata["pending"]) == (False, "WARN", 1)

    june = materialize_invoices(settings, "2026-06", efficiency=False, instance=billing.instance)
    assert june.success  # pending on May is a WARN there only: June's own tokens are billed
    assert_checks_pass(june, {"invoice_drafts"})
    [carried] = june.metadata("invoice_drafts", "2026-06-01")["pending_adjustments"]
    assert carried == {"tenant": "initech", "period": PERIOD, "invoice": carried["invoice"]}
    on_draft = tokens_billed(settings, PERIOD)
    assert on_draft.only_pending
    assert "on a draft adjustment" in on_draft.pending[0].detail

    june_final = materialize_invoices(
        settings, "2026-06", finalize=True, efficiency=False, instance=billing.instance
    )
    assert_checks_pass(june_final, {"invoice_drafts", "invoices_final"})
    assert tokens_billed(settings, PERIOD).passed  # June's final invoice billed it
    assert lines_sum_to_totals(settings, "2026-06").passed


def test_a_tenants_first_usage_after_the_close_is_billed_on_its_next_invoice(
    billing: Billing,
) -> None:
    """Guards against usage of a tenant with no invoice for a closed month going unbilled
    (only a redraft of the closed month, which no schedule runs, would have billed it)."""
    settings = billing.settings
    with connect(settings, read_only=False) as con:
        con.execute(
            "insert into marts.fct_tenant_usage_hourly by name "
            "select 'hooli' as tenant, model, gpu_type, event_hour, idle_policy, 3 as requests, "
            "3000 as prompt_tokens, 0 as cached_prompt_tokens, 2000 as completion_tokens, "
            "energy_j, dynamic_energy_j, idle_energy_j, occupied_gpu_s, active_gpu_s, "
            "0 as orphan_requests from marts.fct_tenant_usage_hourly "
            "where tenant = 'initech' and event_hour >= $start order by event_hour limit 1",
            {"start": START},
        )
    assert not tokens_billed(settings, PERIOD).passed  # hooli's May tokens: not billed
    july = materialize_invoices(settings, "2026-07", efficiency=False, instance=billing.instance)
    assert july.success
    store = InvoiceStore(settings.invoices_path)
    draft = store.read_document(store.draft_dir("2026-07", "hooli"))
    late = [line for line in draft.lines if line.kind == "adjustment"]
    assert {(line.adjusts_period, line.adjusts_invoice) for line in late} == {(PERIOD, None)}
    assert sum(line.quantity for line in late if line.token_class == "completion") == 2000
    assert all("not invoiced" in line.description for line in late)
    final = materialize_invoices(
        settings, "2026-07", finalize=True, efficiency=False, instance=billing.instance
    )
    assert_checks_pass(final, {"invoice_drafts", "invoices_final"})
    assert tokens_billed(settings, PERIOD).passed
