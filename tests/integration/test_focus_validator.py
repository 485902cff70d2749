"""A realistic FOCUS export passes the FinOps Foundation's focus-validator 2.2.1 (FOCUS 1.2).

The validator needs Python >= 3.12 and lives in a venv of its own: the executable named
by GPULEDGER_FOCUS_VALIDATOR, else `.venv-focus/bin/focus-validator` (made by
`bash tests/focus_validator_setup.sh`); without either the test skips and says so.

Reading the validator's verdict: its exit code is 0 even when rules fail, so the test
parses the console report (`✅ RULE: PASS`, `❌ RULE: FAIL (...)`, and the `Total:` line
it cross-checks). A failed rule that is one branch of an OR rule that passed is not a
failure (the validator lists both branches of "InvoiceId MUST be null when ... / MUST NOT
be null when ..." and one of them always fails); the OR structure comes from the rule
model the validator ships.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from models.focus import FOCUS_APPLICABILITY_CRITERIA, FOCUS_VERSION, FocusCharge, focus_frame
from pipelines.billing.focus_export import write_focus

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VALIDATOR_VERSION = "2.2.1"
TIMEOUT_S = 300

RESULT_LINE = re.compile(
    r"^\S*\s*(?P<rule>[A-Za-z]+-[A-Z]-\d{3}-[A-Z]): (?P<status>PASS|FAIL|SKIPPED)\b(?P<rest>.*)$"
)
TOTAL_LINE = re.compile(
    r"Total: (?P<total>\d+) \| Pass: (?P<passed>\d+) \| Fail: (?P<failed>\d+)"
    r" \| Skipped: (?P<skipped>\d+)"
)


def _validator() -> Path:
    configured = os.environ.get("GPULEDGER_FOCUS_VALIDATOR")
    candidates = [Path(configured)] if configured else []
    candidates.append(REPO / ".venv-focus" / "bin" / "focus-validator")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(
        f"focus-validator {VALIDATOR_VERSION} not found (needs Python >= 3.12): tried "
        f"{', '.join(str(c) for c in candidates)}. Run `bash tests/focus_validator_setup.sh` "
        "to install it into .venv-focus/, or set GPULEDGER_FOCUS_VALIDATOR to its executable."
    )


def _package_dir(validator: Path) -> Path:
    """The installed focus_validator package (its rule models, and the working directory
    it needs: 2.2.1 opens `focus_validator/rules/currency_codes.csv` relative to the cwd)."""
    python = validator.parent / "python"
    out = subprocess.run(
        [
            str(python),
            "-c",
            "import focus_validator, os; print(os.path.dirname(focus_validator.__file__))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return Path(out.stdout.strip())


def _or_branches(package: Path) -> dict[str, set[str]]:
    """rule id -> the OR rules it is a branch of, from the FOCUS 1.2 rule model."""
    models = sorted((package / "rules").glob(f"model-{FOCUS_VERSION}*.json"))
    assert models, f"no FOCUS {FOCUS_VERSION} rule model in {package / 'rules'}"
    rules: dict[str, Any] = json.loads(models[-1].read_text())["ModelRules"]
    parents: dict[str, set[str]] = {}

    def walk(owner: str, node: Any, in_or: bool) -> None:
        if not isinstance(node, dict):
            return
        function = node.get("CheckFunction")
        if function == "CheckModelRule" and in_or:
            parents.setdefault(node["ModelRuleId"], set()).add(owner)
        for item in node.get("Items") or []:
            walk(owner, item, in_or or function == "OR")

    for rule_id, rule in rules.items():
        walk(rule_id, rule.get("ValidationCriteria", {}).get("Requirement"), False)
    return parents


def _run(
    validator: Path, data_file: Path, workdir: Path
) -> tuple[str, dict[str, str], dict[str, str]]:
    package = _package_dir(validator)
    command = [
        str(validator),
        "--data-file",
        str(data_file),
        "--validate-version",
        FOCUS_VERSION,
        "--focus-dataset",
        "CostAndUsage",
        "--block-download",  # use the rule model it ships; no network here
        "--applicability-criteria",
        ",".join(FOCUS_APPLICABILITY_CRITERIA),
    ]
    env = {**os.environ, "APP_LOG": str(workdir / "focus-validator.log")}
    done = subprocess.run(
        command,
        cwd=package.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output[-4000:]}"
    statuses: dict[str, str] = {}
    details: dict[str, str] = {}
    for line in output.splitlines():
        match = RESULT_LINE.match(line.strip())
        if match:
            statuses[match["rule"]] = match["status"]
            details[match["rule"]] = match["rest"].strip()
    total = TOTAL_LINE.search(output)
    assert total, f"no 'Total:' line in the validator's report:\n{output[-4000:]}"
    assert len(statuses) == int(total["total"]), (
        f"parsed {len(statuses)} rule results, the report says {total['total']}"
    )
    assert list(statuses.values()).count("FAIL") == int(total["failed"])
    return output, statuses, details


def _real_failures(statuses: dict[str, str], branches: dict[str, set[str]]) -> list[str]:
    return sorted(
        rule
        for rule, status in statuses.items()
        if status == "FAIL" and not any(statuses.get(p) == "PASS" for p in branches.get(rule, ()))
    )


P0 = datetime(2026, 3, 1, tzinfo=UTC)
P1 = datetime(2026, 4, 1, tzinfo=UTC)
FEB = datetime(2026, 2, 1, tzinfo=UTC)


def _day(day: int) -> datetime:
    return datetime(2026, 3, day, tzinfo=UTC)


def _export(tenant: str, name: str, invoice_id: str | None) -> list[FocusCharge]:
    """One tenant's March: token usage per class and tier, GPU-hours, energy, a
    minimum-commitment true-up, a late-usage correction of February, prepaid credits
    applied, and tax."""
    base: dict[str, Any] = {
        "tenant": tenant,
        "tenant_name": name,
        "invoice_id": invoice_id,
        "invoice_issuer": "gpuledger demo operator",
        "provider_name": "gpuledger demo operator",
        "currency": "USD",
        "billing_period_start": P0,
        "billing_period_end": P1,
        "service_name": "LLM Inference",
        "is_correction": False,
    }
    none_price: dict[str, Any] = {
        "list_unit_price": None,
        "pricing_quantity": None,
        "pricing_unit": None,
        "consumed_quantity": None,
        "consumed_unit": None,
        "sku_id": None,
        "sku_price_id": None,
    }

    def tokens(
        day: int, token_class: str, tier: int, count: int, price: str, billed: str
    ) -> FocusCharge:
        model = "llama-3.1-8b"
        return FocusCharge(
            line_id=f"tokens/2026-03-{day:02d}/{model}/{token_class}/{tier}",
            charge_period_start=_day(day),
            charge_period_end=_day(day + 1),
            charge_category="Usage",
            description=f"{model} {token_class} tokens, tier {tier}",
            billed_cost=Decimal(billed),
            list_unit_price=Decimal(price),
            pricing_quantity=Decimal(count) / Decimal(1_000_000),
            pricing_unit="1M Tokens",
            consumed_quantity=Decimal(count),
            consumed_unit="Tokens",
            sku_id=f"{model}/{token_class}",
            sku_price_id=f"default@2026-01-01/{model}/{token_class}/{tier}",
            x_model=model,
            x_token_class=token_class,
            x_tier=tier,
            x_gpu_type="H100",
            x_idle_policy="proportional",
            **base,
        )

    return [
        tokens(1, "prompt", 1, 2_500_000, "0.10", "0.25"),
        tokens(1, "completion", 1, 1_234_567, "0.20", "0.25"),  # 0.2469134 billed 0.25
        tokens(1, "cached", 1, 800_000, "0.05", "0.04"),
        tokens(2, "completion", 2, 10_000_000, "0.15", "1.50"),
        FocusCharge(
            line_id="gpu/2026-03-02/H100",
            charge_period_start=_day(2),
            charge_period_end=_day(3),
            charge_category="Usage",
            description="H100 GPU-hours",
            billed_cost=Decimal("24.99"),
            list_unit_price=Decimal("2.50"),
            pricing_quantity=Decimal("9.996"),
            pricing_unit="GPU-Hours",
            consumed_quantity=Decimal("9.996"),
            consumed_unit="GPU-Hours",
            sku_id="gpu-hour/H100",
            sku_price_id="default@2026-01-01/gpu-hour/H100",
            x_gpu_type="H100",
            x_gpu_seconds=Decimal("35985.6"),
            **base,
        ),
        FocusCharge(
            line_id="energy/2026-03-02/peak",
            charge_period_start=_day(2),
            charge_period_end=_day(3),
            charge_category="Usage",
            description="GPU energy, peak window",
            billed_cost=Decimal("1.27"),
            list_unit_price=Decimal("0.30"),
            pricing_quantity=Decimal("4.2345"),
            pricing_unit="kWh",
            consumed_quantity=Decimal("4.2345"),
            consumed_unit="kWh",
            sku_id="energy/peak",
            sku_price_id="default@2026-01-01/energy/peak",
            x_tou_window="peak",
            x_energy_kwh=Decimal("4.2345"),
            **base,
        ),
        FocusCharge(
            line_id="commitment",
            charge_period_start=P0,
            charge_period_end=P1,
            charge_category="Adjustment",
            charge_frequency="Recurring",
            description="minimum commitment 100.00 USD, true-up",
            billed_cost=Decimal("71.70"),
            **none_price,
            **base,
        ),
        FocusCharge(
            line_id="adjustment/2026-02/tokens/2026-02-27/llama-3.1-8b/prompt/1",
            charge_period_start=datetime(2026, 2, 27, tzinfo=UTC),
            charge_period_end=datetime(2026, 2, 28, tzinfo=UTC),
            charge_category="Usage",
            description="late usage of 2026-02-27, invoiced in INV-2026-02-0001",
            billed_cost=Decimal("0.03"),
            list_unit_price=Decimal("0.10"),
            pricing_quantity=Decimal("0.3"),
            pricing_unit="1M Tokens",
            consumed_quantity=Decimal(300_000),
            consumed_unit="Tokens",
            sku_id="llama-3.1-8b/prompt",
            sku_price_id="default@2026-01-01/llama-3.1-8b/prompt/1",
            x_model="llama-3.1-8b",
            x_token_class="prompt",
            x_tier=1,
            x_adjusts_invoice_id="INV-2026-02-0001",
            **{**base, "is_correction": True},
        ),
        FocusCharge(
            line_id="credit",
            charge_period_start=P0,
            charge_period_end=P1,
            charge_category="Credit",
            description="prepaid credits applied",
            billed_cost=Decimal("-50.00"),
            **none_price,
            **base,
        ),
        FocusCharge(
            line_id="tax",
            charge_period_start=P0,
            charge_period_end=P1,
            charge_category="Tax",
            description="VAT 20 %",
            billed_cost=Decimal("10.01"),
            **none_price,
            **base,
        ),
    ]


def _credit_note(charges: list[FocusCharge]) -> list[FocusCharge]:
    """A credit note voiding February's invoice: every row a Correction, negated."""
    return [
        replace(
            c,
            line_id=f"credit_note/{c.line_id}",
            invoice_id="CN-2026-03-0001",
            billed_cost=-c.billed_cost,
            is_correction=True,
            billing_period_start=P0,
            billing_period_end=P1,
            charge_period_start=FEB,
            charge_period_end=P0,
            x_adjusts_invoice_id="INV-2026-02-0001",
        )
        for c in charges
        if c.charge_category in ("Usage", "Tax")
    ]


