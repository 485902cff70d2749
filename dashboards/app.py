"""gpuledger's browser dashboard: where the fleet's joules and money go.

Run it with `gpuledger dashboard`, or
`streamlit run dashboards/app.py -- --catalog PATH`. It reads only the published
analytics catalog (a DuckDB file), read-only, with a fresh connection for every page
load: the publisher swaps the file for a newer snapshot while the dashboard runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date
from pathlib import Path
from typing import Any

# Streamlit runs this file as a script; `dashboards` is not an installed package.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import altair as alt  # noqa: E402
import duckdb  # noqa: E402
import polars as pl  # noqa: E402
import streamlit as st  # noqa: E402

from dashboards import queries  # noqa: E402
from models.errors import GpuledgerError  # noqa: E402

CATALOG_ENV_VAR = "GPULEDGER_ANALYTICS_DB"
CHART_HEIGHT = 300
ENERGY_KINDS = {
    "dynamic_kwh": "dynamic (serving)",
    "idle_kwh": "idle",
    "unattributed_kwh": "unattributed",
}
PROBLEMS = {
    "counter_resets": "counter resets",
    "orphan_requests": "orphan requests",
    "quarantined_events": "quarantined events",
    "late_events": "late events",
}


def catalog_path(argv: list[str] | None = None) -> Path:
    """--catalog, else $GPULEDGER_ANALYTICS_DB, else the settings' published catalog."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--catalog", type=Path)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.catalog is not None:
        return Path(args.catalog).expanduser()
    if os.environ.get(CATALOG_ENV_VAR):
        return Path(os.environ[CATALOG_ENV_VAR]).expanduser()
    from ingest.settings import load_settings

    return load_settings().analytics_path


def _time_axis(grain: queries.Grain) -> dict[str, Any]:
    # UTC time units, so the browser does not shift the hours to its own zone.
    unit = "utcyearmonthdatehours" if grain == "hour" else "utcyearmonthdate"
    label = "hour (UTC)" if grain == "hour" else "day (UTC)"
    axis_format = "%m-%d %H:%M" if grain == "hour" else "%Y-%m-%d"
    return {
        "x": alt.X(
            "period_start:T",
            timeUnit=unit,
            title=label,
            axis=alt.Axis(format=axis_format, labelAngle=0, labelOverlap=True),
        ),
        "tooltip_time": alt.Tooltip("period_start:T", timeUnit=unit, title=label),
    }


def _chart(chart: alt.Chart | alt.LayerChart, title: str) -> None:
    # The title as page text, not a Vega title: it wraps and never clips.
    st.markdown(f"**{title}**")
    st.altair_chart(
        chart.properties(height=CHART_HEIGHT).configure_legend(
            orient="bottom", columns=2, labelLimit=300, titleLimit=300
        ),
        width="stretch",
    )


def _pandas(frame: pl.DataFrame) -> Any:
    """Charts get floats: Decimal is for money tables, Vega-Lite wants numbers."""
    return frame.with_columns(pl.col(pl.Decimal).cast(pl.Float64)).to_pandas()


def _window(
    con: duckdb.DuckDBPyConnection,
) -> tuple[date | None, date | None, list[str] | None]:
    """The sidebar: snapshot, date range and model filters."""
    sidebar = st.sidebar
    snapshot = queries.snapshot(con)
    sidebar.header("Snapshot")
    if snapshot.height:
        published = snapshot["published_at"][0]
        sidebar.markdown(f"**{snapshot['snapshot_id'][0]}**")
        sidebar.caption(
            f"published {published:%Y-%m-%d %H:%M:%S} UTC" if published else "published: unknown"
        )
    else:
        sidebar.caption("main.snapshot has no row")

    sidebar.header("Filters")
    low, high = queries.date_bounds(con)
    start, end = low, high
    if low is not None and high is not None:
        picked = sidebar.date_input(
            "Dates (UTC)", value=(low, high), min_value=low, max_value=high, format="YYYY-MM-DD"
        )
        days = list(picked) if isinstance(picked, tuple | list) else [picked]
        days = [day for day in days if day is not None]
        if days:
            start, end = days[0], days[-1]
    else:
        sidebar.caption("no dated rows in this snapshot")

    options = queries.models(con)
    chosen = sidebar.multiselect("Models", options, default=options)
    if options and not chosen:
        sidebar.caption("no model chosen: showing all")
    models = chosen if chosen and len(chosen) < len(options) else None
    return start, end, models


