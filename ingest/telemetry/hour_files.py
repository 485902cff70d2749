"""Writing one hour: its Parquet file and `_manifest.json`, each replaced atomically.

An hour is fully fetched before its file is replaced, so a failure leaves the previous
file untouched. An hour without samples gets an empty file (full schema), so
downstream knows it was pulled.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ingest.lake import Lake, remove_stale_tmp, write_json_atomic, write_parquet_atomic
from ingest.settings import Settings
from ingest.telemetry.hour_fetch import MAX_QUERY_WINDOW_S, HourData
from ingest.telemetry.hour_table import GAP_LIMIT_FACTOR
from ingest.telemetry.prometheus_http import PrometheusClient
from ingest.telemetry.reports import HourReport
from ingest.telemetry.schema import METRICS

_DATASET_FILE = "samples.parquet"
_MANIFEST_FILE = "_manifest.json"
_SCHEMA_VERSION = 1


def write_hour(
    lake: Lake, data: HourData, prom: PrometheusClient, settings: Settings
) -> HourReport:
    directory = lake.telemetry_hour_dir(data.hour_start)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(directory)
    path = directory / _DATASET_FILE
    built = data.built
    write_parquet_atomic(built.table, path)
    pulled_at = datetime.now(UTC)
    hour_end = data.hour_start + timedelta(hours=1)
    complete = pulled_at >= hour_end + timedelta(seconds=settings.telemetry.scrape_interval_s)
    warnings = list(data.warnings)
    if not complete:
        warnings.append(
            f"hour {data.hour_start.isoformat()} had not ended when pulled: pull it again later"
        )
    report = HourReport(
        hour_start=data.hour_start,
        path=path,
        gpus=len(built.gpu_keys),
        rows=built.table.num_rows,
        samples=built.samples,
        placeholder_samples=built.placeholder_samples,
        counter_resets=built.counter_resets,
        gaps=built.gaps,
        repeated=built.repeated,
        max_gap_s=built.max_gap_s,
        queries=data.queries,
        fetch_s=data.fetch_s,
        complete=complete,
        warnings=tuple(warnings),
    )
    manifest = {
        "dataset": "telemetry/samples",
        "schema_version": _SCHEMA_VERSION,
        "window": {"start": data.hour_start.isoformat(), "end": hour_end.isoformat()},
        "lookback_s": data.lookback_s,
        "pulled_at": pulled_at.isoformat(),
        "complete": complete,
        "prometheus": {"url": prom.display_url, "job": settings.telemetry.job},
        "query_window_s": min(settings.telemetry.query_window_s, MAX_QUERY_WINDOW_S),
        "series_per_query": settings.telemetry.series_per_query,
        "scrape_interval_s": settings.telemetry.scrape_interval_s,
        "gap_limit_s": GAP_LIMIT_FACTOR * settings.telemetry.scrape_interval_s,
        "metrics": dict(METRICS),
        "counts": {
            "gpus": report.gpus,
            "rows": report.rows,
            "samples": report.samples,
            "placeholder_samples": report.placeholder_samples,
            "counter_resets": report.counter_resets,
            "gaps": report.gaps,
            "repeated": report.repeated,
            "queries": report.queries,
        },
        "max_gap_s": report.max_gap_s,
        "fetch_s": round(report.fetch_s, 3),
        "warnings": warnings,
    }
    write_json_atomic(manifest, directory / _MANIFEST_FILE)
    return report