@pytest.mark.parametrize(
    ("tenant", "name", "invoice_id"),
    [("acme", "Acme Corp", "INV-2026-03-0001"), ("globex", "Globex", None)],
    ids=["issued", "draft"],
)
@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_export_passes_focus_validator(
    tmp_path: Path, tenant: str, name: str, invoice_id: str | None, file_format: str
) -> None:
    validator = _validator()
    charges = _export(tenant, name, invoice_id)
    if invoice_id is not None:
        charges += _credit_note(charges)
    csv_path, parquet_path = write_focus(focus_frame(charges), tmp_path / tenant)
    data_file = csv_path if file_format == "csv" else parquet_path

    output, statuses, details = _run(validator, data_file, tmp_path)
    branches = _or_branches(_package_dir(validator))
    failures = _real_failures(statuses, branches)
    passed = list(statuses.values()).count("PASS")
    summary = "\n".join(f"  {rule}: {details[rule]}" for rule in failures)
    assert not failures, (
        f"focus-validator {VALIDATOR_VERSION}, FOCUS {FOCUS_VERSION}, {data_file.name}: "
        f"{len(failures)} rules failed ({passed} passed):\n{summary}\n\n{output[-3000:]}"
    )
    # The checks that matter ran, not only skipped: presence and types of the columns.
    for rule in ("BilledCost-C-001-M", "ChargeClass-C-001-M", "ListCost-C-009-C", "SkuId-C-005-C"):
        assert statuses.get(rule) == "PASS", f"{rule}: {statuses.get(rule)} {details.get(rule)}"
