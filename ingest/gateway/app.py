"""The metering gateway's HTTP app: OpenAI-compatible endpoints in front of Triton.

Every request is authenticated by its API key (`Authorization: Bearer glk_…`); the key's
record names the tenant billed, and nothing in the body can change it. A request that
reached Triton produces exactly one usage event (status ok, error or cancelled, with the
tokens actually produced), written durably to the spool before the client gets the end
of its answer: the last bytes of a JSON answer, or `data: [DONE]` of a stream. Requests
refused before Triton (401, 429, 400, 404, 503 unreachable server) produce none: nothing
was served.

Spool writes are group-committed: one writer thread appends every event waiting with one
fsync, and each request awaits its own future, so the fsync cost is shared under load.

Keys never reach a log line: only `redact(key)` (the key id) is logged, and no error
message is built from a header.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import math
import queue
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ingest.gateway.keys_file import load_keys
from ingest.gateway.spool import Spool
from ingest.gateway.triton_backend import (
    Backend,
    BackendRequest,
    Generation,
    ServerPool,
    TritonBackend,
    TritonUnavailable,
)
from ingest.settings import Settings, TritonServerSettings
from models.api_keys import ApiKeyRecord, KeyRing, TokenBucket, redact
from models.errors import GpuledgerError
from models.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    InvalidRequest,
    build_usage_event,
    chat_chunk,
    chat_completion_response,
    completion_chunk,
    completion_response,
    error_body,
    finish_reason,
    parse_chat_request,
    parse_completion_request,
    render_chat_prompt,
    resolve_max_tokens,
    sse,
    usage_block,
)
from models.usage_event import UsageEvent

__all__ = ["Activity", "KeyScrubber", "KeyStore", "SpoolWriter", "create_app"]

log = logging.getLogger("gpuledger.gateway")

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


# -- in-flight activity ------------------------------------------------------------------


class Activity:
    """Requests in flight, and their share of each GPU (a live DCGM simulator reads it).

    A request served by a server with N GPUs (a tensor-parallel group) counts 1/N on each.
    Besides the shares now, it keeps each GPU's request-seconds in flight since the
    start (the integral of its share over time), so a reader polling every 50 ms still
    sees a 10 ms request. Thread-safe: read from other threads.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[str, ...]] = {}
        self._ids = itertools.count()
        self._monotonic = monotonic
        self._share: dict[str, float] = {}
        self._busy_s: dict[str, float] = {}
        self._since = monotonic()

    def _advance(self) -> None:
        """Add the shares held since the last change to the request-seconds (locked)."""
        now = self._monotonic()
        elapsed = max(0.0, now - self._since)
        for gpu, share in self._share.items():
            self._busy_s[gpu] = self._busy_s.get(gpu, 0.0) + share * elapsed
        self._since = now

    def begin(self, gpu_uuids: Sequence[str]) -> int:
        with self._lock:
            self._advance()
            token = next(self._ids)
            gpus = tuple(gpu_uuids)
            self._inflight[token] = gpus
            for gpu in gpus:
                self._share[gpu] = self._share.get(gpu, 0.0) + 1.0 / len(gpus)
            return token

    def end(self, token: int) -> None:
        with self._lock:
            gpus = self._inflight.pop(token, None)
            if gpus is None:
                return
            self._advance()
            for gpu in gpus:
                left = self._share[gpu] - 1.0 / len(gpus)
                self._share[gpu] = left if left > 1e-9 else 0.0

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def inflight_by_gpu(self) -> dict[str, float]:
        """Each GPU's share of the requests in flight now."""
        with self._lock:
            return {gpu: share for gpu, share in self._share.items() if share > 0}

    def busy_seconds_by_gpu(self) -> dict[str, float]:
        """Each GPU's request-seconds in flight since the start (share × time)."""
        with self._lock:
            self._advance()
            return dict(self._busy_s)


# -- group-committed spool writes --------------------------------------------------------


