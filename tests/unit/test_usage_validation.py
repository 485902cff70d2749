"""The consumer's vectorised validator agrees with the pydantic contract, and names
every quarantine reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.usage_validation import BATCH_SCHEMA, BatchValidator, Policy
from models.errors import InputError
from models.usage_event import USAGE_EVENT_TYPE_V1, parse_usage_event

CONTRACT_REASONS = {"invalid_json", "schema_violation", "negative_tokens", "end_before_arrival"}
INGESTED_AT = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LENIENT = Policy(
    max_prompt_tokens=2**40, max_completion_tokens=2**40, max_future_s=3e9, known_tenants=None
)


def batch_of(payloads: list[bytes]) -> pa.Table:
    n = len(payloads)
    return pa.table(
        {
            "topic": ["t"] * n,
            "partition": pa.array([0] * n, pa.int32()),
            "offset": pa.array(range(n), pa.int64()),
            "kafka_ts": pa.array([INGESTED_AT] * n, pa.timestamp("us", tz="UTC")),
            "key": pa.array([None] * n, pa.binary()),
            "payload": pa.array(payloads, pa.binary()),
        },
        schema=BATCH_SCHEMA,
    )


@pytest.fixture(scope="module")
def validator() -> BatchValidator:
    return BatchValidator(LENIENT)


def event(**data: Any) -> dict[str, Any]:
    body = {
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
    body.update(data)
    return {
        "specversion": "1.0",
        "id": "686e8e39-f23f-44b6-a02f-edc90fb67e56",
        "source": "triton://gpu-h100-01:8001/v2/models/llama-3.1-8b",
        "type": USAGE_EVENT_TYPE_V1,
        "time": "2026-11-23T10:00:02.500000Z",
        "subject": "acme",
        "datacontenttype": "application/json",
        "dataschema": "https://gpuledger.dev/schemas/usage-event-v1.schema.json",
        "data": body,
    }


def compact(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def pydantic_ok(payload: bytes) -> bool:
    try:
        parse_usage_event(payload)
    except InputError:
        return False
    return True


# -- strategies: valid events, then mutations of every kind --------------------------

texts = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
)
json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
    st.lists(st.integers(0, 3), max_size=2),
    st.just({"a": 1}),
)
timestamps = st.one_of(
    st.datetimes(
        min_value=datetime(1900, 1, 1),  # noqa: DTZ001 - hypothesis wants naive bounds
        max_value=datetime(2199, 12, 31),  # noqa: DTZ001
        timezones=st.sampled_from([UTC, timedelta(hours=5, minutes=30), -timedelta(hours=8)]).map(
            lambda z: z if z is UTC else __import__("datetime").timezone(z)
        ),
    ).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.sampled_from(
        [
            "2026-11-23T10:00:00Z",
            "2026-11-23T10:00:00",
            "2026-11-23 10:00:00Z",
            "2026-02-30T10:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T10:00:00.1234567Z",
            "2026-11-23T10:00:00z",
            "2026-11-23T10:00:00+25:00",
            "0999-11-23T10:00:00Z",
            "",
        ]
    ),
)
uuids = st.one_of(
    st.sampled_from(["GPU-abc", "MIG-1-2/3", "GPU-a b", "gpu-abc", "GPU-", "MIG-x/y", "GPU-é"]),
    texts,
)


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    arrival = draw(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)))  # noqa: DTZ001
    ttft = draw(st.integers(0, 10**7))
    decode = draw(st.integers(0, 10**9))
    prompt = draw(st.integers(0, 2**31 - 1))
    completion = draw(st.integers(0, 2**31 - 1))
    first = arrival + timedelta(microseconds=ttft)
    end = first + timedelta(microseconds=decode)
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    document = event(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_prompt_tokens=draw(st.integers(0, prompt)),
        arrival_time=arrival.strftime(fmt),
        first_token_time=first.strftime(fmt) if completion or draw(st.booleans()) else None,
        end_time=end.strftime(fmt),
        gpu_uuids=[f"GPU-{i:04x}" for i in range(draw(st.integers(1, 8)))],
        status=draw(st.sampled_from(["ok", "error", "cancelled"])),
        model=draw(st.text(min_size=1, max_size=20)),
        hostname=draw(st.text(alphabet="abc-.0123", min_size=1, max_size=20)),
    )
    document["id"] = draw(
        st.text(
            alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
        )
    )
    document["subject"] = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True))
    document["time"] = document["data"]["end_time"]
    return document


tokens = st.one_of(
    st.integers(-(2**33), 2**33),
    st.sampled_from([0, 2**31 - 1, 2**31, -1, 5.0, "5", True, None]),
)
#: For each field, values near and across the contract's edges.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "specversion": st.sampled_from(["1.0", "1", "0.3", 1.0, None]),
    "id": st.one_of(texts, st.sampled_from(["", "a b", "x" * 128, "x" * 129, "ü", "\t"])),
    "source": st.one_of(texts, st.sampled_from(["", "s" * 512, "s" * 513])),
    "type": st.sampled_from([USAGE_EVENT_TYPE_V1, "io.gpuledger.inference.usage.v2", "", None]),
    "time": timestamps,
    "subject": st.one_of(
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True),
        st.sampled_from(["", "-acme", "acme corp", "ACME", 7]),
    ),
    "datacontenttype": st.sampled_from(["application/json", "text/plain", None, 1]),
    "dataschema": st.sampled_from([None, "x", "", 5, ["x"]]),
    "model": st.one_of(texts, st.sampled_from(["", "m" * 256, "m" * 257, 5])),
    "model_version": st.one_of(texts, st.sampled_from(["", "v" * 64, "v" * 65])),
    "prompt_tokens": tokens,
    "completion_tokens": tokens,
    "cached_prompt_tokens": tokens,
    "arrival_time": timestamps,
    "first_token_time": st.one_of(st.none(), timestamps),
    "end_time": timestamps,
    "hostname": st.one_of(texts, st.sampled_from(["", "h" * 253, "h" * 254, 3])),
    "gpu_uuids": st.one_of(
        st.lists(uuids, min_size=0, max_size=3),
        st.sampled_from([[], ["GPU-a", "GPU-a"], ["GPU-a"] * 65, "GPU-a", [1], [None]]),
        st.lists(
            st.from_regex(r"(GPU|MIG)-[0-9a-f]{1,4}", fullmatch=True), min_size=60, max_size=66
        ),
    ),
    "status": st.sampled_from(["ok", "error", "cancelled", "done", "OK", "", None, 1]),
}
ENVELOPE_FIELDS = ("specversion", "id", "source", "type", "time", "subject", "datacontenttype",
                   "dataschema")  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid event with 0-3 fields changed, then possibly reshaped."""
    document = draw(valid_events())
    data = document["data"]
    # Mostly one change at a time, so each rule is the only one at stake now and then.
    changes = draw(st.sampled_from([0, 1, 1, 1, 1, 2, 3]))
    for name in draw(
        st.lists(
            st.sampled_from(sorted(FIELD_VALUES)), min_size=changes, max_size=changes, unique=True
        )
    ):
        target = document if name in ENVELOPE_FIELDS else data
        target[name] = draw(FIELD_VALUES[name])
    shape = draw(
        st.sampled_from(
            [
                "compact",
                "compact",
                "compact",
                "drop",
                "extra",
                "order",
                "indent",
                "escape",
                "optional",
                "garbage",
            ]
        )
    )
    if shape == "drop":
        target = draw(st.sampled_from([document, data]))
        del target[draw(st.sampled_from(sorted(target)))]
    elif shape == "extra":
        target = draw(st.sampled_from([document, data]))
        target[draw(st.sampled_from(["extra", "tenant", "Data", "ID"]))] = draw(json_values)
    elif shape == "order":
        document = dict(draw(st.permutations(list(document.items()))))
    elif shape == "indent":
        return json.dumps(document, indent=1).encode()
    elif shape == "escape":
        return json.dumps(document, ensure_ascii=True).replace("-", "\\u002d", 1).encode()
    elif shape == "optional":
        for name in draw(st.lists(st.sampled_from(["datacontenttype", "dataschema"]), unique=True)):
            document.pop(name, None)
        if draw(st.booleans()):
            data.pop("cached_prompt_tokens", None)
    elif shape == "garbage":
        return draw(st.sampled_from([b"", b"{", b"null", b"[]", b'"x"', b"\xff", b"{}"]))
    return compact(document)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(mutated(), min_size=20, max_size=60))
