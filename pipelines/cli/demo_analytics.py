"""Demo step 8: the efficiency marts as analysts see them, and how to open the dashboard.

Reads only the published snapshot (`analytics.duckdb`), as an analyst or the dashboard
would: fleet J per output token and utilization per model and GPU type, the day's
energy, facility energy and carbon, the top tenants' margin, then prints the commands
to query the snapshot and to serve the dashboard on the demo data.
"""

from __future__ import annotations

import re

import duckdb
from rich.table import Table

from ingest.settings import Settings
from pipelines.analytics.publish import snapshot_info
from pipelines.cli.simulate import console

__all__ = ["analytics_summary"]


def _short_gpu(name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `H100`: the product name, for a narrow terminal."""
    found = re.search(r"\b[A-Z]{1,2}\d{2,3}[A-Z]?\b", name)
    return found.group(0) if found else name


def analytics_summary(settings: Settings) -> None:
    catalog = settings.analytics_path
    if not catalog.is_file():
        console.print(f"  no published snapshot at {catalog} (the runs above publish one)")
        return
    info = snapshot_info(catalog)
    console.print(
        f"  snapshot {info['snapshot_id']}: "
        + ", ".join(f"{name} {rows:,}" for name, rows in sorted(info["tables"].items()))
    )
    with duckdb.connect(str(catalog), read_only=True) as con:
        efficiency = con.sql(
            """
            SELECT model, gpu_type, sum(output_tokens) AS tokens,
                   sum(energy_j) / nullif(sum(output_tokens), 0) AS j_per_token,
                   sum(active_s) / nullif(sum(covered_s), 0) AS utilization,
                   sum(idle_j) / nullif(sum(energy_j), 0) AS idle_share
            FROM marts.mart_efficiency_hourly
            GROUP BY ALL ORDER BY model, gpu_type
            """
        ).fetchall()
        days = con.sql(
            "SELECT day, metered_kwh, idle_kwh, facility_kwh, kg_co2e "
            "FROM marts.mart_fleet_daily ORDER BY day"
        ).fetchall()
        margins = con.sql(
            """
            SELECT tenant, sum(cost_to_serve) AS cost, sum(billed) AS billed,
                   sum(margin) AS margin, any_value(currency) AS currency
            FROM marts.mart_tenant_efficiency
            GROUP BY tenant ORDER BY cost DESC LIMIT 5
            """
        ).fetchall()
    table = Table(title="Fleet efficiency (mart_efficiency_hourly)", title_justify="left")
    table.add_column("model", no_wrap=True)
    for column in ("GPU", "output tok", "J/out tok", "util.", "idle share"):
        table.add_column(column, justify="left" if column == "GPU" else "right")
    for model, gpu, tokens, per_token, utilization, idle in efficiency:
        table.add_row(
            model,
            _short_gpu(gpu),
            f"{tokens / 1e6:,.2f} M",
            "—" if per_token is None else f"{per_token:.3f}",
            "—" if utilization is None else f"{utilization:.0%}",
            "—" if idle is None else f"{idle:.0%}",
        )
    console.print(table)
    for day, metered, idle, facility, kg in days:
        console.print(
            f"  {day}: metered {metered:,.1f} kWh (idle {idle:,.1f}), facility "
            f"{facility:,.1f} kWh at PUE {settings.efficiency.pue}, {kg:,.1f} kg CO2e"
        )
    if margins:
        table = Table(title="Top tenants by cost to serve (mart_tenant_efficiency)")
        for column in ("tenant", "cost to serve", "billed", "margin"):
            table.add_column(column, justify="left" if column == "tenant" else "right")
        for tenant, cost, billed, margin, currency in margins:
            table.add_row(
                tenant,
                f"{cost:,.2f} {currency}",
                "—" if billed is None else f"{billed:,.2f}",
                "—" if margin is None else f"{margin:,.2f}",
            )
        console.print(table)
    console.print(
        "  Query the snapshot (read-only, never blocks a run):\n"
        f"    .venv/bin/python -c \"import duckdb; print(duckdb.connect('{catalog}', "
        "read_only=True).sql('SELECT * FROM marts.mart_fleet_daily'))\"\n"
        "  Open the dashboard on this data:\n"
        "    .venv/bin/gpuledger dashboard\n"
        "    then browse http://127.0.0.1:8501"
    )