class SpoolWriter:
    """One thread appending queued payloads to the spool, all waiting ones per fsync;
    or, when nothing else is being written, the caller appends at once (`write_if_idle`)."""

    def __init__(self, spool: Spool, *, on_written: Callable[[], None] | None = None) -> None:
        self.spool = spool
        self._on_written = on_written
        self._queue: queue.SimpleQueue[tuple[bytes, concurrent.futures.Future[int]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._lock = threading.Lock()
        #: Held while appending: by the thread for a batch, or by `write_if_idle`.
        self._writing = threading.Lock()
        self.batches = 0
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="gateway-spool-writer", daemon=True)
        self._thread.start()

    def write_if_idle(self, payload: bytes) -> int | None:
        """Append `payload` durably in the calling thread and return its sequence when no
        other write is queued or under way; None otherwise (then `submit` it).

        At low load this spares the request the group commit's two thread hand-offs
        (to the writer and back to the event loop: about 0.5 ms of the gateway's added
        latency here, bench/gateway.py); under load the thread batches many per fsync."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the spool writer is closed")
            if not self._queue.empty() or not self._writing.acquire(blocking=False):
                return None
        try:
            sequence = self.spool.append(payload)
            self.batches += 1
            self.written += 1
        finally:
            self._writing.release()
        if self._on_written is not None:
            self._on_written()
        return sequence

    def submit(self, payload: bytes) -> concurrent.futures.Future[int]:
        """Queue one payload; the future resolves to its sequence once it is on disk."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the spool writer is closed")
            self._queue.put((payload, future))
        return future

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                with self._writing:
                    sequences = self.spool.append_many([payload for payload, _ in batch])
                    self.batches += 1
                    self.written += len(batch)
            except Exception as exc:
                log.error("spool %s: appending %d events failed: %s", self.spool.directory,
                          len(batch), exc)  # fmt: skip
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), sequence in zip(batch, sequences, strict=True):
                future.set_result(sequence)
            if self._on_written is not None:
                self._on_written()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout_s)


# -- API keys ------------------------------------------------------------------------------


class KeyStore:
    """The key file's active keys, reloaded when the file changes (revocations apply at
    once: the file is checked on every request, one `stat`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._ring = KeyRing([])
        self.reload()

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self) -> None:
        stamp = self._current_stamp()
        if stamp == self._stamp and self._stamp is not None:
            return
        try:
            self._ring = KeyRing(load_keys(self.path))
        except GpuledgerError as exc:
            # A broken file must not open the gateway, nor close it: keep the last good keys.
            log.error("API key file not reloaded, keeping the previous keys: %s", exc.message)
        self._stamp = stamp

    def ring(self) -> KeyRing:
        if self._current_stamp() != self._stamp:
            self.reload()
        return self._ring


_KEYISH = re.compile(r"glk_([0-9a-f]{12})_[A-Za-z0-9_-]{8,}")


class KeyScrubber(logging.Filter):
    """Rewrites anything shaped like a key in a log record to its redacted form: a last
    line of defence for log lines we do not write (uvicorn's access and error logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "glk_" in message:
            record.msg = _KEYISH.sub(lambda m: f"glk_{m.group(1)}_…", message)
            record.args = ()
        if record.exc_info and record.exc_info[1] is not None and "glk_" in str(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
            record.msg = f"{record.msg} (traceback withheld: it held an API key)"
        return True


# -- the app ----------------------------------------------------------------------------------


def _error(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, error_type=error_type, param=param, code=code),
        status_code=status,
        headers=headers,
    )


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class _Gateway:
    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        writer: SpoolWriter,
        keys: KeyStore,
        clock: Clock,
        monotonic: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.writer = writer
        self.keys = keys
        self.clock = clock
        self.monotonic = monotonic
        self.pool = ServerPool(settings.gateway.servers)
        self.activity = Activity(monotonic)
        self.buckets: dict[str, tuple[float, int, TokenBucket]] = {}
        self.outcomes: Counter[str] = Counter()

    # -- checks before Triton ------------------------------------------------------------

    def authenticate(self, request: Request) -> ApiKeyRecord:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            log.info("refused %s %s: no bearer API key", request.method, request.url.path)
            raise _Refused(
                _error(
                    401,
                    "Missing API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                )
            )
        record = self.keys.ring().authenticate(presented)
        if record is None:
            log.info(
                "refused %s %s: API key %s is unknown, wrong or revoked",
                request.method,
                request.url.path,
                redact(presented),
            )
            raise _Refused(_error(401, "Incorrect or revoked API key.", code="invalid_api_key"))
        return record

    def rate_limit(self, record: ApiKeyRecord) -> None:
        if record.rate_per_s is None:
            return
        held = self.buckets.get(record.key_id)
        if held is None or held[:2] != (record.rate_per_s, record.burst):
            held = (record.rate_per_s, record.burst, TokenBucket(record.rate_per_s, record.burst))
            self.buckets[record.key_id] = held
        wait_s = held[2].take(self.monotonic())
        if wait_s > 0:
            log.info("rate limited key glk_%s_… (tenant %s)", record.key_id, record.tenant)
            raise _Refused(
                _error(
                    429,
                    f"Rate limit of {record.rate_per_s:g} requests/s (burst {record.burst}) "
                    f"reached; retry in {wait_s:.2f} s.",
                    error_type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
                )
            )

    # -- routes ----------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "inflight": self.activity.inflight()})

    async def stats(self, request: Request) -> Response:
        forwarder = getattr(request.app.state, "forwarder", None)
        body: dict[str, Any] = {
            "inflight": self.activity.inflight(),
            "requests": dict(self.outcomes),
            "spooled": self.writer.written,
            "spool_batches": self.writer.batches,
        }
        if forwarder is not None:
            body["forwarder"] = forwarder.counters()
        return JSONResponse(body)

    async def models(self, request: Request) -> Response:
        try:
            self.authenticate(request)
        except _Refused as refused:
            return refused.response
        created = int(self.clock().timestamp())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "gpuledger"}
            for m in self.pool.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, *, chat: bool) -> Response:
        arrival = self.clock()
        try:
            record = self.authenticate(request)
            self.rate_limit(record)
            body = await request.body()
            parsed: CompletionRequest | ChatCompletionRequest
            if chat:
                parsed = parse_chat_request(body)
                prompt = render_chat_prompt(parsed.messages)
            else:
                parsed = parse_completion_request(body)
                prompt = parsed.prompt_text
            gw = self.settings.gateway
            max_tokens = resolve_max_tokens(
                parsed, default=gw.default_max_tokens, limit=gw.max_tokens_limit
            )
            server = self.pool.pick(parsed.model)
            if server is None:
                raise _Refused(
                    _error(
                        404,
                        f"The model {parsed.model!r} does not exist on this gateway "
                        f"(served: {', '.join(self.pool.models) or 'none'}).",
                        param="model",
                        code="model_not_found",
                    )
                )
        except _Refused as refused:
            return refused.response
        except InvalidRequest as exc:
            return _error(400, exc.message, param=exc.param)

        request_id = uuid.uuid4().hex
        generation = Generation(
            self.backend,
            server,
            BackendRequest(
                request_id=request_id,
                model=parsed.model,
                prompt=prompt,
                max_tokens=max_tokens,
                parameters=_test_parameters(request),
            ),
            self.clock,
        )
        call = _Call(self, record, generation, arrival, parsed, max_tokens, chat)
        if parsed.stream:
            return _StreamResponse(call)
        return await call.unary(request.receive)


