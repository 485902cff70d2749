"""The invoice schedules: which month a tick drafts, and when a month is finalized.

The finalize schedule reads the grace days from the settings and the drafts from the
invoice store at each tick; both live in a temporary state dir here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from ingest.settings import Settings
from models.errors import InputError
from pipelines.billing.store import InvoiceStore
from pipelines.defs.billing.assets import month_partition_key, period_of_key
from pipelines.defs.billing.schedules import (
    invoice_draft_schedule,
    invoice_finalize_schedule,
    previous_period,
)
from pipelines.defs.resources import GpuledgerSettings
from tests.conftest import build_settings


def settings_in(tmp_path: Path, **overrides: Any) -> Settings:
    return build_settings(tmp_path / "state", **overrides)


def with_draft(settings: Settings, period: str, tenant: str = "acme") -> None:
    directory = InvoiceStore(settings.invoices_path).draft_dir(period, tenant)
    directory.mkdir(parents=True)
    (directory / "invoice.json").write_text("{}")


def finalize_tick(settings: Settings, at: datetime) -> dg.RunRequest | dg.SkipReason:
    context = dg.build_schedule_context(
        scheduled_execution_time=at,
        resources={"gpuledger": GpuledgerSettings.pinned(settings)},
    )
    outcome = invoice_finalize_schedule(context)
    assert isinstance(outcome, dg.RunRequest | dg.SkipReason)
    return outcome


def test_the_finalize_schedule_skips_before_the_grace_days_have_passed(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)  # grace_days 3: May closes 2026-06-04 00:00
    with_draft(settings, "2026-05")
    outcome = finalize_tick(settings, datetime(2026, 6, 3, 3, tzinfo=UTC))
    assert isinstance(outcome, dg.SkipReason)
    assert "2026-05 closes at 2026-06-04 00:00 UTC" in (outcome.skip_message or "")
    assert "3 grace days" in (outcome.skip_message or "")


def test_the_finalize_schedule_requests_the_previous_month_once_closed(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    with_draft(settings, "2026-05")
    outcome = finalize_tick(settings, datetime(2026, 6, 4, 3, tzinfo=UTC))
    assert isinstance(outcome, dg.RunRequest)
    assert outcome.partition_key == "2026-05-01"
    assert outcome.run_key == "invoice-finalize:2026-05-01"


def test_the_grace_days_come_from_the_settings(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, billing={"grace_days": 10})
    with_draft(settings, "2026-05")
    assert isinstance(finalize_tick(settings, datetime(2026, 6, 10, 3, tzinfo=UTC)), dg.SkipReason)
    assert isinstance(finalize_tick(settings, datetime(2026, 6, 11, 3, tzinfo=UTC)), dg.RunRequest)


def test_a_period_without_drafts_is_skipped(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    with_draft(settings, "2026-06")  # the month in progress has drafts, May has none
    outcome = finalize_tick(settings, datetime(2026, 6, 20, 3, tzinfo=UTC))
    assert isinstance(outcome, dg.SkipReason)
    assert "2026-05 has no drafts" in (outcome.skip_message or "")


def test_earlier_open_periods_hold_the_finalize_back(tmp_path: Path) -> None:
    """Guards against requesting a run finalize_period would refuse (earlier drafts)."""
    settings = settings_in(tmp_path)
    with_draft(settings, "2026-04")
    with_draft(settings, "2026-05")
    outcome = finalize_tick(settings, datetime(2026, 6, 20, 3, tzinfo=UTC))
    assert isinstance(outcome, dg.SkipReason)
    assert "earlier periods still have drafts (2026-04)" in (outcome.skip_message or "")


def test_january_finalizes_december(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    with_draft(settings, "2025-12")
    outcome = finalize_tick(settings, datetime(2026, 1, 5, 3, tzinfo=UTC))
    assert isinstance(outcome, dg.RunRequest)
    assert outcome.partition_key == "2025-12-01"


@pytest.mark.parametrize(
    ("at", "keys"),
    [
        (datetime(2026, 6, 15, 1, tzinfo=UTC), ["2026-06-01"]),
        # The new month's first draft, and May's until it closes on 4 June (3 grace days).
        (datetime(2026, 6, 1, 1, tzinfo=UTC), ["2026-06-01", "2026-05-01"]),
        (datetime(2026, 6, 3, 1, tzinfo=UTC), ["2026-06-01", "2026-05-01"]),
        (datetime(2026, 6, 4, 1, tzinfo=UTC), ["2026-06-01"]),
        (datetime(2025, 12, 31, 1, tzinfo=UTC), ["2025-12-01"]),
    ],
)
def test_the_draft_schedule_drafts_the_open_months(
    tmp_path: Path, at: datetime, keys: list[str]
) -> None:
    context = dg.build_schedule_context(
        scheduled_execution_time=at,
        resources={"gpuledger": GpuledgerSettings.pinned(settings_in(tmp_path))},
    )
    outcome = invoice_draft_schedule(context)
    assert isinstance(outcome, list)
    assert [r.partition_key for r in outcome] == keys
    # One run per month and day.
    assert [r.run_key for r in outcome] == [
        f"invoice-draft:{key[:7]}:{at:%Y-%m-%d}" for key in keys
    ]


def test_months_and_partition_keys() -> None:
    assert previous_period(datetime(2026, 3, 1, tzinfo=UTC)) == "2026-02"
    assert previous_period(datetime(2026, 1, 31, 23, tzinfo=UTC)) == "2025-12"
    assert month_partition_key("2026-05") == "2026-05-01"
    assert period_of_key("2026-05-01") == "2026-05"
    with pytest.raises(InputError, match="expected YYYY-MM"):
        month_partition_key("2026-5")
    with pytest.raises(InputError, match="outside the monthly partitions"):
        month_partition_key("2023-12")
