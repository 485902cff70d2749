"""An in-memory Triton backend for the gateway's unit tests that obeys the model contract
of `demo-llm` (ingest/gateway/triton_backend.py): one response per generated token, each
with that token's text, `num_input_tokens` (the prompt's whitespace tokens, the same in
every response) and `num_output_tokens` = 1; the stream ends after `max_tokens` tokens;
request parameter `fail_after_tokens` makes it answer an error after K tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ingest.gateway.triton_backend import (
    BackendRequest,
    TritonError,
    TritonResponse,
    TritonUnavailable,
)
from ingest.settings import TritonServerSettings


class FakeTriton:
    def __init__(self, *, token_delay_s: float = 0.0, unreachable: bool = False) -> None:
        self.token_delay_s = token_delay_s
        self.unreachable = unreachable
        self.calls: list[tuple[str, BackendRequest]] = []
        self.cancelled: list[str] = []
        self.completed: list[str] = []
        #: When set (an asyncio.Event made in the test's loop), calls wait for it.
        self.release: asyncio.Event | None = None

    @staticmethod
    def prompt_tokens(prompt: str) -> int:
        return len(prompt.split())

    async def stream(
        self, server: TritonServerSettings, request: BackendRequest
    ) -> AsyncIterator[TritonResponse]:
        self.calls.append((server.server_name, request))
        if self.unreachable:
            raise TritonUnavailable(f"Triton {server.server_name}: UNAVAILABLE")
        if self.release is not None:
            await self.release.wait()
        n_in = self.prompt_tokens(request.prompt)
        fail_after = request.parameters.get("fail_after_tokens")
        finished = False
        try:
            for i in range(request.max_tokens):
                if fail_after is not None and i >= int(fail_after):
                    raise TritonError(f"demo-llm failed after {fail_after} tokens (test hook)")
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                yield TritonResponse(text=f"t{i} ", num_input_tokens=n_in, num_output_tokens=1)
            finished = True
            self.completed.append(request.request_id)
        finally:
            if not finished:
                self.cancelled.append(request.request_id)

    async def aclose(self) -> None:
        return None
