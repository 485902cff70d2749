"""Usage events (contract v1) for simulated requests, serialised without a Python loop.

The JSON is built by Polars from columns, in the field order of `models.usage_event`;
tests check that every payload validates against the contract. Each event's `source`
is the Triton endpoint that served it; `time` is the request's end.
"""

from __future__ import annotations

import polars as pl

from models.usage_event import USAGE_EVENT_TYPE_V1, USAGE_SCHEMA_ID_V1

_TS_FORMAT = "%Y-%m-%dT%H:%M:%S%.6fZ"
TRITON_GRPC_PORT = 8001


def _rfc3339(column: str) -> pl.Expr:
    return pl.col(column).dt.convert_time_zone("UTC").dt.strftime(_TS_FORMAT)


def usage_event_frame(requests: pl.DataFrame, model_versions: dict[str, str]) -> pl.DataFrame:
    """Columns `key` (event id), `value` (the JSON payload, bytes) and `tenant`."""
    versions = pl.DataFrame(
        {"model": list(model_versions), "model_version": list(model_versions.values())}
    )
    frame = requests.join(versions, on="model", how="left", maintain_order="left").with_columns(
        time_text=_rfc3339("end_ts"),
        arrival_text=_rfc3339("arrival_ts"),
        first_token_text=_rfc3339("first_token_ts"),
        source=pl.format(
            "triton://{}:{}/v2/models/{}", "hostname", pl.lit(TRITON_GRPC_PORT), "model"
        ),
    )
    payload = pl.struct(
        specversion=pl.lit("1.0"),
        id=pl.col("request_id"),
        source=pl.col("source"),
        type=pl.lit(USAGE_EVENT_TYPE_V1),
        time=pl.col("time_text"),
        subject=pl.col("tenant"),
        datacontenttype=pl.lit("application/json"),
        dataschema=pl.lit(USAGE_SCHEMA_ID_V1),
        data=pl.struct(
            model=pl.col("model"),
            model_version=pl.col("model_version"),
            prompt_tokens=pl.col("prompt_tokens"),
            completion_tokens=pl.col("completion_tokens"),
            cached_prompt_tokens=pl.col("cached_tokens"),
            arrival_time=pl.col("arrival_text"),
            first_token_time=pl.col("first_token_text"),
            end_time=pl.col("time_text"),
            hostname=pl.col("hostname"),
            gpu_uuids=pl.col("gpu_uuids"),
            status=pl.col("status"),
        ),
    )
    return frame.select(
        key=pl.col("request_id").cast(pl.Binary),
        value=payload.struct.json_encode().cast(pl.Binary),
        tenant=pl.col("tenant"),
        end_ts=pl.col("end_ts"),
    )