#: Triton request parameters a client may set, as `X-Gpuledger-Triton-Param-<name>`
#: headers (integers): the demo model's test hooks. Nothing else passes through.
TRITON_TEST_PARAMETERS = frozenset({"fail_after_tokens"})
_PARAM_HEADER = "x-gpuledger-triton-param-"


def _test_parameters(request: Request) -> dict[str, int | str | bool | float]:
    out: dict[str, int | str | bool | float] = {}
    for name, value in request.headers.items():
        if not name.startswith(_PARAM_HEADER):
            continue
        parameter = name.removeprefix(_PARAM_HEADER).replace("-", "_")
        if parameter in TRITON_TEST_PARAMETERS and value.strip().isdigit():
            out[parameter] = int(value)
    return out


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _race_disconnect(work: Awaitable[None], receive: Receive) -> bool:
    """Run `work` in this task until done or the client disconnects (then cancel it):
    True when the client left first.

    The work runs in the caller's task and a watcher cancels that task when the client
    leaves: one task and no `asyncio.wait` per request (0.14 ms less added latency than
    running the work as a task of its own, bench/gateway.py)."""
    task = asyncio.current_task()
    assert task is not None
    left = False

    async def watch() -> None:
        nonlocal left
        await _until_disconnect(receive)
        left = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    except asyncio.CancelledError:
        # Ours alone: the client left. Also cancelled from outside (server shutdown)?
        # Then the count stays above zero and it propagates.
        if left and task.uncancel() == 0:
            return True
        raise
    finally:
        watcher.cancel()
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            log.debug("watching for the client leaving failed: %s", watcher.exception())
    return False


