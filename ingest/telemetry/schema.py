"""What is read from dcgm-exporter and what each hour file holds.

`METRICS` lists the dcgm-exporter metrics pulled, each with its value column, in
column order; `TELEMETRY_SCHEMA` is the Arrow schema of the hour files (one row per
GPU per scrape timestamp: the GPU's identity, one column per metric, then the flags).
"""

from __future__ import annotations

import pyarrow as pa

#: dcgm-exporter metric -> value column, in column order.
METRICS: tuple[tuple[str, str], ...] = (
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "energy_mj"),
    ("DCGM_FI_DEV_POWER_USAGE", "power_w"),
    ("DCGM_FI_DEV_GPU_UTIL", "gpu_util_pct"),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gr_engine_active"),
    ("DCGM_FI_DEV_FB_USED", "fb_used_mib"),
    ("DCGM_FI_DEV_FB_FREE", "fb_free_mib"),
    ("DCGM_FI_DEV_SM_CLOCK", "sm_clock_mhz"),
    ("DCGM_FI_DEV_GPU_TEMP", "gpu_temp_c"),
)
METRIC_COLUMNS: dict[str, str] = dict(METRICS)
METRIC_NAMES = tuple(name for name, _ in METRICS)
METRIC_INDEX = {name: i for i, name in enumerate(METRIC_NAMES)}
ENERGY_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"

TS_TYPE = pa.timestamp("us", tz="UTC")
TELEMETRY_SCHEMA = pa.schema(
    [
        pa.field("hour_start", TS_TYPE, nullable=False),
        pa.field("gpu_key", pa.string(), nullable=False),
        pa.field("hostname", pa.string()),
        pa.field("gpu_uuid", pa.string()),
        pa.field("gpu_index", pa.int32()),
        pa.field("mig_instance_id", pa.int32()),
        pa.field("mig_profile", pa.string()),
        pa.field("model_name", pa.string()),
        pa.field("pci_bus_id", pa.string()),
        pa.field("driver_version", pa.string()),
        pa.field("instance", pa.string()),
        pa.field("job", pa.string()),
        pa.field("ts", TS_TYPE, nullable=False),
        *(pa.field(column, pa.float64()) for _, column in METRICS),
        pa.field("placeholder_metrics", pa.list_(pa.string()), nullable=False),
        pa.field("counter_reset", pa.bool_(), nullable=False),
        pa.field("gap_before_s", pa.float64()),
        pa.field("gap", pa.bool_(), nullable=False),
        pa.field("repeated", pa.bool_(), nullable=False),
    ]
)
