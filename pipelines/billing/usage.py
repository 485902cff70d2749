"""Reading the billing record from the warehouse: hourly usage rows and request lineage.

`period_rows` reads `marts.fct_tenant_usage_hourly` for a billing period, per tenant, as
`models.billing_usage.UsageRow` (GPU-seconds and joules converted to GPU-hours and kWh
once, here). `watermarks` records, per tenant, event hour and Kafka partition, the
highest offset among the requests the mart holds: with it a finalized invoice knows
exactly which request ids it billed (offsets in a partition only grow, and an hour's
late event lands after everything that was in the hour when it was built), without
storing millions of ids. `requests_for` lists the request ids behind rows, between two
watermarks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, time

import duckdb
import polars as pl

from ingest.catalog import connect
from ingest.settings import Settings
from models.billing_usage import (
    RowKey,
    UsageRow,
    gpu_hours_from_seconds,
    kwh_from_joules,
)
from models.errors import InputError
from models.invoice import period_bounds

__all__ = [
    "WATERMARK_SCHEMA",
    "Watermarks",
    "period_rows",
    "period_window",
    "requests_for",
    "watermarks",
]

#: (event hour, model, GPU type, Kafka partition) -> highest offset billed.
Watermarks = dict[tuple[datetime, str, str, int], int]
WATERMARK_SCHEMA = {
    "event_hour": pl.Datetime("us", "UTC"),
    "model": pl.String,
    "gpu_type": pl.String,
    "partition": pl.Int32,
    "max_offset": pl.Int64,
}


def period_window(period: str) -> tuple[datetime, datetime]:
    try:
        start, end = period_bounds(period)
    except ValueError:
        raise InputError(f"billing period {period!r}: expected YYYY-MM, e.g. 2026-03") from None
    return datetime.combine(start, time(), UTC), datetime.combine(end, time(), UTC)


def _has_marts(con: duckdb.DuckDBPyConnection) -> bool:
    found = con.execute(
        "select count(*) from duckdb_tables() where schema_name = 'marts' "
        "and table_name = 'fct_tenant_usage_hourly'"
    ).fetchall()
    return bool(found and found[0][0])


def period_rows(
    settings: Settings, period: str, *, tenants: Iterable[str] | None = None
) -> tuple[dict[str, list[UsageRow]], set[str]]:
    """Per tenant, its usage rows of `period`; and the idle policies the rows were
    allocated under (one, unless the policy changed mid-period)."""
    start, end = period_window(period)
    with connect(settings) as con:
        if not _has_marts(con):
            return {}, set()
        frame = con.sql(
            """
            select tenant, event_hour, coalesce(model, '') as model, gpu_type, idle_policy,
                   requests, prompt_tokens, cached_prompt_tokens, completion_tokens,
                   occupied_gpu_s, energy_j
            from marts.fct_tenant_usage_hourly
            where event_hour >= $start and event_hour < $end
            order by tenant, event_hour, model, gpu_type
            """,
            params={"start": start, "end": end},
        ).pl()
    wanted = set(tenants) if tenants is not None else None
    rows: dict[str, list[UsageRow]] = defaultdict(list)
    for record in frame.iter_rows(named=True):
        if wanted is not None and record["tenant"] not in wanted:
            continue
        rows[record["tenant"]].append(
            UsageRow(
                event_hour=record["event_hour"].astimezone(UTC),
                model=record["model"],
                gpu_type=record["gpu_type"],
                requests=int(record["requests"]),
                prompt_tokens=int(record["prompt_tokens"]),
                cached_tokens=int(record["cached_prompt_tokens"]),
                completion_tokens=int(record["completion_tokens"]),
                gpu_hours=gpu_hours_from_seconds(record["occupied_gpu_s"]),
                energy_kwh=kwh_from_joules(record["energy_j"]),
            )
        )
    return dict(rows), set(frame["idle_policy"].unique().to_list()) if frame.height else set()


def watermarks(settings: Settings, period: str, tenant: str) -> pl.DataFrame:
    """Per event hour, model, GPU type and Kafka partition: the highest offset of the
    tenant's requests the marts hold for `period` (see the module doc)."""
    start, end = period_window(period)
    with connect(settings) as con:
        if not _has_marts(con):
            return pl.DataFrame(schema=WATERMARK_SCHEMA)
        frame = con.sql(
            """
            select a.event_hour, coalesce(a.model, '') as model, a.gpu_type,
                   e.partition, max(e."offset") as max_offset
            from marts.fct_request_allocation a
            join raw.usage_events e
              on e.event_id = a.request_id and e.hour_start = a.event_hour and e.topic = $topic
            where a.tenant = $tenant and a.event_hour >= $start and a.event_hour < $end
            group by all
            order by all
            """,
            params={"tenant": tenant, "start": start, "end": end, "topic": settings.kafka.topic},
        ).pl()
    return frame.cast(WATERMARK_SCHEMA)  # type: ignore[arg-type]