class _Call:
    """One admitted request: run it on Triton, meter it, answer it."""

    def __init__(
        self,
        gateway: _Gateway,
        record: ApiKeyRecord,
        generation: Generation,
        arrival: datetime,
        parsed: CompletionRequest | ChatCompletionRequest,
        max_tokens: int,
        chat: bool,
    ) -> None:
        self.gw = gateway
        self.record = record
        self.generation = generation
        self.arrival = arrival
        self.parsed = parsed
        self.max_tokens = max_tokens
        self.chat = chat
        self.request_id = generation.request.request_id
        self.created = int(arrival.timestamp())

    @property
    def server(self) -> TritonServerSettings:
        return self.generation.server

    def event(self) -> UsageEvent:
        g = self.generation
        end = g.end_time or self.gw.clock()
        return build_usage_event(
            request_id=self.request_id,
            tenant=self.record.tenant,
            server_name=self.server.server_name,
            model=self.parsed.model,
            model_version=self.server.model_version,
            hostname=self.server.hostname,
            gpu_uuids=self.server.gpu_uuids,
            prompt_tokens=g.prompt_tokens,
            completion_tokens=g.completion_tokens,
            arrival_time=self.arrival,
            first_token_time=g.first_token_time,
            end_time=max(end, self.arrival),
            status=g.status,
        )

    async def meter(self) -> bool:
        """Write the usage event durably; False when it could not be written."""
        g = self.generation
        self.gw.outcomes[g.status] += 1
        log.info(
            "request %s key glk_%s_… tenant %s model %s on %s: %s, %d prompt + %d completion "
            "tokens%s",
            self.request_id,
            self.record.key_id,
            self.record.tenant,
            self.parsed.model,
            self.server.server_name,
            g.status,
            g.prompt_tokens,
            g.completion_tokens,
            f" ({g.error})" if g.error else "",
        )
        payload = self.payload()
        if payload is None:
            return False
        try:
            # Alone in the gateway, write it here and now (one fsync, ~0.2 ms, with the
            # loop waiting: nobody else is); otherwise group-commit it on the thread.
            alone = self.gw.activity.inflight() == 0
            if alone and self.gw.writer.write_if_idle(payload) is not None:
                return True
            # Queued synchronously: a cancellation of this task after it cannot lose it.
            await asyncio.wrap_future(self.gw.writer.submit(payload))
        except (RuntimeError, OSError, GpuledgerError) as exc:
            self._not_recorded(exc)
            return False
        return True

    def payload(self) -> bytes | None:
        """The usage event's JSON; None (and said so) if it does not validate."""
        try:
            return self.event().to_json_bytes()
        except ValidationError as exc:
            self._not_recorded(exc)
            return None

    def _not_recorded(self, exc: Exception) -> None:
        log.error("request %s: usage event NOT recorded: %s", self.request_id, exc)
        self.gw.outcomes["unmetered"] += 1

    def submit(self) -> concurrent.futures.Future[int] | None:
        """Queue the usage event for the spool, synchronously: a cancellation of the
        request's task after this cannot lose it."""
        payload = self.payload()
        if payload is None:
            return None
        try:
            return self.gw.writer.submit(payload)
        except RuntimeError as exc:
            self._not_recorded(exc)
            return None

    def cancelled(self) -> None:
        """The request's task is being cancelled (server shutdown): meter what ran."""
        self.generation.status = "cancelled"
        self.gw.outcomes["cancelled"] += 1
        self.submit()

    def _unmetered(self) -> JSONResponse:
        return _error(
            503,
            "The request ran but its usage could not be recorded; it is not billed. Retry later.",
            error_type="server_error",
            code="usage_not_recorded",
        )

    def _unavailable(self, exc: TritonUnavailable) -> JSONResponse:
        log.warning("request %s: %s", self.request_id, exc)
        return _error(
            503,
            f"The model server for {self.parsed.model!r} is unreachable; retry later.",
            error_type="server_error",
            code="model_server_unavailable",
        )

    @contextlib.asynccontextmanager
    async def _active(self) -> AsyncIterator[None]:
        token = self.gw.activity.begin(self.server.gpu_uuids)
        try:
            yield
        finally:
            self.gw.activity.end(token)

    def _headers(self) -> dict[str, str]:
        return {"X-Request-Id": self.request_id}

    # -- a JSON answer ---------------------------------------------------------------

    async def unary(self, receive: Receive) -> Response:
        pieces: list[str] = []

        async def work() -> None:
            async for piece in self.generation.text():
                pieces.append(piece)

        try:
            async with self._active():
                await _race_disconnect(work(), receive)
        except TritonUnavailable as exc:
            return self._unavailable(exc)
        except asyncio.CancelledError:
            self.cancelled()
            raise
        if not await self.meter():
            return self._unmetered()
        g = self.generation
        if g.status == "error":
            return _error(
                502,
                f"The model server failed: {g.error}",
                error_type="server_error",
                code="model_server_error",
                headers=self._headers(),
            )
        build = chat_completion_response if self.chat else completion_response
        body = build(
            request_id=self.request_id,
            model=self.parsed.model,
            created=self.created,
            text="".join(pieces),
            prompt_tokens=g.prompt_tokens,
            completion_tokens=g.completion_tokens,
            finish=finish_reason(g.completion_tokens, self.max_tokens),
        )
        # A cancelled request gets this too; the client is gone and never reads it.
        return JSONResponse(body, headers=self._headers())

    # -- a stream --------------------------------------------------------------------

    def chunk(self, *, text: str | None = None, finish: str | None = None) -> dict[str, Any]:
        common = {
            "request_id": self.request_id,
            "model": self.parsed.model,
            "created": self.created,
            "finish": finish,
            "include_usage": self.parsed.include_usage,
        }
        if not self.chat:
            return completion_chunk(text=text, **common)  # type: ignore[arg-type]
        delta = {} if text is None else {"content": text}
        return chat_chunk(delta=delta, **common)  # type: ignore[arg-type]

    def usage_chunk(self) -> dict[str, Any]:
        usage = usage_block(self.generation.prompt_tokens, self.generation.completion_tokens)
        build = chat_chunk if self.chat else completion_chunk
        return build(
            request_id=self.request_id, model=self.parsed.model, created=self.created, usage=usage
        )

    async def stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def start() -> None:
            nonlocal started
            if not started:
                started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                            (b"x-request-id", self.request_id.encode()),
                        ],
                    }
                )

        async def emit(document: dict[str, Any] | bytes, *, last: bool = False) -> None:
            await start()
            body = document if isinstance(document, bytes) else sse(document)
            await send({"type": "http.response.body", "body": body, "more_body": not last})

        async def work() -> None:
            first = True
            async for piece in self.generation.text():
                document = self.chunk(text=piece)
                if first and self.chat:
                    document["choices"][0]["delta"] = {"role": "assistant", "content": piece}
                first = False
                await emit(document)

        try:
            async with self._active():
                gone = await _race_disconnect(work(), receive)
        except TritonUnavailable as exc:
            await self._unavailable(exc)(scope, receive, send)
            return
        except asyncio.CancelledError:
            self.cancelled()
            raise
        except OSError:  # a server that reports a closed connection by failing `send`
            gone = True
        if gone:
            self.generation.status = "cancelled"
        metered = await self.meter()
        if gone:
            return
        if not metered:
            error = error_body(
                "usage could not be recorded; the request is not billed",
                error_type="server_error",
                code="usage_not_recorded",
            )
            await emit(error, last=True)
            return
        g = self.generation
        if g.status == "ok":
            await emit(self.chunk(finish=finish_reason(g.completion_tokens, self.max_tokens)))
            if self.parsed.include_usage:
                await emit(self.usage_chunk())
        else:
            await emit(
                error_body(
                    f"The model server failed: {g.error}",
                    error_type="server_error",
                    code="model_server_error",
                )
            )
        await emit(SSE_DONE, last=True)