def _compact(count: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= size:
            return f"{count / size:,.1f} {suffix}"
    return f"{count:,.0f}"


def _headline(con: duckdb.DuckDBPyConnection, start: date | None, end: date | None) -> None:
    row = queries.headline(con, start, end).row(0, named=True)
    j_per_token = row["j_per_output_token"]
    cols = st.columns(5)
    cols[0].metric(
        "GPU energy (kWh)",
        f"{row['metered_kwh']:,.1f}",
        help=f"Metered at the GPUs; {row['facility_kwh']:,.1f} kWh at the facility (PUE).",
        border=True,
    )
    cols[1].metric(
        "Output tokens",
        _compact(row["output_tokens"]),
        help=f"{row['output_tokens']:,.0f} output tokens",
        border=True,
    )
    cols[2].metric(
        "Fleet J/output token",
        "n/a" if j_per_token is None else f"{j_per_token:.4f}",
        help="Σ energy / Σ output tokens over the model-hours that produced output tokens. "
        "GPU-hours without traffic count under idle energy.",
        border=True,
    )
    cols[3].metric(
        "Emissions (kg CO2e)",
        f"{row['kg_co2e']:,.1f}",
        help="Facility energy (GPU energy × PUE) × the grid's carbon intensity.",
        border=True,
    )
    cols[4].metric("Tenants", f"{row['tenants']:,}", border=True)


def _fleet_efficiency(
    con: duckdb.DuckDBPyConnection,
    start: date | None,
    end: date | None,
    models: list[str] | None,
    grain: queries.Grain,
) -> None:
    st.header("Fleet efficiency")
    frame = queries.fleet_efficiency(con, start, end, models, grain)
    if frame.is_empty():
        st.info("No model-hours with traffic in this window.")
        return
    axis = _time_axis(grain)
    base = alt.Chart(_pandas(frame)).encode(
        x=axis["x"], color=alt.Color("series:N", title="model · GPU type")
    )
    left, right = st.columns(2)
    with left:
        _chart(
            base.mark_line(point=True).encode(
                y=alt.Y("j_per_output_token:Q", title="J / output token"),
                tooltip=[
                    axis["tooltip_time"],
                    alt.Tooltip("series:N", title="model · GPU"),
                    alt.Tooltip("j_per_output_token:Q", title="J/output token", format=".4f"),
                    alt.Tooltip("output_tokens:Q", title="output tokens", format=",.0f"),
                ],
            ),
            "Energy per output token (J/token, energy-weighted)",
        )
    with right:
        _chart(
            base.mark_line(point=True).encode(
                y=alt.Y(
                    "utilization:Q",
                    title="GPU utilization (%)",
                    axis=alt.Axis(format="%"),
                    scale=alt.Scale(domain=[0, 1]),
                ),
                tooltip=[
                    axis["tooltip_time"],
                    alt.Tooltip("series:N", title="model · GPU"),
                    alt.Tooltip("utilization:Q", title="utilization", format=".1%"),
                ],
            ),
            "GPU utilization (% of covered GPU time)",
        )
    table = queries.efficiency_by_series(con, start, end, models)
    st.dataframe(
        table,
        hide_index=True,
        placeholder="—",
        column_config={
            "model": "model",
            "gpu_type": "GPU type",
            "requests": st.column_config.NumberColumn("requests", format="localized"),
            "output_tokens": st.column_config.NumberColumn("output tokens", format="localized"),
            "energy_kwh": st.column_config.NumberColumn("energy (kWh)", format="%.2f"),
            "j_per_output_token": st.column_config.NumberColumn("J/output token", format="%.4f"),
            "utilization": st.column_config.NumberColumn("utilization", format="percent"),
            "idle_energy_share": st.column_config.NumberColumn("idle share", format="percent"),
        },
    )


def _idle_energy(
    con: duckdb.DuckDBPyConnection, start: date | None, end: date | None, grain: queries.Grain
) -> None:
    st.header("Idle and unattributed energy")
    frame = queries.idle_energy(con, start, end, grain)
    if frame.is_empty():
        st.info("No GPU energy in this window.")
        return
    axis = _time_axis(grain)
    long = (
        frame.select("period_start", *ENERGY_KINDS)
        .unpivot(index="period_start", variable_name="kind", value_name="kwh")
        .with_columns(pl.col("kind").replace_strict(ENERGY_KINDS))
    )
    order = list(ENERGY_KINDS.values())
    left, right = st.columns(2)
    with left:
        _chart(
            alt.Chart(_pandas(long))
            .mark_bar()
            .encode(
                x=axis["x"],
                y=alt.Y("sum(kwh):Q", title="energy (kWh)", stack="zero"),
                color=alt.Color(
                    "kind:N",
                    title="energy",
                    sort=order,
                    scale=alt.Scale(domain=order, range=["#4c78a8", "#f58518", "#e45756"]),
                ),
                tooltip=[
                    axis["tooltip_time"],
                    alt.Tooltip("kind:N", title="energy"),
                    alt.Tooltip("kwh:Q", title="kWh", format=",.3f"),
                ],
            ),
            "Fleet energy by kind (kWh)",
        )
    shares = frame.select(
        "period_start",
        pl.col("idle_energy_share").alias("idle"),
        pl.col("unattributed_energy_share").alias("unattributed"),
    ).unpivot(index="period_start", variable_name="kind", value_name="share")
    with right:
        _chart(
            alt.Chart(_pandas(shares))
            .mark_line(point=True)
            .encode(
                x=axis["x"],
                y=alt.Y("share:Q", title="share of GPU energy (%)", axis=alt.Axis(format="%")),
                color=alt.Color(
                    "kind:N",
                    title="energy",
                    scale=alt.Scale(domain=["idle", "unattributed"], range=["#f58518", "#e45756"]),
                ),
                tooltip=[
                    axis["tooltip_time"],
                    alt.Tooltip("kind:N", title="energy"),
                    alt.Tooltip("share:Q", title="share", format=".1%"),
                ],
            ),
            "Idle and unattributed share of GPU energy (%)",
        )
    daily = queries.fleet_daily(con, start, end)
    if daily.is_empty():
        st.caption("marts.mart_fleet_daily has no days in this window.")
        return
    kwh = st.column_config.NumberColumn
    st.dataframe(
        daily,
        hide_index=True,
        placeholder="—",
        column_config={
            "day": st.column_config.DateColumn("day (UTC)", format="YYYY-MM-DD"),
            "gpus": "GPUs",
            "metered_kwh": kwh("metered (kWh)", format="%.2f"),
            "dynamic_kwh": kwh("dynamic (kWh)", format="%.2f"),
            "idle_kwh": kwh("idle (kWh)", format="%.2f"),
            "unattributed_kwh": kwh("unattributed (kWh)", format="%.2f"),
            "pue": kwh("PUE", format="%.2f"),
            "facility_kwh": kwh("facility (kWh)", format="%.2f"),
            "kg_co2e": kwh("emissions (kg CO2e)", format="%.2f"),
            "grid_g_co2e_per_kwh": kwh("grid (g CO2e/kWh)", format="%.0f"),
            "output_tokens": kwh("output tokens", format="localized"),
        },
    )


def _tenant_table(frame: pl.DataFrame) -> None:
    st.dataframe(
        queries.money_text(frame, ["cost_to_serve", "billed", "margin"]),
        hide_index=True,
        placeholder="—",
        column_config={
            "requests": st.column_config.NumberColumn("requests", format="localized"),
            "output_tokens": st.column_config.NumberColumn("output tokens", format="localized"),
            "energy_kwh": st.column_config.NumberColumn("energy (kWh)", format="%.2f"),
            "j_per_output_token": st.column_config.NumberColumn("J/output token", format="%.4f"),
            "gpu_hours": st.column_config.NumberColumn("GPU hours", format="%.1f"),
            "cost_to_serve": "cost to serve",
            "billed": "billed",
            "margin": "margin",
            "margin_share": st.column_config.NumberColumn("margin (%)", format="percent"),
        },
    )


def _top_tenants(con: duckdb.DuckDBPyConnection, start: date | None, end: date | None) -> None:
    st.header("Top tenants")
    by_cost = queries.top_tenants_by_cost(con, start, end)
    if by_cost.is_empty():
        st.info("No tenant usage in the billing periods of this window.")
        return
    by_energy = queries.top_tenants_by_energy(con, start, end)
    money = (
        by_cost.select("tenant", "currency", "cost_to_serve", "billed")
        .unpivot(index=["tenant", "currency"], variable_name="amount", value_name="value")
        .with_columns(
            pl.col("amount").replace_strict({"cost_to_serve": "cost to serve", "billed": "billed"})
        )
    )
    left, right = st.columns(2)
    with left:
        _chart(
            alt.Chart(_pandas(money))
            .mark_bar()
            .encode(
                y=alt.Y("tenant:N", sort=by_cost["tenant"].to_list(), title=None),
                yOffset=alt.YOffset("amount:N", sort=["cost to serve", "billed"]),
                x=alt.X("value:Q", title=f"amount ({', '.join(by_cost['currency'].unique())})"),
                color=alt.Color(
                    "amount:N",
                    title=None,
                    sort=["cost to serve", "billed"],
                    scale=alt.Scale(range=["#4c78a8", "#54a24b"]),
                ),
                tooltip=[
                    "tenant:N",
                    "currency:N",
                    alt.Tooltip("amount:N"),
                    alt.Tooltip("value:Q", format=",.2f"),
                ],
            ),
            "By cost to serve (billed beside it; none until invoiced)",
        )
    with right:
        _chart(
            alt.Chart(_pandas(by_energy))
            .mark_bar(color="#f58518")
            .encode(
                y=alt.Y("tenant:N", sort="-x", title=None),
                x=alt.X("energy_kwh:Q", title="allocated GPU energy (kWh)"),
                tooltip=[
                    "tenant:N",
                    alt.Tooltip("energy_kwh:Q", title="kWh", format=",.2f"),
                    alt.Tooltip("j_per_output_token:Q", title="J/output token", format=".4f"),
                ],
            ),
            "By energy (kWh)",
        )
    st.caption("By cost to serve")
    _tenant_table(by_cost)


def _invoices(con: duckdb.DuckDBPyConnection) -> None:
    st.header("Invoices")
    # Every billing period, whatever the date filter: a month's invoice is issued after it.
    documents = queries.invoices(con)
    if documents.is_empty():
        st.info("No invoices yet: drafts appear once a period is rated.")
        return
    totals = queries.invoices_by_period(con)
    left, right = st.columns([1, 2])
    with left:
        _chart(
            alt.Chart(_pandas(totals))
            .mark_bar()
            .encode(
                x=alt.X("period:O", title="billing period", axis=alt.Axis(labelAngle=0)),
                y=alt.Y("total:Q", title=f"total ({', '.join(totals['currency'].unique())})"),
                xOffset=alt.XOffset("status:N"),
                color=alt.Color(
                    "status:N",
                    title="status",
                    scale=alt.Scale(
                        domain=["draft", "final", "void"], range=["#bab0ac", "#54a24b", "#e45756"]
                    ),
                ),
                tooltip=[
                    "period:O",
                    "status:N",
                    "currency:N",
                    alt.Tooltip("documents:Q", title="documents"),
                    alt.Tooltip("total:Q", format=",.2f"),
                ],
            ),
            "Invoice totals by period and status",
        )
    with right:
        st.dataframe(
            queries.money_text(documents.drop("folder"), ["subtotal", "tax", "total"]).with_columns(
                pl.col("number").fill_null("(draft)"), pl.col("kind").str.replace("_", " ")
            ),
            hide_index=True,
            placeholder="—",
            column_config={
                "issued_on": st.column_config.DateColumn("issued on", format="YYYY-MM-DD"),
            },
        )
    _invoice_downloads(documents)


def _invoice_downloads(documents: pl.DataFrame) -> None:
    """Download buttons for one period × tenant; files are read only when clicked."""
    st.subheader("Download documents")
    periods = documents["period"].unique(maintain_order=True).to_list()
    left, right = st.columns(2)
    period = left.selectbox("Period", periods, key="invoice_period")
    tenants = sorted(documents.filter(pl.col("period") == period)["tenant"].unique().to_list())
    tenant = right.selectbox("Tenant", tenants, key="invoice_tenant")
    chosen = documents.filter((pl.col("period") == period) & (pl.col("tenant") == tenant))
    for doc in chosen.iter_rows(named=True):
        name = doc["number"] or "draft"
        files = queries.invoice_files(doc["folder"])
        label = (
            f"{doc['kind'].replace('_', ' ')} {name} · {doc['status']} · "
            f"{queries.format_money(doc['total'])} {doc['currency']}"
        )
        if not files:
            st.caption(f"{label}: no files in {doc['folder']}")
            continue
        st.markdown(f"**{label}**")
        buttons = st.columns(len(queries.INVOICE_FILES) + 1)
        for column, (file_name, file_path) in zip(buttons, files.items(), strict=False):
            column.download_button(
                file_name,
                data=file_path.read_bytes,
                file_name=f"{doc['period']}-{doc['tenant']}-{name}-{file_name}",
                mime="application/pdf" if file_name.endswith(".pdf") else "text/csv",
                key=f"download-{doc['folder']}-{file_name}",
                on_click="ignore",
                icon=":material/download:",
            )


def _data_quality(
    con: duckdb.DuckDBPyConnection, start: date | None, end: date | None, grain: queries.Grain
) -> None:
    st.header("Data quality")
    frame = queries.data_quality(con, start, end, grain)
    if frame.is_empty():
        st.info("No data-quality rows in this window.")
        return
    axis = _time_axis(grain)
    problems = (
        frame.select("period_start", *PROBLEMS)
        .unpivot(index="period_start", variable_name="problem", value_name="count")
        .with_columns(pl.col("problem").replace_strict(PROBLEMS))
    )
    left, right = st.columns(2)
    with left:
        _chart(
            alt.Chart(_pandas(frame))
            .mark_area(line=True, opacity=0.3)
            .encode(
                x=axis["x"],
                y=alt.Y(
                    "telemetry_coverage:Q",
                    title="telemetry coverage (%)",
                    axis=alt.Axis(format="%"),
                    scale=alt.Scale(domain=[0, 1]),
                ),
                tooltip=[
                    axis["tooltip_time"],
                    alt.Tooltip("telemetry_coverage:Q", title="coverage", format=".2%"),
                    alt.Tooltip("gap_s:Q", title="gaps (GPU-s)", format=",.0f"),
                    alt.Tooltip("estimated_energy_share:Q", title="estimated energy", format=".2%"),
                ],
            ),
            "Telemetry coverage (% of GPU time with samples)",
        )
    with right:
        _chart(
            alt.Chart(_pandas(problems))
            .mark_bar()
            .encode(
                x=axis["x"],
                y=alt.Y("count:Q", title="count", stack="zero"),
                color=alt.Color("problem:N", title="problem"),
                tooltip=[axis["tooltip_time"], "problem:N", "count:Q"],
            ),
            "Problems found (count)",
        )
    st.dataframe(
        frame,
        hide_index=True,
        placeholder="—",
        column_config={
            "period_start": st.column_config.DatetimeColumn(
                "UTC", format="YYYY-MM-DD HH:mm", timezone="UTC"
            ),
            "gpus_reporting": "GPUs reporting",
            "covered_s": st.column_config.NumberColumn("covered (GPU-s)", format="localized"),
            "gap_s": st.column_config.NumberColumn("gaps (GPU-s)", format="localized"),
            "telemetry_coverage": st.column_config.NumberColumn("coverage", format="percent"),
            "estimated_energy_share": st.column_config.NumberColumn(
                "estimated energy", format="percent"
            ),
            "events": st.column_config.NumberColumn("usage events", format="localized"),
            **{column: label for column, label in PROBLEMS.items()},
        },
    )


def render(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """The whole page from one open catalog connection."""
    start, end, models = _window(con)
    st.sidebar.caption(f"catalog: {path}")
    grain = queries.auto_grain(start, end)
    _headline(con, start, end)
    _fleet_efficiency(con, start, end, models, grain)
    _idle_energy(con, start, end, grain)
    _top_tenants(con, start, end)
    _invoices(con)
    _data_quality(con, start, end, grain)


def main() -> None:
    st.set_page_config(page_title="gpuledger", layout="wide")
    st.title("gpuledger — where the joules go")
    try:
        path = catalog_path()
    except GpuledgerError as exc:  # a bad config file: say so on the page
        st.error(f"cannot find the published catalog: {exc}")
        return
    if not path.is_file():
        st.warning(
            f"no published snapshot at {path}: run `make demo` or `gpuledger demo`, "
            f"or point --catalog / ${CATALOG_ENV_VAR} at a published analytics.duckdb"
        )
        return
    try:
        with queries.open_catalog(path) as con:
            render(con, path)
    except duckdb.Error as exc:
        st.error(f"cannot read the published snapshot at {path}: {exc}")


main()