def test_vectorised_verdict_equals_pydantic(
    validator: BatchValidator, payloads: list[bytes]
) -> None:
    landed = validator.validate(batch_of(payloads), ingested_at=INGESTED_AT, consumer="t")
    reasons = landed.column("quarantine_reason").to_pylist()
    for payload, reason in zip(payloads, reasons, strict=True):
        contract_ok = reason not in CONTRACT_REASONS
        assert contract_ok == pydantic_ok(payload), (payload, reason)
        if reason is None:
            event_ = parse_usage_event(payload)
            row = landed.filter(
                pa.compute.equal(landed.column("payload"), pa.scalar(payload, pa.binary()))
            )
            assert row.column("event_id")[0].as_py() == event_.id
            assert row.column("prompt_tokens")[0].as_py() == event_.data.prompt_tokens
            assert row.column("end_time")[0].as_py() == event_.data.end_time
            assert row.column("first_token_time")[0].as_py() == event_.data.first_token_time
            assert row.column("gpu_uuids")[0].as_py() == event_.data.gpu_uuids


def reason_of(validator: BatchValidator, payload: bytes) -> tuple[str | None, str | None]:
    landed = validator.validate(batch_of([payload]), ingested_at=INGESTED_AT, consumer="t")
    return landed.column("quarantine_reason")[0].as_py(), landed.column("quarantine_detail")[
        0
    ].as_py()


