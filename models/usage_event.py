"""Usage event contract v1: one served inference request, as a CloudEvents 1.0 envelope.

The metering gateway (the component in the request path that knows the tenant from the
API key) writes one event per request; the simulator writes the same events. The
published JSON Schema (`models/schemas/usage-event-v1.schema.json`) is generated from
these models; a test fails when the two drift (`gpuledger schema --write` regenerates).

Rules beyond types, each named in validation errors:
- timestamps carry a zone and are normalised to UTC;
- `arrival_time <= first_token_time <= end_time`;
- `cached_prompt_tokens <= prompt_tokens`;
- a request that produced completion tokens has a `first_token_time`;
- `subject` is the tenant id derived from the API key, never from the client payload.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from models.errors import InputError

#: Kafka topic for usage events; the version is part of the name so that a v2 contract
#: gets its own topic and consumers never meet a payload they cannot read.
USAGE_TOPIC_V1 = "gpuledger.usage.v1"
#: CloudEvents `type` of a v1 usage event.
USAGE_EVENT_TYPE_V1 = "io.gpuledger.inference.usage.v1"
#: `$id` of the published JSON Schema, also used as the events' `dataschema`.
USAGE_SCHEMA_ID_V1 = "https://gpuledger.dev/schemas/usage-event-v1.schema.json"
#: Largest token count the contract admits (fits a 32-bit signed column). Anything
#: "absurd" below this is a policy question for the consumer, not the contract.
MAX_TOKENS = 2**31 - 1

RequestStatus = Literal["ok", "error", "cancelled"]


#: Timestamps on the wire: RFC 3339 with a zone, at most microseconds, years 1900-2199.
#: Stricter than pydantic's own parser on purpose, so that the vectorised validator of
#: the consumer (`ingest/usage_validation.py`) can apply exactly the same rule.
RFC3339_PATTERN = (
    r"^(19|20|21)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
_RFC3339 = re.compile(RFC3339_PATTERN)


def _rfc3339_string(value: Any) -> Any:
    if isinstance(value, datetime):
        return value  # built in code, not parsed from the wire
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError(
            "rule rfc3339: expected an RFC 3339 timestamp string with a zone, "
            "e.g. 2026-11-23T10:00:00.120Z"
        )
    return value


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339_string),
    AfterValidator(_to_utc),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN}),
]
TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)]
GpuUuid = Annotated[
    str,
    Field(
        pattern=r"^(GPU|MIG)-[0-9A-Za-z-]+(/[0-9]+)*$",
        description="GPU UUID as dcgm-exporter labels it (GPU-…); a MIG instance as MIG-…",
    ),
]


class UsageData(BaseModel):
    """What the request consumed and where it ran."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(min_length=1, max_length=256, description="Served model name")
    model_version: str = Field(min_length=1, max_length=64, description="Model version")
    prompt_tokens: TokenCount = Field(description="Prompt (input) tokens, cached included")
    completion_tokens: TokenCount = Field(description="Completion (output) tokens produced")
    cached_prompt_tokens: TokenCount = Field(
        default=0, description="Prompt tokens served from the prefix cache (no prefill work)"
    )
    arrival_time: UtcDatetime = Field(description="When the request reached the server")
    first_token_time: UtcDatetime | None = Field(
        description="When the first completion token was produced; null if none was"
    )
    end_time: UtcDatetime = Field(description="When the last response was sent")
    hostname: str = Field(min_length=1, max_length=253, description="Serving host")
    gpu_uuids: list[GpuUuid] = Field(
        min_length=1,
        max_length=64,
        description="GPUs that served the request; a tensor-parallel group lists each",
    )
    status: RequestStatus = Field(description="ok, error or cancelled")

    @model_validator(mode="after")
    def _check_consistency(self) -> UsageData:
        if self.cached_prompt_tokens > self.prompt_tokens:
            raise ValueError(
                "rule cached_le_prompt: cached_prompt_tokens "
                f"({self.cached_prompt_tokens}) exceeds prompt_tokens ({self.prompt_tokens})"
            )
        if self.end_time < self.arrival_time:
            raise ValueError("rule time_order: end_time is before arrival_time")
        if self.first_token_time is not None and not (
            self.arrival_time <= self.first_token_time <= self.end_time
        ):
            raise ValueError(
                "rule time_order: first_token_time must lie between arrival_time and end_time"
            )
        if self.completion_tokens > 0 and self.first_token_time is None:
            raise ValueError(
                "rule first_token_required: completion_tokens > 0 needs a first_token_time"
            )
        if len(set(self.gpu_uuids)) != len(self.gpu_uuids):
            raise ValueError("rule unique_gpus: gpu_uuids lists a GPU twice")
        return self


class UsageEvent(BaseModel):
    """CloudEvents 1.0 structured-mode envelope around `UsageData`."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="gpuledger usage event v1",
        json_schema_extra={"$id": USAGE_SCHEMA_ID_V1},
    )

    specversion: Literal["1.0"] = Field(description="CloudEvents spec version")
    id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="Request id; the deduplication key",
    )
    source: str = Field(min_length=1, max_length=512, description="Serving endpoint (URI)")
    type: Literal["io.gpuledger.inference.usage.v1"] = Field(description="Event type")
    time: UtcDatetime = Field(description="When the usage occurred (request end), UTC")
    subject: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Tenant id, derived from the API key by the gateway",
    )
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = Field(default=None, description="URI of this schema")
    data: UsageData

    def to_json_bytes(self) -> bytes:
        """Serialise as the wire format (UTF-8 JSON, timestamps as RFC 3339 in UTC)."""
        return self.model_dump_json(exclude_none=False).encode()


class InvalidUsageEvent(InputError):
    """A payload that is not a valid v1 usage event; names the field and the rule."""

    def __init__(self, field: str, rule: str, detail: str, *, more: int = 0) -> None:
        extra = f" (and {more} more problem{'s' if more != 1 else ''})" if more else ""
        super().__init__(f"usage event: {field}: {detail} [rule: {rule}]{extra}")
        self.field = field
        self.rule = rule
        self.detail = detail


def _describe(error: Any) -> tuple[str, str, str]:
    loc = ".".join(str(part) for part in error.get("loc", ())) or "(event)"
    message = str(error.get("msg", "invalid"))
    rule = str(error.get("type", "invalid"))
    if rule == "value_error" and "rule " in message:
        # Our model validators carry their own rule name: "Value error, rule x: detail".
        _, _, tail = message.partition("rule ")
        rule, _, message = tail.partition(": ")
    return loc, rule, message


def parse_usage_event(payload: bytes | str) -> UsageEvent:
    """Decode and validate one wire payload, or raise `InvalidUsageEvent`."""
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidUsageEvent("(payload)", "json", f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidUsageEvent("(payload)", "object", "expected a JSON object")
    try:
        return UsageEvent.model_validate(document)
    except ValidationError as exc:
        errors = exc.errors()
        field, rule, detail = _describe(errors[0])
        raise InvalidUsageEvent(field, rule, detail, more=len(errors) - 1) from None


def usage_event_json_schema() -> dict[str, Any]:
    """The JSON Schema published in the repository, generated from `UsageEvent`."""
    schema = UsageEvent.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
