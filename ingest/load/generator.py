"""A load generator that replays a request trace against the metering gateway.

Each trace row (arrival time, prompt tokens, completion tokens) becomes one OpenAI
request at its arrival time (divided by `speed`), with a prompt of exactly the row's
prompt tokens (times `token_scale`) under the demo model's tokenizer and `max_tokens`
set to its completion tokens (times `token_scale`). Tenants take turns by a seeded
draw over the given API keys; a share of the requests stream. What each request got
back (its id, status, and the usage the gateway reported) is returned, so a caller
can compare the usage events with what the clients saw.

The bundled trace is the first 10 minutes (1,750 requests) of Mooncake's conversation
trace (FAST'25 trace release, Apache-2.0: `MOONCAKE-LICENSE` beside it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson

from ingest.simulator.trace import TraceColumns, read_trace
from models.errors import InputError

BUNDLED_TRACE = Path(__file__).with_name("mooncake_conversation_10min.csv")
#: Words of at most four letters: the demo tokenizer counts each as one token.
_WORDS = ("data", "flow", "gpu", "fast", "cost", "node", "rack", "time", "unit", "load")


def prompt_of(tokens: int, seed: int = 0) -> str:
    """A prompt of exactly `tokens` demo-tokenizer tokens (one per short word)."""
    if tokens < 1:
        raise InputError(f"prompt_of: tokens must be >= 1, got {tokens}")
    return " ".join(_WORDS[(seed + i) % len(_WORDS)] for i in range(tokens))


@dataclass(frozen=True)
class PlannedRequest:
    at_s: float  # from the start of the run
    tenant: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    chat: bool


@dataclass(frozen=True)
class RequestResult:
    planned: PlannedRequest
    status_code: int
    request_id: str | None  # the gateway's id (the usage event id)
    prompt_tokens: int | None  # as the gateway reported them to the client
    completion_tokens: int | None
    latency_s: float
    error: str | None = None


@dataclass
class LoadReport:
    results: list[RequestResult] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.status_code == 200 and r.error is None]

    def by_tenant(self) -> dict[str, tuple[int, int, int]]:
        """tenant → (requests, prompt tokens, completion tokens) of the successful ones."""
        out: dict[str, tuple[int, int, int]] = {}
        for r in self.ok:
            n, p, c = out.get(r.planned.tenant, (0, 0, 0))
            prompt, completion = r.prompt_tokens or 0, r.completion_tokens or 0
            out[r.planned.tenant] = (n + 1, p + prompt, c + completion)
        return out


def plan_from_trace(
    tenants: Sequence[str],
    *,
    trace: Path = BUNDLED_TRACE,
    duration_s: float = 60.0,
    speed: float = 1.0,
    token_scale: float = 1.0,
    max_requests: int | None = None,
    stream_share: float = 0.7,
    chat_share: float = 0.5,
    seed: int = 0,
) -> list[PlannedRequest]:
    """The trace's requests that arrive within `duration_s` of replay time."""
    if not tenants:
        raise InputError("load generator: no tenants (API keys) given")
    if speed <= 0 or token_scale <= 0:
        raise InputError("load generator: --speed and --token-scale must be > 0")
    requests = read_trace(trace, TraceColumns(), repeat=False)
    rng = np.random.default_rng(seed)
    arrival_s = (requests.arrival_s - requests.arrival_s.min()) / speed
    plan: list[PlannedRequest] = []
    for i in np.argsort(arrival_s, kind="stable"):
        if arrival_s[i] >= duration_s or (max_requests is not None and len(plan) >= max_requests):
            break
        plan.append(
            PlannedRequest(
                at_s=float(arrival_s[i]),
                tenant=tenants[int(rng.integers(len(tenants)))],
                prompt_tokens=max(1, round(float(requests.prompt_tokens[i]) * token_scale)),
                max_tokens=max(1, round(float(requests.completion_tokens[i]) * token_scale)),
                stream=bool(rng.random() < stream_share),
                chat=bool(rng.random() < chat_share),
            )
        )
    return plan


async def _one(
    client: httpx.AsyncClient, planned: PlannedRequest, key: str, model: str, index: int
) -> RequestResult:
    started = time.perf_counter()
    prompt = prompt_of(planned.prompt_tokens, seed=index)
    body: dict[str, object] = {"model": model, "max_tokens": planned.max_tokens}
    if planned.chat:
        # The chat template adds tokens of its own: the usage tells how many.
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    if planned.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if not planned.stream:
            response = await client.post(path, json=body, headers=headers)
            latency = time.perf_counter() - started
            if response.status_code != 200:
                return RequestResult(planned, response.status_code, None, None, None, latency)
            doc = response.json()
            usage = doc.get("usage") or {}
            return RequestResult(
                planned,
                200,
                str(doc.get("id", "")).split("-", 1)[-1] or None,
                usage.get("prompt_tokens"),
                usage.get("completion_tokens"),
                latency,
            )
        request_id: str | None = None
        usage = {}
        async with client.stream("POST", path, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                latency = time.perf_counter() - started
                return RequestResult(planned, response.status_code, None, None, None, latency)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    latency = time.perf_counter() - started
                    message = str(chunk["error"].get("message"))
                    return RequestResult(planned, 200, request_id, None, None, latency, message)
                request_id = request_id or str(chunk.get("id", "")).split("-", 1)[-1] or None
                if chunk.get("usage"):
                    usage = chunk["usage"]
        return RequestResult(
            planned,
            200,
            request_id,
            usage.get("prompt_tokens"),
            usage.get("completion_tokens"),
            time.perf_counter() - started,
        )
    except httpx.HTTPError as exc:
        latency = time.perf_counter() - started
        return RequestResult(planned, 0, None, None, None, latency, f"{type(exc).__name__}: {exc}")


async def run_load_async(
    base_url: str,
    plan: Sequence[PlannedRequest],
    keys: dict[str, str],
    *,
    model: str,
    max_in_flight: int = 256,
    on_result: Callable[[RequestResult], None] | None = None,
) -> LoadReport:
    """Send every planned request at its time; `keys` maps tenant → API key."""
    missing = sorted({p.tenant for p in plan} - set(keys))
    if missing:
        raise InputError(f"load generator: no API key for tenants {missing}")
    report = LoadReport()
    gate = asyncio.Semaphore(max_in_flight)
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def fire(index: int, planned: PlannedRequest) -> None:
            delay = planned.at_s - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                result = await _one(client, planned, keys[planned.tenant], model, index)
            report.results.append(result)
            if on_result is not None:
                on_result(result)

        await asyncio.gather(*(fire(i, p) for i, p in enumerate(plan)))
        report.elapsed_s = time.perf_counter() - start
    return report


def run_load(
    base_url: str,
    plan: Sequence[PlannedRequest],
    keys: dict[str, str],
    *,
    model: str,
    max_in_flight: int = 256,
    on_result: Callable[[RequestResult], None] | None = None,
) -> LoadReport:
    return asyncio.run(
        run_load_async(
            base_url, plan, keys, model=model, max_in_flight=max_in_flight, on_result=on_result
        )
    )