@pytest.mark.parametrize(
    ("payload", "reason", "needle"),
    [
        (b"{not json", "invalid_json", "not valid JSON"),
        (b"[1, 2]", "invalid_json", "expected a JSON object"),
        (b"\xff\xfe", "invalid_json", "not valid JSON"),
        (compact({**event(), "tenant": "other"}), "schema_violation", "tenant: Extra inputs"),
        (compact(event(status="done")), "schema_violation", "data.status"),
        (compact(event(prompt_tokens=-5)), "negative_tokens", "data.prompt_tokens"),
        (compact(event(completion_tokens=-1)), "negative_tokens", "data.completion_tokens"),
        (
            compact(
                event(end_time="2026-11-23T09:00:00Z", first_token_time=None, completion_tokens=0)
            ),
            "end_before_arrival",
            "end_time is before arrival_time",
        ),
    ],
)
def test_contract_reasons(
    validator: BatchValidator, payload: bytes, reason: str, needle: str
) -> None:
    got, detail = reason_of(validator, payload)
    assert got == reason
    assert detail is not None and needle in detail


def test_policy_reasons() -> None:
    strict = BatchValidator(
        Policy(
            max_prompt_tokens=1_000_000,
            max_completion_tokens=100_000,
            max_future_s=86_400,
            known_tenants=frozenset({"acme"}),
        )
    )
    assert reason_of(strict, compact(event()))[0] is None
    reason, detail = reason_of(
        strict, compact(event(prompt_tokens=5_000_000, cached_prompt_tokens=0))
    )
    assert reason == "absurd_tokens" and "5000000" in (detail or "")
    future = event()
    future["time"] = (INGESTED_AT + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    reason, detail = reason_of(strict, compact(future))
    assert reason == "future_event_time" and "86400 s" in (detail or "")
    stranger = event()
    stranger["subject"] = "mallory"
    reason, detail = reason_of(strict, compact(stranger))
    assert reason == "unknown_tenant" and "mallory" in (detail or "")
