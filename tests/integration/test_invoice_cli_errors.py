"""Bad input to `gpuledger invoice …`: one line naming the input and field, exit 2.

Real subprocesses of the installed console script; no service is needed (an empty
warehouse is created on the fly).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli.invoice import example_card_text
from tests.integration.test_cli_errors import assert_one_line_error, run


def write_card(tmp_path: Path, text: str) -> None:
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "rate_card.yaml").write_text(text)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["draft", "--period", "2026-13"], ["--period", "'2026-13'", "YYYY-MM"]),
        (["finalize"], ["--period"]),
        (["explain", "INV-999999"], ["INV-999999", "no finalized invoice"]),
        (["explain", "--line", "0"], ["--line"]),
        (["void", "INV-000001", "--reason", " "], ["--reason"]),
    ],
)
def test_malformed_invoice_arguments(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    write_card(tmp_path, example_card_text())
    assert_one_line_error(run(["invoice", *args], tmp_path), 2, *needles)


def test_a_missing_rate_card_says_where_it_was_looked_for(tmp_path: Path) -> None:
    result = run(["invoice", "draft", "--period", "2026-03"], tmp_path)
    assert_one_line_error(result, 2, "rate_card.yaml does not exist")


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (("currency: USD", "currency: XYZ"), ["rate_card.yaml", "currency", "XYZ"]),
        (
            ('llama-3.1-8b: {prompt_per_1m: "0.10"', 'llama-3.1-8b: {prompt_per_1m: "-0.10"'),
            ["plans.default.0.models.llama-3.1-8b", "greater than or equal to 0"],
        ),
        (
            ("up_to_tokens: 100000000,", "up_to_tokens: 0,"),
            ["plans.default.0.models.llama-3.1-70b.tiers.0.up_to_tokens"],
        ),
        (('amount: "100.00"', 'amount: "100.001"'), ["tenants.acme.credits.0.amount"]),
        (("plan: dedicated", "plan: platinum"), ["tenants.globex.plan", "unknown plan"]),
    ],
)
def test_a_bad_rate_card_names_the_field(
    tmp_path: Path, edit: tuple[str, str], needles: list[str]
) -> None:
    text = example_card_text()
    assert edit[0] in text
    write_card(tmp_path, text.replace(edit[0], edit[1], 1))
    result = run(["invoice", "draft", "--period", "2026-03"], tmp_path)
    assert_one_line_error(result, 2, *needles)


def test_finalizing_an_open_period_is_refused(tmp_path: Path) -> None:
    write_card(tmp_path, example_card_text())
    result = run(["invoice", "finalize", "--period", "2099-01"], tmp_path)
    assert_one_line_error(result, 2, "2099-01", "closes at 2099-02-04", "--force")


def test_an_empty_warehouse_drafts_nothing_and_verify_passes(tmp_path: Path) -> None:
    write_card(tmp_path, example_card_text())
    drafted = run(["invoice", "draft", "--period", "2026-03"], tmp_path)
    assert drafted.returncode == 0, drafted.stderr
    # Tenants with a minimum commitment owe it without usage: acme's true-up.
    assert "acme" in drafted.stdout
    verified = run(["invoice", "verify"], tmp_path)
    assert verified.returncode == 0 and "0 final documents" in verified.stdout
