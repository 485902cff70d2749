"""A small published catalog with the dashboard contract's schema and known figures.

The real catalog holds views over the warehouse; here the `marts` relations are plain
tables with the same columns and types, which is all the dashboard reads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb

SNAPSHOT_ID = "snap-20260302T0100Z-synthetic"

_SCHEMA = """
create schema marts;
create table main.snapshot (snapshot_id varchar, published_at timestamptz, tables varchar);
create table marts.mart_efficiency_hourly (
    model varchar, gpu_type varchar, hour_start timestamptz, gpus bigint, requests bigint,
    output_tokens double, prompt_tokens double, energy_j double, dynamic_j double,
    idle_j double, unattributed_j double, covered_s double, active_s double,
    occupied_s double, j_per_output_token double, output_tokens_per_j double,
    output_tokens_per_s_per_gpu double, utilization double, idle_energy_share double,
    unattributed_energy_share double
);
create table marts.mart_tenant_efficiency (
    period varchar, tenant varchar, model varchar, requests bigint, prompt_tokens bigint,
    output_tokens bigint, energy_j double, gpu_hours double, j_per_output_token double,
    currency varchar, energy_cost decimal(18,6), gpu_cost decimal(18,6),
    cost_to_serve decimal(18,6), cost_per_1m_output_tokens decimal(18,6),
    billed decimal(18,6), billed_per_1m_output_tokens decimal(18,6),
    margin decimal(18,6), margin_share double, invoice_status varchar
);
create table marts.mart_fleet_daily (
    day date, gpus bigint, metered_kwh double, dynamic_kwh double, idle_kwh double,
    unattributed_kwh double, pue double, facility_kwh double, kg_co2e double,
    grid_g_co2e_per_kwh double, output_tokens double
);
create table marts.mart_data_quality (
    hour_start timestamptz, gpus_reporting bigint, covered_s double, gap_s double,
    estimated_energy_share double, telemetry_coverage double, counter_resets bigint,
    events bigint, orphan_requests bigint, quarantined_events bigint, late_events bigint
);
create table marts.mart_invoices (
    period varchar, tenant varchar, kind varchar, number varchar, status varchar,
    currency varchar, subtotal decimal(18,6), tax decimal(18,6), total decimal(18,6),
    issued_on date, folder varchar
);
create table marts.fct_tenant_usage_hourly (
    tenant varchar, model varchar, gpu_type varchar, event_hour timestamptz,
    idle_policy varchar, requests bigint, prompt_tokens bigint, cached_prompt_tokens bigint,
    completion_tokens bigint, energy_j double, dynamic_energy_j double, idle_energy_j double,
    occupied_gpu_s double, active_gpu_s double, orphan_requests bigint
);
create table marts.fct_gpu_hourly (
    gpu_key varchar, gpu_uuid varchar, hostname varchar, gpu_model varchar,
    hour_start timestamptz, idle_policy varchar, metered_j double, idle_j double,
    dynamic_j double, allocated_j double, idle_unallocated_j double, unattributed_j double,
    covered_s double, occupied_s double, idle_s double, active_s double, gap_s double,
    requests bigint
);
"""

# Hand-picked rows whose figures the unit tests check by hand: on 2026-03-01 the
# llama-3-70b · H100 series uses 4.0 MJ for 1.0 M tokens (4.0 J/token), where the mean
# of its hourly ratios would be 3.75.
# model, gpu_type, hour (UTC), gpus, requests, output_tokens, energy_j, idle_j,
# unattributed_j, covered_s, utilization
_HAND_ROWS = [
    ("llama-3-70b", "H100", "2026-03-01 00:00", 2, 40, 400e3, 1000e3, 100e3, 20e3, 7200.0, 0.50),
    ("llama-3-70b", "H100", "2026-03-01 01:00", 2, 60, 600e3, 3000e3, 200e3, 40e3, 7200.0, 0.25),
    ("llama-3-8b", "A100", "2026-03-01 00:00", 1, 90, 1100e3, 500e3, 50e3, 0.0, 3600.0, 0.80),
    ("llama-3-8b", "A100", "2026-03-02 00:00", 1, 3, 0.0, 600e3, 580e3, 0.0, 3600.0, 0.01),
    ("(no traffic)", "H100", "2026-03-02 00:00", 2, 0, 0.0, 2000e3, 2000e3, 0.0, 7200.0, 0.0),
]


def _generated_rows() -> list[tuple[Any, ...]]:
    """Two days of a third series, so the charts have lines to draw."""
    rows = []
    for index in range(48):
        day, hour = divmod(index, 24)
        load = 0.5 + 0.4 * math.sin(index / 24 * 2 * math.pi)
        tokens = round(2_000_000 * load)
        energy = 2_000_000 + 3_000_000 * load
        rows.append(
            (
                "mistral-7b",
                "L40S",
                f"2026-03-0{day + 1} {hour:02d}:00",
                4,
                round(4000 * load),
                float(tokens),
                energy,
                1_000_000 * (1 - load),
                50_000.0,
                14_400.0,
                round(load, 6),
            )
        )
    return rows


_EFFICIENCY = _HAND_ROWS + _generated_rows()

# period, tenant, model, output_tokens, energy_j, cost_to_serve, billed, invoice_status
_TENANTS = [
    ("2026-03", "acme", "llama-3-70b", 700, 3_000_000.0, "100.50", "130.00", "final"),
    ("2026-03", "acme", "llama-3-8b", 300, 0.0, "20.00", "20.00", "final"),
    ("2026-03", "globex", "llama-3-70b", 900, 5_000_000.0, "80.00", None, None),
    ("2026-03", "initech", "llama-3-8b", 1100, 1_000_000.0, "200.125", "210.00", "draft"),
]

_PUE = 1.2
_GRID_G_CO2E_PER_KWH = 350.0


def _fleet_daily() -> list[tuple[Any, ...]]:
    """Days summed from the efficiency rows, as the real mart is."""
    days: dict[str, list[float]] = {}
    for row in _EFFICIENCY:
        energy, idle, unattributed, tokens = row[6], row[7], row[8], row[5]
        sums = days.setdefault(row[2][:10], [0.0, 0.0, 0.0, 0.0])
        sums[0] += energy
        sums[1] += idle
        sums[2] += unattributed
        sums[3] += tokens
    out = []
    for day, (energy, idle, unattributed, tokens) in sorted(days.items()):
        kwh = energy / 3_600_000
        idle_kwh, unattributed_kwh = idle / 3_600_000, unattributed / 3_600_000
        dynamic_kwh = kwh - idle_kwh - unattributed_kwh
        kg = kwh * _PUE * _GRID_G_CO2E_PER_KWH / 1000
        out.append((day, 7, kwh, dynamic_kwh, idle_kwh, unattributed_kwh, kg, tokens))
    return out


_FLEET_DAILY = _fleet_daily()


def _quality() -> list[tuple[Any, ...]]:
    # hour, gpus_reporting, covered_s, gap_s, coverage, resets, orphans, quarantined, late
    rows = []
    for index in range(48):
        day, hour = divmod(index, 24)
        gap = 1_080.0 if index in (5, 6, 30) else 0.0
        rows.append(
            (
                f"2026-03-0{day + 1} {hour:02d}:00",
                7,
                25_200.0 - gap,
                gap,
                (25_200.0 - gap) / 25_200.0,
                1 if index == 6 else 0,
                2 if gap else 0,
                1 if index == 30 else 0,
                3 if index == 31 else 0,
            )
        )
    return rows


_QUALITY = _quality()


def _invoice_folder(root: Path, period: str, tenant: str) -> Path:
    folder = root / "invoices" / period / tenant
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "invoice.pdf").write_bytes(b"%PDF-1.4\n% synthetic\n")
    (folder / "lines.csv").write_text("line_no,description,amount\n1,GPU hours,1.00\n")
    (folder / "focus.csv").write_text("BilledCost,BillingCurrency\n1.00,EUR\n")
    (folder / "invoice.json").write_text("{}\n")
    return folder


def write_synthetic_catalog(path: Path) -> dict[str, Any]:
    """Write a catalog file at `path` and return the figures a reader must find in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    con = duckdb.connect(str(path))
    try:
        con.sql("set TimeZone = 'UTC'")
        con.sql(_SCHEMA)
        con.sql(
            "insert into main.snapshot values ($id, '2026-03-02 01:05:00+00', $tables)",
            params={"id": SNAPSHOT_ID, "tables": '["marts.mart_efficiency_hourly"]'},
        )
        for row in _EFFICIENCY:
            model, gpu, hour, gpus, requests, tokens, energy, idle, unattributed = row[:9]
            covered_s, utilization = row[9:]
            dynamic = energy - idle - unattributed
            con.sql(
                """
                insert into marts.mart_efficiency_hourly values (
                    $model, $gpu, ($hour || '+00')::timestamptz, $gpus, $requests, $tokens,
                    $tokens * 3, $energy, $dynamic, $idle, $unattributed, $covered,
                    $covered * $util, $covered * $util,
                    if($tokens > 0, $energy / $tokens, null),
                    $tokens / $energy, $tokens / $covered, $util,
                    $idle / $energy, $unattributed / $energy
                )
                """,
                params={
                    "model": model,
                    "gpu": gpu,
                    "hour": hour,
                    "gpus": gpus,
                    "requests": requests,
                    "tokens": tokens,
                    "energy": energy,
                    "dynamic": dynamic,
                    "idle": idle,
                    "unattributed": unattributed,
                    "covered": covered_s,
                    "util": utilization,
                },
            )
        for period, tenant, model, tokens, energy, cost, billed, status in _TENANTS:
            con.sql(
                """
                insert into marts.mart_tenant_efficiency
                select $period, $tenant, $model, 10, $tokens * 2, $tokens, $energy, 1.5,
                    if($tokens > 0, $energy / $tokens, null), 'EUR',
                    cost / 4, cost - cost / 4, cost, cost * 1000000 / $tokens,
                    billed, billed * 1000000 / $tokens, billed - cost,
                    (billed - cost) / billed, $status
                from (select $cost::decimal(18,6) as cost, $billed::decimal(18,6) as billed)
                """,
                params={
                    "period": period,
                    "tenant": tenant,
                    "model": model,
                    "tokens": tokens,
                    "energy": energy,
                    "cost": cost,
                    "billed": billed,
                    "status": status,
                },
            )
        for day, gpus, metered, dynamic, idle, unattributed, kg, tokens in _FLEET_DAILY:
            con.sql(
                """
                insert into marts.mart_fleet_daily values (
                    $day::date, $gpus, $metered, $dynamic, $idle, $unattributed, $pue,
                    $metered * $pue, $kg, $grid, $tokens
                )
                """,
                params={
                    "day": day,
                    "gpus": gpus,
                    "metered": metered,
                    "dynamic": dynamic,
                    "idle": idle,
                    "unattributed": unattributed,
                    "kg": kg,
                    "tokens": tokens,
                    "pue": _PUE,
                    "grid": _GRID_G_CO2E_PER_KWH,
                },
            )
        for hour, gpus, covered, gap, coverage, resets, orphans, quarantined, late in _QUALITY:
            con.sql(
                """
                insert into marts.mart_data_quality values (
                    ($hour || '+00')::timestamptz, $gpus, $covered, $gap, 1 - $coverage,
                    $coverage, $resets, 100, $orphans, $quarantined, $late
                )
                """,
                params={
                    "hour": hour,
                    "gpus": gpus,
                    "covered": covered,
                    "gap": gap,
                    "coverage": coverage,
                    "resets": resets,
                    "orphans": orphans,
                    "quarantined": quarantined,
                    "late": late,
                },
            )
        invoices = [
            ("2026-03", "acme", "invoice", "INV-000001", "final", "150.00", "2026-04-03"),
            ("2026-03", "initech", "invoice", None, "draft", "210.00", None),
            ("2026-02", "acme", "invoice", "INV-000000", "void", "99.99", "2026-03-02"),
            ("2026-02", "acme", "credit_note", "CN-000001", "final", "-99.99", "2026-03-05"),
        ]
        for period, tenant, kind, number, status, total, issued in invoices:
            folder = _invoice_folder(path.parent, period, f"{tenant}-{kind}")
            con.sql(
                """
                insert into marts.mart_invoices
                select $period, $tenant, $kind, $number, $status, 'EUR',
                    total / 1.2, total - total / 1.2, total, $issued::date, $folder
                from (select $total::decimal(18,6) as total)
                """,
                params={
                    "period": period,
                    "tenant": tenant,
                    "kind": kind,
                    "number": number,
                    "status": status,
                    "total": total,
                    "issued": issued,
                    "folder": str(folder),
                },
            )
        con.sql(
            """
            insert into marts.fct_tenant_usage_hourly values
            ('acme', 'llama-3-70b', 'H100', '2026-03-01 00:00+00', 'separate', 40, 1200, 0,
             400, 1000, 880, 100, 3600, 1800, 0)
            """
        )
        con.sql(
            """
            insert into marts.fct_gpu_hourly values
            ('node-1/0', 'GPU-0000', 'node-1', 'H100', '2026-03-01 00:00+00', 'separate',
             1000, 100, 880, 980, 0, 20, 3600, 3600, 1800, 1800, 0, 40)
            """
        )
    finally:
        con.close()
    return {
        "snapshot_id": SNAPSHOT_ID,
        # All energy (no-traffic GPU-hours too) / all output tokens
        "fleet_j_per_output_token": sum(row[6] for row in _EFFICIENCY)
        / sum(row[5] for row in _EFFICIENCY),
        "output_tokens": sum(row[5] for row in _EFFICIENCY),
        "metered_kwh": sum(row[2] for row in _FLEET_DAILY),
        "kg_co2e": sum(row[6] for row in _FLEET_DAILY),
        "tenants": 3,
        "models": ["llama-3-70b", "llama-3-8b", "mistral-7b"],
        "top_tenants_by_cost": ["initech", "acme", "globex"],
        "top_tenants_by_energy": ["globex", "acme", "initech"],
        "periods": ["2026-03", "2026-02"],
    }
