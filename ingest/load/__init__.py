"""Load generation: replaying a request trace against the metering gateway."""

from ingest.load.generator import (
    BUNDLED_TRACE,
    LoadReport,
    PlannedRequest,
    RequestResult,
    plan_from_trace,
    prompt_of,
    run_load,
    run_load_async,
)

__all__ = [
    "BUNDLED_TRACE",
    "LoadReport",
    "PlannedRequest",
    "RequestResult",
    "plan_from_trace",
    "prompt_of",
    "run_load",
    "run_load_async",
]
