"""Calling Triton: one streamed generation per request, and the tally of what it produced.

The model contract (`demo-llm`, a decoupled model, and any vLLM-like backend): inputs
`prompt` (BYTES [1]) and `max_tokens` (INT32 [1]); each streamed response carries
`text_output` (BYTES [1], this response's text), `num_input_tokens` (INT32 [1], the
prompt's tokens, the same in every response) and `num_output_tokens` (INT32 [1], tokens
in this response); an empty response flagged final ends the stream. An error response
may come at any point.

Decoupled models refuse unary gRPC, so every call streams. tritonclient's aio
`stream_infer` cannot ask for the empty final response (`triton_enable_empty_final_response`
is a reserved parameter it does not set), and without it a stream whose model sends the
final flag on its own never says it is over; so `TritonBackend` builds the request with
tritonclient's helpers and calls the gRPC stub itself, one aio client (channel) per
server, created lazily inside the running event loop.

`Backend` is the seam: the app talks to it, tests use an in-memory backend that obeys
the same contract. `Generation` turns a backend's responses into text and usage:
prompt tokens = max of `num_input_tokens`, completion tokens = sum of
`num_output_tokens` (vLLM's semantics), first-token time at the first response with
`num_output_tokens > 0`, and the outcome (ok / error / cancelled).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from ingest.settings import TritonServerSettings
from models.usage_event import RequestStatus

__all__ = [
    "Backend",
    "BackendRequest",
    "Generation",
    "ServerPool",
    "TritonBackend",
    "TritonError",
    "TritonResponse",
    "TritonUnavailable",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendRequest:
    request_id: str
    model: str
    prompt: str
    max_tokens: int
    #: Triton request parameters (e.g. the demo model's `fail_after_tokens` test hook).
    parameters: dict[str, int | str | bool | float] = field(default_factory=dict)


@dataclass(frozen=True)
class TritonResponse:
    """One streamed response of the model."""

    text: str
    num_input_tokens: int
    num_output_tokens: int


class TritonError(Exception):
    """Triton answered with an error (or the call failed after it reached Triton)."""


class TritonUnavailable(TritonError):
    """The server could not be reached: the request never got to Triton."""


class Backend(Protocol):
    def stream(
        self, server: TritonServerSettings, request: BackendRequest
    ) -> AsyncIterator[TritonResponse]:
        """The model's responses until the final one; raises `TritonError` on an error
        response. Closing the iterator (or cancelling the task) cancels the request."""
        ...

    async def aclose(self) -> None: ...


class ServerPool:
    """Which servers serve a model; round-robin among them."""

    def __init__(self, servers: Sequence[TritonServerSettings]) -> None:
        self._by_model: dict[str, list[TritonServerSettings]] = {}
        for server in servers:
            for model in server.models:
                self._by_model.setdefault(model, []).append(server)
        self._turns = {model: itertools.cycle(range(len(s))) for model, s in self._by_model.items()}

    @property
    def models(self) -> list[str]:
        return sorted(self._by_model)

    def pick(self, model: str) -> TritonServerSettings | None:
        servers = self._by_model.get(model)
        if not servers:
            return None
        return servers[next(self._turns[model])]


class Generation:
    """One request's run on a backend: iterate `text()`; afterwards read the tally.

    `status` is "ok" when the stream ended with the final response, "error" when Triton
    answered an error (`error` says what; the tokens produced until then count),
    "cancelled" when the consumer stopped early (client gone, task cancelled).
    """

    def __init__(
        self,
        backend: Backend,
        server: TritonServerSettings,
        request: BackendRequest,
        clock: Callable[[], datetime],
    ) -> None:
        self.backend = backend
        self.server = server
        self.request = request
        self._clock = clock
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.responses = 0
        self.first_token_time: datetime | None = None
        self.end_time: datetime | None = None
        self.status: RequestStatus = "cancelled"
        self.error: str | None = None

    async def text(self) -> AsyncIterator[str]:
        """The text of each response that has some. A `TritonUnavailable` before any
        response propagates (nothing reached Triton); other errors end the iteration
        with status "error"."""
        responses = self.backend.stream(self.server, self.request)
        try:
            async for response in responses:
                self.responses += 1
                self.prompt_tokens = max(self.prompt_tokens, response.num_input_tokens)
                if response.num_output_tokens > 0:
                    if self.first_token_time is None:
                        self.first_token_time = self._clock()
                    self.completion_tokens += response.num_output_tokens
                if response.text:
                    yield response.text
            self.status = "ok"
        except TritonUnavailable:
            self.end_time = self._clock()
            if self.responses == 0:
                raise
            self.status, self.error = "error", "the connection to Triton was lost"
        except TritonError as exc:
            self.status, self.error = "error", str(exc) or type(exc).__name__
        except Exception as exc:  # a bug or an unforeseen transport error: still metered
            log.exception("request %s: the Triton call failed", self.request.request_id)
            self.status, self.error = "error", f"{type(exc).__name__} in the gateway"
        finally:
            if self.end_time is None:
                self.end_time = self._clock()
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()  # cancels the Triton request when we stopped early

    async def collect(self) -> str:
        return "".join([piece async for piece in self.text()])


class TritonBackend:
    """The real backend: Triton's gRPC streaming API through tritonclient's aio client."""

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._clients: dict[str, Any] = {}

    def _client(self, server: TritonServerSettings) -> Any:
        from tritonclient.grpc.aio import InferenceServerClient

        client = self._clients.get(server.grpc_url)
        if client is None:
            client = InferenceServerClient(server.grpc_url)
            self._clients[server.grpc_url] = client
        return client

    @staticmethod
    def _request(server: TritonServerSettings, request: BackendRequest) -> Any:
        import numpy as np
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.grpc._utils import _get_inference_request

        prompt = InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([request.prompt.encode()], dtype=np.object_))
        max_tokens = InferInput("max_tokens", [1], "INT32")
        max_tokens.set_data_from_numpy(np.array([request.max_tokens], dtype=np.int32))
        outputs = [
            InferRequestedOutput(name)
            for name in ("text_output", "num_input_tokens", "num_output_tokens")
        ]
        message = _get_inference_request(
            model_name=request.model,
            inputs=[prompt, max_tokens],
            model_version="",
            request_id=request.request_id,
            outputs=outputs,
            sequence_id=0,
            sequence_start=False,
            sequence_end=False,
            priority=0,
            timeout=None,
            parameters=dict(request.parameters) or None,
        )
        # What `async_stream_infer(enable_empty_final_response=True)` of the sync client
        # sets; the aio client has no way to ask for it.
        message.parameters["triton_enable_empty_final_response"].bool_param = True
        return message

    async def stream(
        self, server: TritonServerSettings, request: BackendRequest
    ) -> AsyncIterator[TritonResponse]:
        import grpc
        from tritonclient.grpc import InferResult

        client = self._client(server)
        message = self._request(server, request)
        finished = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield message
            # Keep the request half of the stream open until the final response: a
            # closed request stream lets the server end the call early.
            await finished.wait()

        call = client._client_stub.ModelStreamInfer(requests(), timeout=self.timeout_s)
        received = 0
        completed = False
        try:
            async for response in call:
                if response.error_message:
                    raise TritonError(f"Triton {server.server_name}: {response.error_message}")
                infer = response.infer_response
                final = infer.parameters["triton_final_response"].bool_param
                if infer.outputs:
                    result = InferResult(infer)
                    received += 1
                    yield _decode(result)
                if final:
                    completed = True
                    return
            raise TritonError(f"Triton {server.server_name}: the stream ended before the final")
        except grpc.aio.AioRpcError as exc:
            reason = f"Triton {server.server_name}: {exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.UNAVAILABLE and received == 0:
                raise TritonUnavailable(reason) from None
            raise TritonError(reason) from None
        finally:
            # After the final response, closing the request half ends the call cleanly;
            # cancelling it costs a formatted traceback inside grpc on every request.
            finished.set()
            if not completed and not call.done():
                call.cancel()  # the client left, or the task was cancelled: stop generating

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.close()
            except Exception as exc:  # closing is best effort
                log.debug("closing a Triton client failed: %s", exc)


def _decode(result: Any) -> TritonResponse:
    text = result.as_numpy("text_output")
    inputs = result.as_numpy("num_input_tokens")
    outputs = result.as_numpy("num_output_tokens")
    piece = b"" if text is None or text.size == 0 else text.reshape(-1)[0]
    return TritonResponse(
        text=piece.decode("utf-8", "replace") if isinstance(piece, bytes) else str(piece),
        num_input_tokens=int(inputs.reshape(-1)[0]) if inputs is not None else 0,
        num_output_tokens=int(outputs.reshape(-1)[0]) if outputs is not None else 0,
    )