def as_watermarks(frame: pl.DataFrame) -> Watermarks:
    return {
        (r["event_hour"].astimezone(UTC), r["model"], r["gpu_type"], r["partition"]): r[
            "max_offset"
        ]
        for r in frame.iter_rows(named=True)
    }


def requests_for(
    settings: Settings,
    tenant: str,
    keys: Iterable[RowKey],
    *,
    above: Mapping[tuple[datetime, str, str, int], int] | None = None,
    up_to: Mapping[tuple[datetime, str, str, int], int] | None = None,
) -> pl.DataFrame:
    """The requests of `tenant` behind rows `keys`: id, tokens, energy, Kafka position.

    `up_to` keeps requests at or below the watermark of their row and partition (what an
    invoice billed); `above` keeps those past it (late usage an adjustment billed).
    """
    wanted = sorted(set(keys))
    if not wanted:
        return pl.DataFrame()
    key_frame = pl.DataFrame(
        {
            "event_hour": [k[0] for k in wanted],
            "model": [k[1] for k in wanted],
            "gpu_type": [k[2] for k in wanted],
        },
        schema={"event_hour": pl.Datetime("us", "UTC"), "model": pl.String, "gpu_type": pl.String},
    )
    with connect(settings) as con:
        con.register("wanted_rows", key_frame)
        frame = con.sql(
            """
            select a.request_id, a.event_hour, coalesce(a.model, '') as model, a.gpu_type,
                   a.end_ts, a.prompt_tokens, a.cached_prompt_tokens, a.completion_tokens,
                   a.energy_j, a.occupied_gpu_s, e.partition, e."offset"
            from marts.fct_request_allocation a
            join wanted_rows w
              on w.event_hour = a.event_hour and w.model = coalesce(a.model, '')
             and w.gpu_type = a.gpu_type
            join raw.usage_events e
              on e.event_id = a.request_id and e.hour_start = a.event_hour and e.topic = $topic
            where a.tenant = $tenant
            order by a.event_hour, a.model, a.gpu_type, e.partition, e."offset"
            """,
            params={"tenant": tenant, "topic": settings.kafka.topic},
        ).pl()
    join_on = ["event_hour", "model", "gpu_type", "partition"]
    frame = frame.cast({c: WATERMARK_SCHEMA[c] for c in join_on})  # type: ignore[dict-item]
    for name, marks, keep in (("up_to", up_to, "le"), ("above", above, "gt")):
        if marks is None:
            continue
        # A row and partition with no watermark: nothing was billed there (-1).
        mark_frame = pl.DataFrame(
            [(*key, offset) for key, offset in marks.items()],
            schema={**{c: WATERMARK_SCHEMA[c] for c in join_on}, name: pl.Int64},
            orient="row",
        )
        frame = frame.join(mark_frame, on=join_on, how="left").with_columns(
            pl.col(name).fill_null(-1)
        )
        offset = pl.col("offset")
        frame = frame.filter(offset <= pl.col(name) if keep == "le" else offset > pl.col(name))
        frame = frame.drop(name)
    return frame
