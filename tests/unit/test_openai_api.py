"""The gateway's OpenAI surface (models/openai_api.py): bodies parsed leniently but never
billing-relevant, errors naming the field, responses in OpenAI's shapes, valid events."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from models.openai_api import (
    SSE_DONE,
    ChatMessage,
    InvalidRequest,
    build_usage_event,
    chat_chunk,
    completion_response,
    error_body,
    finish_reason,
    parse_chat_request,
    parse_completion_request,
    render_chat_prompt,
    resolve_max_tokens,
    sse,
)
from models.usage_event import parse_usage_event

T0 = datetime(2026, 12, 1, 10, tzinfo=UTC)


def test_unknown_openai_fields_are_accepted_and_dropped() -> None:
    body = {
        "model": "demo-llm",
        "prompt": ["hello"],
        "temperature": 0.2,
        "logprobs": None,
        "seed": 7,
        "user": "end-user-42",
        "tenant": "globex",
        "subject": "globex",
    }
    request = parse_completion_request(json.dumps(body).encode())
    assert request.prompt_text == "hello"
    assert not hasattr(request, "tenant") and "subject" not in request.model_dump()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"[]", None),
        (b'{"model": "m"}', "prompt"),
        (b'{"model": "", "prompt": "x"}', "model"),
        (b'{"model": "m", "prompt": [], "max_tokens": 3}', "prompt"),
        (b'{"model": "m", "prompt": "x", "n": 2}', "n"),
    ],
)
def test_bad_completion_bodies_name_the_field(body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_completion_request(body)
    assert caught.value.param == param


def test_chat_takes_text_parts_and_refuses_others() -> None:
    ok = parse_chat_request(
        b'{"model": "m", "messages": [{"role": "user", "content": '
        b'[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}'
    )
    assert ok.messages[0].text == "ab"
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request(
            b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'
        )
    assert caught.value.param == "messages.0.content"
    with pytest.raises(InvalidRequest, match="messages"):
        parse_chat_request(b'{"model": "m", "messages": []}')


def test_max_tokens_default_limit_and_chat_preference() -> None:
    completion = parse_completion_request(b'{"model": "m", "prompt": "x"}')
    assert resolve_max_tokens(completion, default=16, limit=100) == 16
    chat = parse_chat_request(
        b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 5, '
        b'"max_completion_tokens": 7}'
    )
    assert resolve_max_tokens(chat, default=16, limit=100) == 7
    with pytest.raises(InvalidRequest) as caught:
        resolve_max_tokens(chat, default=16, limit=6)
    assert caught.value.param == "max_completion_tokens"


def test_render_chat_prompt_template() -> None:
    messages = [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="u")]
    assert render_chat_prompt(messages) == "<|system|>\ns\n<|user|>\nu\n<|assistant|>\n"


def test_response_shapes() -> None:
    body = completion_response(
        request_id="r1",
        model="m",
        created=1,
        text="hi",
        prompt_tokens=3,
        completion_tokens=2,
        finish=finish_reason(2, 2),
    )
    assert body["id"] == "cmpl-r1" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    usage = chat_chunk(request_id="r1", model="m", created=1, usage=body["usage"])
    assert usage["choices"] == [] and usage["id"] == "chatcmpl-r1"
    assert sse({"a": 1}) == b'data: {"a":1}\n\n' and SSE_DONE == b"data: [DONE]\n\n"
    assert error_body("bad", param="max_tokens") == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": None,
        }
    }


@given(
    prompt=st.integers(min_value=0, max_value=10**6),
    completion=st.integers(min_value=0, max_value=10**6),
    ttft_ms=st.integers(min_value=0, max_value=10**5),
    tail_ms=st.integers(min_value=0, max_value=10**6),
    status=st.sampled_from(["ok", "error", "cancelled"]),
)
def test_build_usage_event_round_trips_through_the_wire_format(
    prompt: int, completion: int, ttft_ms: int, tail_ms: int, status: str
) -> None:
    first = T0 + timedelta(milliseconds=ttft_ms) if completion else None
    end = T0 + timedelta(milliseconds=ttft_ms + tail_ms)
    event = build_usage_event(
        request_id="0123abcd",
        tenant="acme",
        server_name="triton-a:8001",
        model="demo-llm",
        model_version="1",
        hostname="gpu-a",
        gpu_uuids=["GPU-1", "GPU-2"],
        prompt_tokens=prompt,
        completion_tokens=completion,
        arrival_time=T0,
        first_token_time=first,
        end_time=end,
        status=status,  # type: ignore[arg-type]
    )
    again = parse_usage_event(event.to_json_bytes())
    assert again == event
    assert again.source == "triton://triton-a:8001/v2/models/demo-llm"
    assert again.subject == "acme" and again.time == end


def test_build_usage_event_refuses_a_bad_gpu_uuid() -> None:
    with pytest.raises(ValidationError, match="gpu_uuids"):
        build_usage_event(
            request_id="r",
            tenant="acme",
            server_name="s:1",
            model="m",
            model_version="1",
            hostname="h",
            gpu_uuids=["not-a-gpu"],
            prompt_tokens=1,
            completion_tokens=0,
            arrival_time=T0,
            first_token_time=None,
            end_time=T0,
            status="ok",
        )
