"""The pure domain of gpuledger: event contracts and domain errors.

Nothing here performs I/O or imports Dagster, Kafka or DuckDB connections; it takes
and returns plain values, dataclasses and Polars frames.
"""

from models.errors import GpuledgerError, InputError, ServiceError
from models.usage_event import (
    USAGE_EVENT_TYPE_V1,
    USAGE_TOPIC_V1,
    InvalidUsageEvent,
    UsageData,
    UsageEvent,
    parse_usage_event,
)

__all__ = [
    "USAGE_EVENT_TYPE_V1",
    "USAGE_TOPIC_V1",
    "GpuledgerError",
    "InputError",
    "InvalidUsageEvent",
    "ServiceError",
    "UsageData",
    "UsageEvent",
    "parse_usage_event",
]
