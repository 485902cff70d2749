"""The OpenAI-compatible surface of the metering gateway, as pure values.

Request bodies of `/v1/completions` and `/v1/chat/completions` are parsed here; OpenAI
clients send many optional fields (temperature, logprobs, seed, ...), which are accepted
and ignored. Nothing in a body can choose whom a request is billed to: the tenant comes
from the API key alone, so `user`, `tenant`, `subject` or any other field is ignored for
billing (`user` is read as OpenAI documents it — an end-user label — and dropped).

Responses are built in OpenAI's shapes: a JSON object for a non-streamed request,
Server-Sent Events (`data: {...}\\n\\n`, then `data: [DONE]\\n\\n`) for a streamed one,
`{"error": {"message", "type", "param", "code"}}` for errors. The usage event of a
request is built and validated by `build_usage_event`.

No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.errors import InputError
from models.usage_event import (
    USAGE_EVENT_TYPE_V1,
    USAGE_SCHEMA_ID_V1,
    RequestStatus,
    UsageData,
    UsageEvent,
)

__all__ = [
    "SSE_DONE",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "InvalidRequest",
    "StreamOptions",
    "build_usage_event",
    "chat_chunk",
    "chat_completion_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "finish_reason",
    "parse_chat_request",
    "parse_completion_request",
    "render_chat_prompt",
    "resolve_max_tokens",
    "sse",
    "usage_block",
    "usage_source",
]

#: The last SSE message of every stream.
SSE_DONE = b"data: [DONE]\n\n"


class InvalidRequest(InputError):
    """A request body the gateway cannot serve; `param` names the field (OpenAI's `param`)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _RequestBase(BaseModel):
    # OpenAI clients send many optional fields; all are accepted and ignored. Unknown
    # fields are dropped, never stored, so none can reach the usage event.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="one choice per request")
    #: OpenAI's end-user label: accepted, never used for billing.
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_RequestBase):
    """`POST /v1/completions`: one prompt (a string, or a list holding one string)."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"expected one prompt, got a list of {len(value)}")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def requested_max_tokens(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens


class ChatMessage(BaseModel):
    """One chat message; content is a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1, max_length=64)
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(
        cls, value: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        if isinstance(value, list):
            for i, part in enumerate(value):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"part {i}: only text parts ({{'type': 'text', 'text': ...}}) are served"
                    )
        return value

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part["text"]) for part in self.content)


class ChatCompletionRequest(_RequestBase):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def requested_max_tokens(self) -> tuple[str, int | None]:
        # OpenAI deprecated max_tokens for chat in favour of max_completion_tokens.
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


def _parse_body(body: bytes, model: type[BaseModel]) -> Any:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        # Pydantic adds the union member's name to the location; it means nothing to
        # a client ("prompt.list[str]" → "prompt").
        parts = [
            str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p == "str"))
        ]
        param = ".".join(parts) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        where = f"{param}: " if param else ""
        raise InvalidRequest(f"{where}{message}", param=param) from None


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a `/v1/completions` body, or raise `InvalidRequest`."""
    request: CompletionRequest = _parse_body(body, CompletionRequest)
    return request


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a `/v1/chat/completions` body, or raise `InvalidRequest`."""
    request: ChatCompletionRequest = _parse_body(body, ChatCompletionRequest)
    return request


def resolve_max_tokens(
    request: CompletionRequest | ChatCompletionRequest, *, default: int, limit: int
) -> int:
    """The completion-token budget: the request's, else `default`; over `limit` is an error."""
    field, asked = request.requested_max_tokens()
    if asked is None:
        return min(default, limit)
    if asked > limit:
        raise InvalidRequest(
            f"{field}: {asked} is over this gateway's limit of {limit}", param=field
        )
    return asked


def render_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The prompt a chat becomes: one block per message, then the assistant's turn.

        <|system|>
        You are terse.
        <|user|>
        Hi!
        <|assistant|>

    A plain, model-neutral template (each message as `<|role|>\\n<text>\\n`, then
    `<|assistant|>\\n`); a model with its own chat template would render it server-side.
    """
    blocks = [f"<|{m.role}|>\n{m.text}\n" for m in messages]
    return "".join(blocks) + "<|assistant|>\n"


# -- responses --------------------------------------------------------------------------


def finish_reason(completion_tokens: int, max_tokens: int) -> Literal["stop", "length"]:
    """`length` when the budget was used up, else `stop` (OpenAI's two common reasons)."""
    return "length" if completion_tokens >= max_tokens else "stop"


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    *,
    request_id: str,
    model: str,
    created: int,
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
    finish: str,
) -> dict[str, Any]:
    """The JSON body of a non-streamed `/v1/completions` answer."""
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": usage_block(prompt_tokens, completion_tokens),
    }


def chat_completion_response(
    *,
    request_id: str,
    model: str,
    created: int,
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
    finish: str,
) -> dict[str, Any]:
    """The JSON body of a non-streamed `/v1/chat/completions` answer."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage_block(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    *,
    request_id: str,
    model: str,
    created: int,
    text: str | None = None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed `/v1/completions` chunk. `text=None` and `usage` set: the usage chunk
    (no choices), sent last when the client asked for `stream_options.include_usage`."""
    chunk: dict[str, Any] = {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": []
        if usage is not None
        else [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}],
    }
    if include_usage or usage is not None:
        chunk["usage"] = usage
    return chunk


def chat_chunk(
    *,
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, str] | None = None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed `/v1/chat/completions` chunk (`chat.completion.chunk`); with `usage`
    set, the final usage chunk with no choices."""
    chunk: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if usage is not None
        else [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
    }
    if include_usage or usage is not None:
        chunk["usage"] = usage
    return chunk


def sse(document: dict[str, Any]) -> bytes:
    """One Server-Sent Events message carrying `document` as JSON."""
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def error_body(
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# -- the usage event --------------------------------------------------------------------


def usage_source(server_name: str, model: str) -> str:
    """`triton://<server name>/v2/models/<model>`: the serving endpoint, as the simulator
    writes it (`triton://host:port/v2/models/<model>`)."""
    return f"triton://{server_name}/v2/models/{model}"


def build_usage_event(
    *,
    request_id: str,
    tenant: str,
    server_name: str,
    model: str,
    model_version: str,
    hostname: str,
    gpu_uuids: Sequence[str],
    prompt_tokens: int,
    completion_tokens: int,
    arrival_time: datetime,
    first_token_time: datetime | None,
    end_time: datetime,
    status: RequestStatus,
) -> UsageEvent:
    """The validated v1 usage event of one request that reached Triton.

    `tenant` must come from the API key record. Raises pydantic's ValidationError when
    a value breaks the contract (e.g. a GPU UUID not shaped `GPU-…`).
    """
    data = UsageData(
        model=model,
        model_version=model_version,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_prompt_tokens=0,
        arrival_time=arrival_time,
        first_token_time=first_token_time,
        end_time=end_time,
        hostname=hostname,
        gpu_uuids=list(gpu_uuids),
        status=status,
    )
    return UsageEvent(
        specversion="1.0",
        id=request_id,
        source=usage_source(server_name, model),
        type=USAGE_EVENT_TYPE_V1,
        time=end_time,
        subject=tenant,
        dataschema=USAGE_SCHEMA_ID_V1,
        data=data,
    )