class _StreamResponse(Response):
    """A Server-Sent Events answer driven by `_Call.stream` (which watches for the client
    leaving on every server, whatever ASGI spec version it speaks)."""

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.call.stream(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    backend: Backend | None = None,
    spool: Spool | None = None,
    clock: Clock = _utc_now,
    monotonic: Callable[[], float] = time.monotonic,
    on_spooled: Callable[[], None] | None = None,
) -> Starlette:
    """The gateway app. `backend` defaults to Triton over gRPC; `spool` to one at
    `settings.spool_path` (opened here and closed at shutdown; a given spool is the
    caller's to close). `on_spooled` is called after each group commit (the forwarder's
    wake-up). `app.state.activity` is the in-flight tracker."""
    owned_spool = spool is None
    the_spool = spool if spool is not None else Spool(settings.spool_path)
    the_backend: Backend = backend or TritonBackend(timeout_s=settings.gateway.request_timeout_s)
    writer = SpoolWriter(the_spool, on_written=on_spooled)
    gateway = _Gateway(
        settings, the_backend, writer, KeyStore(settings.api_keys_path), clock, monotonic
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(writer.close)
            await the_backend.aclose()
            if owned_spool:
                the_spool.close()

    app = Starlette(
        routes=[
            Route("/v1/completions", gateway.completions, methods=["POST"]),
            Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
            Route("/v1/models", gateway.models, methods=["GET"]),
            Route("/healthz", gateway.healthz, methods=["GET"]),
            Route("/stats", gateway.stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.activity = gateway.activity
    app.state.spool_writer = writer
    app.state.gateway = gateway
    app.state.forwarder = None
    return app
