"""The dashboard's queries over a published analytics catalog, one function per panel.

Every function takes an open connection and returns a Polars frame. Ratios of groups
are recomputed from their sums (J/token of a group = Σ energy / Σ output tokens),
never averaged from the hourly ratios. Money stays Decimal; `money_text` formats it
for display only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal

import duckdb
import polars as pl

from pipelines.analytics.publish import current_catalog

Grain = Literal["hour", "day"]

NO_TRAFFIC = "(no traffic)"
J_PER_KWH = 3_600_000.0
INVOICE_FILES = ("invoice.pdf", "lines.csv", "focus.csv")


@contextlib.contextmanager
def open_catalog(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection for one page load, closed afterwards.

    It opens the current snapshot's own catalog file (`current_catalog`): Streamlit
    serves every session from one process, where DuckDB shares one database per path,
    so opening `analytics.duckdb` while another session holds it would show that
    session's (older) snapshot.
    """
    con = duckdb.connect(str(current_catalog(path)), read_only=True)
    try:
        con.sql("set TimeZone = 'UTC'")
        yield con
    finally:
        con.close()


def _frame(con: duckdb.DuckDBPyConnection, query: str, **params: Any) -> pl.DataFrame:
    return con.sql(query, params=params or None).pl()


def _where(
    time_column: str,
    start: date | None,
    end: date | None,
    models: Sequence[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """A WHERE clause over [start, end] (whole UTC days) and an optional model list."""
    clauses = ["true"]
    params: dict[str, Any] = {}
    if start is not None:
        clauses.append(f"{time_column} >= $start::date::timestamptz")
        params["start"] = start
    if end is not None:
        clauses.append(f"{time_column} < ($end::date + 1)::timestamptz")
        params["end"] = end
    if models is not None:
        clauses.append("list_contains($models::varchar[], model)")
        params["models"] = list(models)
    return " and ".join(clauses), params


def _periods(start: date | None, end: date | None) -> tuple[str, dict[str, Any]]:
    """Billing periods ('YYYY-MM') that overlap [start, end]."""
    clauses = ["true"]
    params: dict[str, Any] = {}
    if start is not None:
        clauses.append("period >= strftime($start::date, '%Y-%m')")
        params["start"] = start
    if end is not None:
        clauses.append("period <= strftime($end::date, '%Y-%m')")
        params["end"] = end
    return " and ".join(clauses), params


def auto_grain(start: date | None, end: date | None) -> Grain:
    """Hours for a few days, days beyond: a month of hours is too dense to read."""
    if start is None or end is None:
        return "day"
    return "hour" if (end - start).days < 3 else "day"


def snapshot(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """The published snapshot's id and time (one row, or none)."""
    return _frame(con, "select snapshot_id, published_at from main.snapshot limit 1")


def date_bounds(con: duckdb.DuckDBPyConnection) -> tuple[date | None, date | None]:
    """First and last UTC day with efficiency or fleet rows."""
    rows = con.sql(
        """
        select min(day), max(day) from (
            select hour_start::date as day from marts.mart_efficiency_hourly
            union all
            select day from marts.mart_fleet_daily
        )
        """
    ).fetchall()
    return (rows[0][0], rows[0][1]) if rows else (None, None)


def models(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Models that served traffic, for the sidebar filter."""
    frame = _frame(
        con,
        "select distinct model from marts.mart_efficiency_hourly "
        "where model <> $no_traffic order by model",
        no_traffic=NO_TRAFFIC,
    )
    return frame["model"].to_list()


def headline(
    con: duckdb.DuckDBPyConnection, start: date | None = None, end: date | None = None
) -> pl.DataFrame:
    """One row: GPU kWh, output tokens, fleet J/output token, kg CO2e, tenants, snapshot.

    Fleet J/output token is all metered GPU energy over all output tokens: GPU-hours
    with no traffic count too (the fleet paid for them), as they do in the kWh figure.
    """
    efficiency_where, params = _where("hour_start", start, end)
    day_where, _ = _where("day::timestamptz", start, end)
    period_where, _ = _periods(start, end)
    return _frame(
        con,
        f"""
        with tokens as (
            select
                coalesce(sum(output_tokens), 0) as output_tokens,
                sum(energy_j) / nullif(sum(output_tokens), 0) as j_per_output_token
            from marts.mart_efficiency_hourly
            where {efficiency_where}
        ),
        fleet as (
            select
                coalesce(sum(metered_kwh), 0) as metered_kwh,
                coalesce(sum(facility_kwh), 0) as facility_kwh,
                coalesce(sum(kg_co2e), 0) as kg_co2e
            from marts.mart_fleet_daily
            where {day_where}
        ),
        tenants as (
            select count(distinct tenant) as tenants
            from marts.mart_tenant_efficiency
            where {period_where}
        )
        select
            fleet.metered_kwh,
            fleet.facility_kwh,
            tokens.output_tokens,
            tokens.j_per_output_token,
            fleet.kg_co2e,
            tenants.tenants,
            (select snapshot_id from main.snapshot limit 1) as snapshot_id
        from tokens, fleet, tenants
        """,
        **params,
    )


def fleet_efficiency(
    con: duckdb.DuckDBPyConnection,
    start: date | None = None,
    end: date | None = None,
    models: Sequence[str] | None = None,
    grain: Grain = "hour",
) -> pl.DataFrame:
    """J/output token (energy-weighted) and utilization (time-weighted) per
    model × GPU type × hour or day; GPU-hours without traffic are left out."""
    where, params = _where("hour_start", start, end, models)
    return _frame(
        con,
        f"""
        select
            date_trunc($grain, hour_start) as period_start,
            model,
            gpu_type,
            model || ' · ' || gpu_type as series,
            sum(energy_j) as energy_j,
            sum(output_tokens) as output_tokens,
            sum(energy_j) filter (where output_tokens > 0)
                / nullif(sum(output_tokens) filter (where output_tokens > 0), 0)
                as j_per_output_token,
            sum(utilization * covered_s) / nullif(sum(covered_s), 0) as utilization
        from marts.mart_efficiency_hourly
        where {where} and model <> $no_traffic
        group by all
        order by period_start, model, gpu_type
        """,
        grain=grain,
        no_traffic=NO_TRAFFIC,
        **params,
    )


def efficiency_by_series(
    con: duckdb.DuckDBPyConnection,
    start: date | None = None,
    end: date | None = None,
    models: Sequence[str] | None = None,
) -> pl.DataFrame:
    """The same figures over the whole window, one row per model × GPU type."""
    where, params = _where("hour_start", start, end, models)
    return _frame(
        con,
        f"""
        select
            model,
            gpu_type,
            sum(requests)::bigint as requests,
            sum(output_tokens) as output_tokens,
            sum(energy_j) / $j_per_kwh as energy_kwh,
            sum(energy_j) filter (where output_tokens > 0)
                / nullif(sum(output_tokens) filter (where output_tokens > 0), 0)
                as j_per_output_token,
            sum(utilization * covered_s) / nullif(sum(covered_s), 0) as utilization,
            sum(idle_j) / nullif(sum(energy_j), 0) as idle_energy_share
        from marts.mart_efficiency_hourly
        where {where} and model <> $no_traffic
        group by all
        order by energy_kwh desc, model, gpu_type
        """,
        j_per_kwh=J_PER_KWH,
        no_traffic=NO_TRAFFIC,
        **params,
    )


def idle_energy(
    con: duckdb.DuckDBPyConnection,
    start: date | None = None,
    end: date | None = None,
    grain: Grain = "hour",
) -> pl.DataFrame:
    """Fleet energy per hour or day split into dynamic, idle and unattributed kWh."""
    where, params = _where("hour_start", start, end)
    return _frame(
        con,
        f"""
        select
            date_trunc($grain, hour_start) as period_start,
            sum(dynamic_j) / $j_per_kwh as dynamic_kwh,
            sum(idle_j) / $j_per_kwh as idle_kwh,
            sum(unattributed_j) / $j_per_kwh as unattributed_kwh,
            sum(energy_j) / $j_per_kwh as energy_kwh,
            sum(idle_j) / nullif(sum(energy_j), 0) as idle_energy_share,
            sum(unattributed_j) / nullif(sum(energy_j), 0) as unattributed_energy_share,
            sum(energy_j) filter (where model = $no_traffic) / $j_per_kwh
                as no_traffic_kwh
        from marts.mart_efficiency_hourly
        where {where}
        group by all
        order by period_start
        """,
        grain=grain,
        j_per_kwh=J_PER_KWH,
        no_traffic=NO_TRAFFIC,
        **params,
    )


def fleet_daily(
    con: duckdb.DuckDBPyConnection, start: date | None = None, end: date | None = None
) -> pl.DataFrame:
    """The fleet's days as published: kWh by kind, PUE, facility kWh and kg CO2e."""
    where, params = _where("day::timestamptz", start, end)
    return _frame(
        con,
        f"""
        select day, gpus, metered_kwh, dynamic_kwh, idle_kwh, unattributed_kwh, pue,
            facility_kwh, kg_co2e, grid_g_co2e_per_kwh, output_tokens
        from marts.mart_fleet_daily
        where {where}
        order by day
        """,
        **params,
    )


def _tenants(
    con: duckdb.DuckDBPyConnection,
    order_by: str,
    start: date | None,
    end: date | None,
    limit: int,
) -> pl.DataFrame:
    where, params = _periods(start, end)
    return _frame(
        con,
        f"""
        select
            tenant,
            currency,
            sum(requests)::bigint as requests,
            sum(output_tokens)::bigint as output_tokens,
            sum(energy_j) / $j_per_kwh as energy_kwh,
            sum(energy_j) / nullif(sum(output_tokens), 0) as j_per_output_token,
            sum(gpu_hours) as gpu_hours,
            sum(cost_to_serve) as cost_to_serve,
            sum(billed) as billed,
            sum(margin) as margin,
            (sum(margin) / nullif(sum(billed), 0))::double as margin_share
        from marts.mart_tenant_efficiency
        where {where}
        group by tenant, currency
        order by {order_by}, tenant, currency
        limit $limit
        """,
        j_per_kwh=J_PER_KWH,
        limit=limit,
        **params,
    )


def top_tenants_by_cost(
    con: duckdb.DuckDBPyConnection,
    start: date | None = None,
    end: date | None = None,
    limit: int = 10,
) -> pl.DataFrame:
    """Tenants by cost to serve, highest first, with what they were billed (NULL
    until an invoice exists) and the margin."""
    return _tenants(con, "cost_to_serve desc nulls last", start, end, limit)


def top_tenants_by_energy(
    con: duckdb.DuckDBPyConnection,
    start: date | None = None,
    end: date | None = None,
    limit: int = 10,
) -> pl.DataFrame:
    """Tenants by allocated GPU energy, highest first."""
    return _tenants(con, "energy_kwh desc nulls last", start, end, limit)


def invoices(
    con: duckdb.DuckDBPyConnection,
    start: date | None = None,
    end: date | None = None,
) -> pl.DataFrame:
    """Invoices and credit notes of the periods overlapping the window, newest first."""
    where, params = _periods(start, end)
    return _frame(
        con,
        f"""
        select period, tenant, kind, number, status, currency, subtotal, tax, total,
            issued_on, folder
        from marts.mart_invoices
        where {where}
        order by period desc, tenant, kind desc, issued_on nulls last, number
        """,
        **params,
    )


def invoices_by_period(
    con: duckdb.DuckDBPyConnection,
    start: date | None = None,
    end: date | None = None,
) -> pl.DataFrame:
    """Document count and total per period × status × currency."""
    where, params = _periods(start, end)
    return _frame(
        con,
        f"""
        select period, status, currency, count(*)::bigint as documents, sum(total) as total
        from marts.mart_invoices
        where {where}
        group by all
        order by period, status, currency
        """,
        **params,
    )


def data_quality(
    con: duckdb.DuckDBPyConnection,
    start: date | None = None,
    end: date | None = None,
    grain: Grain = "hour",
) -> pl.DataFrame:
    """Telemetry coverage (weighted by GPU-seconds) and problem counts per hour or day."""
    where, params = _where("hour_start", start, end)
    return _frame(
        con,
        f"""
        select
            date_trunc($grain, hour_start) as period_start,
            max(gpus_reporting) as gpus_reporting,
            sum(covered_s) as covered_s,
            sum(gap_s) as gap_s,
            coalesce(
                sum(telemetry_coverage * (covered_s + gap_s))
                    / nullif(sum(covered_s + gap_s), 0),
                avg(telemetry_coverage)
            ) as telemetry_coverage,
            coalesce(
                sum(estimated_energy_share * (covered_s + gap_s))
                    / nullif(sum(covered_s + gap_s), 0),
                avg(estimated_energy_share)
            ) as estimated_energy_share,
            sum(events)::bigint as events,
            sum(counter_resets)::bigint as counter_resets,
            sum(orphan_requests)::bigint as orphan_requests,
            sum(quarantined_events)::bigint as quarantined_events,
            sum(late_events)::bigint as late_events
        from marts.mart_data_quality
        where {where}
        group by all
        order by period_start
        """,
        grain=grain,
        **params,
    )


def format_money(value: Decimal | None) -> str:
    """Two decimals, half up, thousands separated; '—' for no amount."""
    if value is None:
        return "—"
    return f"{value.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,}"


def money_text(frame: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    """`frame` with its Decimal `columns` replaced by display strings."""
    return frame.with_columns(
        pl.col(column).map_elements(format_money, return_dtype=pl.String, skip_nulls=False)
        for column in columns
    )


def invoice_files(folder: str | None) -> dict[str, Path]:
    """The downloadable files present in an invoice folder, by name."""
    if not folder:
        return {}
    return {name: Path(folder) / name for name in INVOICE_FILES if (Path(folder) / name).is_file()}
