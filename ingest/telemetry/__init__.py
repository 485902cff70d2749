"""Reading DCGM telemetry from Prometheus into the lake, sample for sample as scraped.

`pull_telemetry(settings, start, end)` writes one Parquet file per UTC hour under
`telemetry/samples/hour=<YYYY-MM-DDTHH>/samples.parquet` (+ `_manifest.json`): one row
per GPU per scrape timestamp, one column per dcgm-exporter metric, with counter
resets, gaps, repeated collections and DCGM placeholders marked (never dropped
silently).

The modules, in the order a pull goes through them:
- `pull`: `pull_telemetry`, hours fetched ahead of the one being written;
- `hour_fetch`: one hour's queries: GPU discovery, batches, windows, the lookback;
- `promql`: the text of those queries;
- `prometheus_http`: the HTTP client: auth, retries with backoff, error messages;
- `parsing`: range-vector and vector answers -> labels and flat arrays;
- `labels`: a series' labels -> the identity of its GPU;
- `placeholders`: DCGM's blank values;
- `hour_table`: the wide table of one hour and its flags (resets, gaps, repeats);
- `hour_files`: the hour's Parquet file and manifest, replaced atomically;
- `reports`: what a pull reports, per hour and overall;
- `schema`: the metrics read and the hour files' columns;
- `coverage`: scrapes per GPU and hour against the scrape interval.
"""

from ingest.telemetry.coverage import telemetry_coverage
from ingest.telemetry.hour_fetch import LOOKBACK_S
from ingest.telemetry.hour_table import GAP_LIMIT_FACTOR, MAX_LOOKBACK_S, wide_hour_table
from ingest.telemetry.labels import normalize_labels
from ingest.telemetry.placeholders import (
    DCGM_FP64_BLANKS,
    DCGM_INT32_BLANKS,
    DCGM_INT64_BLANKS,
    placeholder_mask,
)
from ingest.telemetry.pull import pull_telemetry
from ingest.telemetry.reports import HourReport, TelemetryPullReport
from ingest.telemetry.schema import ENERGY_METRIC, METRIC_COLUMNS, METRICS, TELEMETRY_SCHEMA

__all__ = [
    "DCGM_FP64_BLANKS",
    "DCGM_INT32_BLANKS",
    "DCGM_INT64_BLANKS",
    "ENERGY_METRIC",
    "GAP_LIMIT_FACTOR",
    "LOOKBACK_S",
    "MAX_LOOKBACK_S",
    "METRICS",
    "METRIC_COLUMNS",
    "TELEMETRY_SCHEMA",
    "HourReport",
    "TelemetryPullReport",
    "normalize_labels",
    "placeholder_mask",
    "pull_telemetry",
    "telemetry_coverage",
    "wide_hour_table",
]
