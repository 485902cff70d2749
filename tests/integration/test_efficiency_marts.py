"""The efficiency marts and the analysts' snapshot on a real pipeline run.

`efficiency_pipeline` (tests/conftest.py) simulates a small fleet from 30 Jun 22:00 to
1 Jul 01:00, ingests and allocates the first two hours through Dagster on a real broker,
Prometheus and dbt, drafts June's and July's invoices, and each of those runs publishes a
snapshot. Everything below reads what an analyst reads: the published catalog,
`analytics.duckdb`, with its own read-only connections.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from pipelines.allocation import dbt_vars, run_dbt
from pipelines.billing.store import InvoiceStore
from pipelines.materialize import materialize_all
from tests.conftest import EfficiencyPipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REL = 1e-9
ISSUE_MARTS = (
    "mart_efficiency_hourly",
    "mart_tenant_efficiency",
    "mart_fleet_daily",
    "mart_data_quality",
)


def rows(catalog: Path, query: str) -> list[dict[str, object]]:
    with duckdb.connect(str(catalog), read_only=True) as con:
        relation = con.sql(query)
        names = relation.columns
        return [dict(zip(names, row, strict=True)) for row in relation.fetchall()]


def close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-9


def test_j_per_token_utilization_and_energy_close(efficiency_pipeline: EfficiencyPipeline) -> None:
    catalog = efficiency_pipeline.settings.analytics_path
    efficiency = rows(catalog, "SELECT * FROM marts.mart_efficiency_hourly")
    assert efficiency, "no efficiency rows were published"
    assert {r["model"] for r in efficiency} - {"(no traffic)"}, "no model served anything"
    for row in efficiency:
        tokens, energy = float(row["output_tokens"]), float(row["energy_j"])  # type: ignore[arg-type]
        if tokens > 0:
            assert close(float(row["j_per_output_token"]), energy / tokens), row  # type: ignore[arg-type]
        else:
            assert row["j_per_output_token"] is None, row
        assert row["utilization"] is not None and 0.0 <= row["utilization"] <= 1.0, row  # type: ignore[operator]
        assert close(float(row["idle_j"]) + float(row["dynamic_j"]), energy), row  # type: ignore[arg-type]
    # Every hour's rows add up to the fleet's metered energy and covered seconds.
    by_hour: dict[object, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in efficiency:
        by_hour[row["hour_start"]][0] += float(row["energy_j"])  # type: ignore[arg-type]
        by_hour[row["hour_start"]][1] += float(row["covered_s"])  # type: ignore[arg-type]
    metered = rows(
        catalog,
        "SELECT hour_start, sum(metered_j) AS j, sum(covered_s) AS s "
        "FROM marts.fct_gpu_hourly GROUP BY hour_start",
    )
    assert len(metered) == 2
    for row in metered:
        energy_j, covered_s = by_hour[row["hour_start"]]
        assert close(energy_j, float(row["j"])), row  # type: ignore[arg-type]
        assert close(covered_s, float(row["s"])), row  # type: ignore[arg-type]


def test_carbon_is_facility_kwh_times_each_hours_intensity(
    efficiency_pipeline: EfficiencyPipeline,
) -> None:
    """Recomputed from the GPU-hours, the configured PUE (1.25) and intensities: the
    file's value for the hour it lists, the hour-of-day profile (300 + 10 h) otherwise."""
    pipeline = efficiency_pipeline
    catalog = pipeline.settings.analytics_path
    expected: dict[object, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for row in rows(
        catalog,
        "SELECT hour_start, sum(metered_j) AS j FROM marts.fct_gpu_hourly GROUP BY hour_start",
    ):
        hour = row["hour_start"]
        kwh = float(row["j"]) / 3.6e6  # type: ignore[arg-type]
        intensity = (
            pipeline.file_g_per_kwh if hour == pipeline.file_hour else 300.0 + 10 * hour.hour  # type: ignore[attr-defined]
        )
        day = hour.date()  # type: ignore[attr-defined]
        expected[day][0] += kwh
        expected[day][1] += kwh * 1.25
        expected[day][2] += kwh * 1.25 * intensity / 1000
    daily = rows(catalog, "SELECT * FROM marts.mart_fleet_daily ORDER BY day")
    assert {r["day"] for r in daily} == set(expected)
    for row in daily:
        metered, facility, kg = expected[row["day"]]
        assert close(float(row["metered_kwh"]), metered), row  # type: ignore[arg-type]
        assert close(float(row["facility_kwh"]), facility), row  # type: ignore[arg-type]
        assert close(float(row["kg_co2e"]), kg), row  # type: ignore[arg-type]
        assert row["pue"] == 1.25


def test_tenant_margin_is_billed_minus_cost_to_serve(
    efficiency_pipeline: EfficiencyPipeline,
) -> None:
    settings = efficiency_pipeline.settings
    catalog = settings.analytics_path
    tenant_rows = rows(catalog, "SELECT * FROM marts.mart_tenant_efficiency")
    assert {r["period"] for r in tenant_rows} == {"2026-06"}  # July: nothing allocated yet
    tariff = Decimal("0.12")
    gpu_cost = settings.efficiency.gpu_hour_cost
    usage = rows(
        catalog,
        "SELECT strftime(event_hour, '%Y-%m') AS period, tenant, model, gpu_type, "
        "sum(energy_j) AS energy_j, sum(occupied_gpu_s) AS gpu_s, "
        "sum(completion_tokens) AS tokens FROM marts.fct_tenant_usage_hourly GROUP BY ALL",
    )
    cost: dict[tuple[object, ...], Decimal] = defaultdict(Decimal)
    tokens: dict[tuple[object, ...], int] = defaultdict(int)
    for u in usage:
        key = (u["period"], u["tenant"], u["model"])
        kwh = Decimal(repr(float(u["energy_j"]) / 3.6e6))  # type: ignore[arg-type]
        hours = Decimal(repr(float(u["gpu_s"]) / 3600))  # type: ignore[arg-type]
        rate = gpu_cost.get(str(u["gpu_type"]), settings.efficiency.default_gpu_hour_cost)
        cost[key] += kwh * tariff + hours * rate
        tokens[key] += int(u["tokens"])  # type: ignore[call-overload]
    for row in tenant_rows:
        key = (row["period"], row["tenant"], row["model"])
        assert row["output_tokens"] == tokens[key], row
        # Independently rounded: kWh and hours to 9 places, each amount to 6.
        assert abs(row["cost_to_serve"] - cost[key]) <= Decimal("0.00001"), row  # type: ignore[operator]
        assert row["cost_to_serve"] == row["energy_cost"] + row["gpu_cost"]  # type: ignore[operator]
        assert row["invoice_status"] == "draft"
        assert row["margin"] == row["billed"] - row["cost_to_serve"], row  # type: ignore[operator]
    # What the mart says each tenant was billed is exactly its invoice's usage lines.
    store = InvoiceStore(settings.invoices_path)
    for period in ("2026-06", "2026-07"):
        for tenant in store.draft_tenants(period):
            document = store.read_document(store.draft_dir(period, tenant))
            usage_lines = sum(
                (
                    line.amount
                    for line in document.lines
                    if line.kind in {"tokens", "gpu", "energy"}
                ),
                Decimal(0),
            )
            billed = sum(
                (
                    r["billed"]
                    for r in tenant_rows
                    if (r["period"], r["tenant"]) == (period, tenant)
                ),  # type: ignore[misc]
                Decimal(0),
            )
            assert billed == usage_lines, (period, tenant)


def test_data_quality_accounts_for_every_event(efficiency_pipeline: EfficiencyPipeline) -> None:
    catalog = efficiency_pipeline.settings.analytics_path
    quality = rows(catalog, "SELECT * FROM marts.mart_data_quality ORDER BY hour_start")
    assert [r["hour_start"] for r in quality] == [
        efficiency_pipeline.start,
        efficiency_pipeline.start + timedelta(hours=1),
    ]
    [[events, orphans]] = [
        list(r.values())
        for r in rows(
            catalog,
            "SELECT count(*) AS events, count(*) FILTER (WHERE is_orphan) AS orphans "
            "FROM marts.fct_request_allocation",
        )
    ]
    [[listed]] = [
        list(r.values()) for r in rows(catalog, "SELECT count(*) FROM marts.dq_orphan_requests")
    ]
    assert sum(r["events"] for r in quality) == events > 0  # type: ignore[misc]
    assert sum(r["orphan_requests"] for r in quality) == orphans == listed  # type: ignore[misc]
    for row in quality:
        assert row["gpus_reporting"] == 4
        assert 0.9 <= row["telemetry_coverage"] <= 1.0, row  # type: ignore[operator]
        assert row["quarantined_events"] == 0 and row["late_events"] == 0


def test_dbt_docs_generate_documents_every_mart_column(
    efficiency_pipeline: EfficiencyPipeline,
) -> None:
    settings = efficiency_pipeline.settings
    variables = dbt_vars(settings, efficiency_pipeline.start, efficiency_pipeline.end)
    run = run_dbt(settings, ["docs", "generate", "--vars", json.dumps(variables)])
    assert run.success, run.log[-2000:]
    target = settings.state_dir / "dbt-target"
    manifest = json.loads((target / "manifest.json").read_text())
    catalog = json.loads((target / "catalog.json").read_text())
    for mart in ISSUE_MARTS:
        node = manifest["nodes"][f"model.gpuledger.{mart}"]
        assert node["description"].strip(), mart
        undocumented = [c for c, spec in node["columns"].items() if not spec["description"].strip()]
        assert not undocumented, f"{mart}: columns without a description: {undocumented}"
        built = catalog["nodes"][f"model.gpuledger.{mart}"]["columns"]
        assert set(built) == set(node["columns"]), mart


READER = textwrap.dedent(
    """
    import json, sys, time, duckdb
    catalog, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
    import pathlib
    with open(out, "a") as log:
        while not pathlib.Path(stop).exists():
            record = {}
            try:
                with duckdb.connect(catalog, read_only=True) as con:
                    snap = con.sql("SELECT snapshot_id, tables FROM main.snapshot").fetchall()
                    record["snapshot"] = snap[0][0]
                    counts = json.loads(snap[0][1])
                    record["mismatched"] = [
                        name for name, n in counts.items()
                        if con.sql(f'SELECT count(*) FROM marts."{name}"').fetchall()[0][0] != n
                    ]
                    [(eff, met)] = con.sql(
                        "SELECT (SELECT sum(energy_j) FROM marts.mart_efficiency_hourly), "
                        "(SELECT sum(metered_j) FROM marts.fct_gpu_hourly)"
                    ).fetchall()
                    record["energy"] = [eff, met]
                    record["hours"] = con.sql(
                        "SELECT count(*) FROM marts.mart_data_quality"
                    ).fetchall()[0][0]
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            log.write(json.dumps(record) + "\\n")
            log.flush()
            time.sleep(0.05)
    """
)


def test_analysts_read_consistent_snapshots_while_an_hour_materializes(
    efficiency_pipeline: EfficiencyPipeline, tmp_path: Path
) -> None:
    """An analyst's read loop, in its own process, runs while the third hour is ingested,
    allocated (dbt holds the warehouse's write lock) and published: no read fails, and
    every read sees one whole snapshot (row counts as recorded, energy closing across
    marts). A connection opened before the run keeps reading its own snapshot."""
    pipeline = efficiency_pipeline
    catalog = pipeline.settings.analytics_path
    stop, out = tmp_path / "stop", tmp_path / "reads.jsonl"
    held = duckdb.connect(str(catalog), read_only=True)
    [(held_hours,)] = held.sql("SELECT count(*) FROM marts.mart_data_quality").fetchall()
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(catalog), str(stop), str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while (
            not out.exists() or len(out.read_text().splitlines()) < 5
        ) and time.monotonic() < deadline:
            time.sleep(0.1)
        run = materialize_all(
            pipeline.settings, pipeline.next_hour, pipeline.next_hour + timedelta(hours=1)
        )
        assert run.success, run.failed_checks
        before = len(out.read_text().splitlines())
        while len(out.read_text().splitlines()) < before + 5 and time.monotonic() < deadline + 600:
            time.sleep(0.1)
    finally:
        stop.touch()
        _, stderr = reader.communicate(timeout=60)
    reads = [json.loads(line) for line in out.read_text().splitlines()]
    assert reader.returncode == 0, stderr
    errors = [r["error"] for r in reads if "error" in r]
    assert not errors, errors[:3]
    assert all(not r["mismatched"] for r in reads), [r for r in reads if r["mismatched"]][:3]
    assert all(math.isclose(*r["energy"], rel_tol=REL) for r in reads)
    snapshots = list(dict.fromkeys(r["snapshot"] for r in reads))
    assert len(snapshots) >= 2, "the reader never saw the new snapshot"
    assert reads[0]["hours"] == held_hours == 2 and reads[-1]["hours"] == 3
    # Snapshots only move forward: once the new one is seen, the old never returns.
    first_new = next(i for i, r in enumerate(reads) if r["snapshot"] != reads[0]["snapshot"])
    assert all(r["snapshot"] != reads[0]["snapshot"] for r in reads[first_new:])
    [(still,)] = held.sql("SELECT count(*) FROM marts.mart_data_quality").fetchall()
    held.close()
    assert still == held_hours
