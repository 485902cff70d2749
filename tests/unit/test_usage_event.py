"""The usage event contract v1: validation rules, error messages, published schema."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.usage_event import (
    USAGE_EVENT_TYPE_V1,
    USAGE_TOPIC_V1,
    InvalidUsageEvent,
    UsageEvent,
    parse_usage_event,
)
from pipelines.cli.schema import SCHEMA_PATH, render_schema


def event_document(**data_overrides: Any) -> dict[str, Any]:
    data = {
        "model": "llama-3.1-8b",
        "model_version": "1",
        "prompt_tokens": 812,
        "completion_tokens": 230,
        "cached_prompt_tokens": 512,
        "arrival_time": "2026-11-23T10:00:00.000000Z",
        "first_token_time": "2026-11-23T10:00:00.120000Z",
        "end_time": "2026-11-23T10:00:02.500000Z",
        "hostname": "gpu-h100-01",
        "gpu_uuids": ["GPU-756a17a7-89ce-1993-b594-b03439df0cce"],
        "status": "ok",
    }
    data.update(data_overrides)
    return {
        "specversion": "1.0",
        "id": "686e8e39-f23f-44b6-a02f-edc90fb67e56",
        "source": "triton://gpu-h100-01:8001/v2/models/llama-3.1-8b",
        "type": USAGE_EVENT_TYPE_V1,
        "time": "2026-11-23T10:00:02.500000Z",
        "subject": "acme",
        "datacontenttype": "application/json",
        "data": data,
    }


def reject(document: dict[str, Any] | str) -> InvalidUsageEvent:
    payload = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(InvalidUsageEvent) as caught:
        parse_usage_event(payload)
    return caught.value


def test_topic_name_carries_the_version() -> None:
    assert USAGE_TOPIC_V1.endswith(".v1")
    assert USAGE_EVENT_TYPE_V1.endswith(".v1")
    assert UsageEvent.model_fields["type"].annotation.__args__ == (USAGE_EVENT_TYPE_V1,)  # type: ignore[union-attr]


def test_a_valid_event_parses_and_times_become_utc() -> None:
    document = event_document(arrival_time="2026-11-23T11:00:00+01:00")
    event = parse_usage_event(json.dumps(document))
    assert event.data.arrival_time == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert event.data.arrival_time.utcoffset() == timedelta(0)
    assert event.subject == "acme"


@pytest.mark.parametrize(
    ("overrides", "field", "rule"),
    [
        ({"cached_prompt_tokens": 900}, "data", "cached_le_prompt"),
        ({"end_time": "2026-11-23T09:59:59Z"}, "data", "time_order"),
        ({"first_token_time": "2026-11-23T10:00:03Z"}, "data", "time_order"),
        ({"first_token_time": None}, "data", "first_token_required"),
        (
            {"gpu_uuids": ["GPU-756a17a7-89ce-1993-b594-b03439df0cce"] * 2},
            "data",
            "unique_gpus",
        ),
        ({"prompt_tokens": -1}, "data.prompt_tokens", "greater_than_equal"),
        ({"completion_tokens": 2**31}, "data.completion_tokens", "less_than_equal"),
        ({"completion_tokens": 1.5}, "data.completion_tokens", "int_type"),
        ({"completion_tokens": "12"}, "data.completion_tokens", "int_type"),
        ({"arrival_time": "2026-11-23T10:00:00"}, "data.arrival_time", "rfc3339"),
        ({"arrival_time": 1795392000}, "data.arrival_time", "rfc3339"),
        ({"arrival_time": "2026-11-23t10:00:00z"}, "data.arrival_time", "rfc3339"),
        ({"arrival_time": "2026-11-23T10:00:00.1234567Z"}, "data.arrival_time", "rfc3339"),
        (
            {"arrival_time": "2026-02-30T10:00:00Z"},
            "data.arrival_time",
            "datetime_from_date_parsing",
        ),
        ({"status": "done"}, "data.status", "literal_error"),
        ({"gpu_uuids": []}, "data.gpu_uuids", "too_short"),
        ({"gpu_uuids": ["nvidia0"]}, "data.gpu_uuids.0", "string_pattern_mismatch"),
        ({"model": ""}, "data.model", "string_too_short"),
        ({"tenant": "someone-else"}, "data.tenant", "extra_forbidden"),
    ],
)
def test_each_rule_is_named_with_its_field(
    overrides: dict[str, Any], field: str, rule: str
) -> None:
    error = reject(event_document(**overrides))
    assert (error.field, error.rule) == (field, rule)
    assert field in error.message and rule in error.message
    assert "\n" not in error.message


@pytest.mark.parametrize(
    ("envelope", "field", "rule"),
    [
        ({"specversion": "0.3"}, "specversion", "literal_error"),
        ({"type": "com.example.other"}, "type", "literal_error"),
        ({"subject": "acme corp"}, "subject", "string_pattern_mismatch"),
        ({"id": ""}, "id", "string_too_short"),
        ({"time": "yesterday"}, "time", "rfc3339"),
    ],
)
def test_envelope_rules(envelope: dict[str, Any], field: str, rule: str) -> None:
    document = event_document()
    document.update(envelope)
    error = reject(document)
    assert (error.field, error.rule) == (field, rule)


def test_missing_field_and_count_of_further_problems() -> None:
    document = event_document()
    del document["data"]["hostname"]
    document["data"]["prompt_tokens"] = -5
    error = reject(document)
    assert error.rule in {"missing", "greater_than_equal"}
    assert "(and 1 more problem)" in error.message


@pytest.mark.parametrize(
    ("payload", "rule"),
    [("{not json", "json"), ("[1, 2]", "object"), (b"\xff\xfe", "json")],
)
def test_payloads_that_are_not_json_objects(payload: str | bytes, rule: str) -> None:
    with pytest.raises(InvalidUsageEvent) as caught:
        parse_usage_event(payload)
    assert caught.value.field == "(payload)"
    assert caught.value.rule == rule


# hypothesis takes naive bounds and attaches the zones itself.
timestamps = st.datetimes(
    min_value=datetime(2020, 1, 1),  # noqa: DTZ001
    max_value=datetime(2035, 1, 1),  # noqa: DTZ001
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    ),
)


@given(
    arrival=timestamps,
    ttft_us=st.integers(0, 10_000_000),
    decode_us=st.integers(0, 600_000_000),
    prompt=st.integers(1, 200_000),
    cached_share=st.floats(0, 1),
    completion=st.integers(1, 32_000),
    gpus=st.integers(1, 8),
)
def test_round_trip_through_the_wire_format(
    arrival: datetime,
    ttft_us: int,
    decode_us: int,
    prompt: int,
    cached_share: float,
    completion: int,
    gpus: int,
) -> None:
    first = arrival + timedelta(microseconds=ttft_us)
    end = first + timedelta(microseconds=decode_us)
    document = event_document(
        prompt_tokens=prompt,
        cached_prompt_tokens=int(prompt * cached_share),
        completion_tokens=completion,
        arrival_time=arrival.isoformat(),
        first_token_time=first.isoformat(),
        end_time=end.isoformat(),
        gpu_uuids=[f"GPU-{i:08x}-0000-0000-0000-000000000000" for i in range(gpus)],
    )
    event = parse_usage_event(json.dumps(document))
    again = parse_usage_event(event.to_json_bytes())
    assert again == event
    assert again.data.arrival_time == arrival
    assert again.data.end_time - again.data.arrival_time == end - arrival


def test_published_schema_matches_the_contract() -> None:
    """Guards against editing the pydantic model without `gpuledger schema --write`."""
    assert SCHEMA_PATH.read_text() == render_schema()


def test_published_schema_is_valid_json_schema_and_accepts_an_event() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(event_document())
    bad = event_document(prompt_tokens=-1)
    assert not validator.is_valid(bad)
