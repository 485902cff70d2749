"""The metering gateway's HTTP app (ingest/gateway/app.py) over an in-memory Triton that
obeys the model contract: OpenAI shapes, one durable usage event per request that
reached Triton (tenant from the key, tokens actually produced, status), none for
refused requests, and keys never in logs or spool files."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from ingest.gateway.app import KeyScrubber, create_app
from ingest.gateway.keys_file import add_key, revoke_key
from ingest.gateway.spool import Spool
from ingest.settings import Settings, TritonServerSettings
from models.usage_event import UsageEvent, parse_usage_event
from tests.conftest import SettingsFactory
from tests.unit.gateway_fakes import FakeTriton

NOW = datetime(2026, 12, 1, tzinfo=UTC)
GPUS = ["GPU-11111111-aaaa", "GPU-22222222-bbbb"]
MODEL = "demo-llm"


@pytest.fixture
def gw_settings(settings_factory: SettingsFactory) -> Settings:
    server = TritonServerSettings(
        grpc_url="triton-a:8001", hostname="gpu-host-a", gpu_uuids=GPUS, models=[MODEL]
    )
    return settings_factory(gateway={"servers": [server.model_dump()], "max_tokens_limit": 64})


@pytest.fixture
def key(gw_settings: Settings) -> str:
    key, _ = add_key(gw_settings.api_keys_path, "acme", NOW)
    return key


def events(settings: Settings) -> list[UsageEvent]:
    spool = Spool(settings.spool_path)
    try:
        return [parse_usage_event(payload) for _, payload in spool.pending()]
    finally:
        spool.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client_factory(gw_settings: Settings) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(backend: FakeTriton | None = None, **kwargs: Any) -> TestClient:
        app = create_app(gw_settings, backend=backend or FakeTriton(), **kwargs)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def parse_sse(text: str) -> list[Any]:
    out: list[Any] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completion_answers_in_openai_shape_and_spools_one_event(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory()
    body = {"model": MODEL, "prompt": "one two three", "max_tokens": 5}
    response = client.post("/v1/completions", json=body, headers=auth(key))
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["object"] == "text_completion" and doc["id"].startswith("cmpl-")
    assert doc["choices"][0]["text"] == "t0 t1 t2 t3 t4 "
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    client.__exit__(None, None, None)
    [event] = events(gw_settings)
    assert event.id == doc["id"].removeprefix("cmpl-") == response.headers["x-request-id"]
    assert event.subject == "acme"
    assert event.source == f"triton://triton-a:8001/v2/models/{MODEL}"
    d = event.data
    assert (d.prompt_tokens, d.completion_tokens, d.status) == (3, 5, "ok")
    assert d.gpu_uuids == GPUS and d.hostname == "gpu-host-a" and d.model_version == "1"
    assert d.first_token_time is not None
    assert d.arrival_time <= d.first_token_time <= d.end_time == event.time


def test_chat_completion_non_stream(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient]
) -> None:
    backend = FakeTriton()
    client = client_factory(backend)
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 2,
    }
    response = client.post("/v1/chat/completions", json=body, headers=auth(key))
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["object"] == "chat.completion" and doc["id"].startswith("chatcmpl-")
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "t0 t1 "}
    prompt = backend.calls[0][1].prompt
    assert prompt == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    n_in = FakeTriton.prompt_tokens(prompt)
    assert doc["usage"] == {"prompt_tokens": n_in, "completion_tokens": 2, "total_tokens": n_in + 2}
    client.__exit__(None, None, None)
    [event] = events(gw_settings)
    assert (event.data.prompt_tokens, event.data.completion_tokens) == (n_in, 2)


@pytest.mark.parametrize("chat", [False, True])
def test_streams_end_with_usage_and_done(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient], chat: bool
) -> None:
    client = client_factory()
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 3, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": "a b"}]
    else:
        body["prompt"] = ["a b"]
    response = client.post(path, json=body, headers=auth(key))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(response.text)
    assert chunks[-1] == "[DONE]"
    usage_chunk, finish_chunk = chunks[-2], chunks[-3]
    assert usage_chunk["choices"] == []
    if chat:
        texts = [c["choices"][0]["delta"].get("content") for c in chunks[:3]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[0]["object"] == "chat.completion.chunk"
        n_in = FakeTriton.prompt_tokens("<|user|>\na b\n<|assistant|>\n")
    else:
        texts = [c["choices"][0]["text"] for c in chunks[:3]]
        n_in = 2
    assert texts == ["t0 ", "t1 ", "t2 "]
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["usage"] == {
        "prompt_tokens": n_in,
        "completion_tokens": 3,
        "total_tokens": n_in + 3,
    }
    client.__exit__(None, None, None)
    [event] = events(gw_settings)
    assert (event.data.status, event.data.completion_tokens, event.subject) == ("ok", 3, "acme")


def test_missing_invalid_and_revoked_keys_get_401_and_no_event(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory()
    body = {"model": MODEL, "prompt": "x"}
    other, record = add_key(gw_settings.api_keys_path, "globex", NOW)
    revoke_key(gw_settings.api_keys_path, record.key_id, NOW)
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    for headers in ({}, {"Authorization": key}, auth(tampered), auth(other), auth("nope")):
        response = client.post("/v1/completions", json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/healthz").status_code == 200
    client.__exit__(None, None, None)
    assert events(gw_settings) == []


def test_a_revocation_applies_to_the_next_request(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert client.post("/v1/completions", json=body, headers=auth(key)).status_code == 200
    revoke_key(gw_settings.api_keys_path, key.split("_")[1], NOW)
    assert client.post("/v1/completions", json=body, headers=auth(key)).status_code == 401


def test_the_body_cannot_choose_the_billed_tenant(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient]
) -> None:
    """Guards against billing a request to a tenant named by the client."""
    client = client_factory()
    body = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 1,
        "user": "globex",
        "tenant": "globex",
        "subject": "globex",
        "metadata": {"tenant": "globex"},
    }
    headers = {**auth(key), "X-Tenant": "globex", "OpenAI-Organization": "globex"}
    assert client.post("/v1/completions", json=body, headers=headers).status_code == 200
    client.__exit__(None, None, None)
    assert [e.subject for e in events(gw_settings)] == ["acme"]


def test_rate_limit_answers_429_with_retry_after_and_no_event(
    gw_settings: Settings, client_factory: Callable[..., TestClient]
) -> None:
    key, _ = add_key(gw_settings.api_keys_path, "acme", NOW, rate_per_s=0.5, burst=2)
    client = client_factory(monotonic=lambda: 100.0)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    codes = [
        client.post("/v1/completions", json=body, headers=auth(key)).status_code for _ in range(2)
    ]
    refused = client.post("/v1/completions", json=body, headers=auth(key))
    assert codes == [200, 200]
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    client.__exit__(None, None, None)
    assert len(events(gw_settings)) == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"model": "demo-llm", "prompt": "x", "max_tokens": 65}', "max_tokens"),
        (b'{"model": "demo-llm", "prompt": ["a", "b"]}', "prompt"),
        (b'{"model": "demo-llm"}', "prompt"),
        (b'{"model": "demo-llm", "prompt": "x", "max_tokens": 0}', "max_tokens"),
    ],
)
def test_invalid_bodies_get_400_naming_the_field_and_no_event(
    gw_settings: Settings,
    key: str,
    client_factory: Callable[..., TestClient],
    body: bytes,
    param: str | None,
) -> None:
    backend = FakeTriton()
    client = client_factory(backend)
    response = client.post("/v1/completions", content=body, headers=auth(key))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    if param:
        assert param in error["message"]
    assert backend.calls == []
    client.__exit__(None, None, None)
    assert events(gw_settings) == []


def test_unknown_model_is_404_model_not_found(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory()
    response = client.post(
        "/v1/completions", json={"model": "gpt-9", "prompt": "x"}, headers=auth(key)
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    models = client.get("/v1/models", headers=auth(key)).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    client.__exit__(None, None, None)
    assert events(gw_settings) == []


def test_an_unreachable_triton_is_503_and_no_event(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(FakeTriton(unreachable=True))
    for stream in (False, True):
        body = {"model": MODEL, "prompt": "x", "stream": stream}
        response = client.post("/v1/completions", json=body, headers=auth(key))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_server_unavailable"
    client.__exit__(None, None, None)
    assert events(gw_settings) == []


def test_a_triton_error_mid_request_is_metered_with_the_tokens_produced(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory()
    headers = {**auth(key), "X-Gpuledger-Triton-Param-Fail-After-Tokens": "3"}
    body = {"model": MODEL, "prompt": "a b c d", "max_tokens": 10}
    unary = client.post("/v1/completions", json=body, headers=headers)
    assert unary.status_code == 502
    assert unary.json()["error"]["code"] == "model_server_error"
    streamed = client.post("/v1/completions", json={**body, "stream": True}, headers=headers)
    chunks = parse_sse(streamed.text)
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["t0 ", "t1 ", "t2 "]
    assert chunks[3]["error"]["code"] == "model_server_error" and chunks[4] == "[DONE]"
    client.__exit__(None, None, None)
    got = [
        (e.data.status, e.data.prompt_tokens, e.data.completion_tokens) for e in events(gw_settings)
    ]
    assert got == [("error", 4, 3), ("error", 4, 3)]


def test_an_error_before_any_response_records_zero_tokens(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory()
    headers = {**auth(key), "X-Gpuledger-Triton-Param-Fail-After-Tokens": "0"}
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 10}
    assert client.post("/v1/completions", json=body, headers=headers).status_code == 502
    client.__exit__(None, None, None)
    [event] = events(gw_settings)
    assert (event.data.status, event.data.prompt_tokens, event.data.completion_tokens) == (
        "error",
        0,
        0,
    )
    assert event.data.first_token_time is None


# -- the client leaving, concurrency, activity: driven through ASGI directly -------------


async def call_asgi(
    app: Starlette,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    leave_after_chunks: int | None = None,
) -> list[bytes]:
    """One HTTP request through ASGI; the client disconnects after N body chunks."""
    gone = asyncio.Event()
    sent = False
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if leave_after_chunks is not None and len(chunks) >= leave_after_chunks:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        + [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
        "state": {},
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    if leave_after_chunks == 0:
        await asyncio.sleep(0.05)
        gone.set()
    await asyncio.wait_for(task, 10)
    return chunks


def test_a_client_leaving_mid_stream_is_metered_as_cancelled(
    gw_settings: Settings, key: str
) -> None:
    backend = FakeTriton(token_delay_s=0.01)
    app = create_app(gw_settings, backend=backend)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 50, "stream": True}
    chunks = asyncio.run(call_asgi(app, "/v1/completions", body, auth(key), leave_after_chunks=4))
    app.state.spool_writer.close()
    assert all(b"[DONE]" not in c for c in chunks)
    [event] = events(gw_settings)
    assert event.data.status == "cancelled"
    assert 4 <= event.data.completion_tokens < 50
    assert event.data.prompt_tokens == 3
    assert backend.cancelled == [event.id]  # the Triton request was stopped too


def test_a_client_leaving_a_non_streamed_request_is_metered_as_cancelled(
    gw_settings: Settings, key: str
) -> None:
    backend = FakeTriton(token_delay_s=0.01)
    app = create_app(gw_settings, backend=backend)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 60}
    asyncio.run(call_asgi(app, "/v1/completions", body, auth(key), leave_after_chunks=0))
    app.state.spool_writer.close()
    [event] = events(gw_settings)
    assert event.data.status == "cancelled" and event.data.completion_tokens < 60
    assert backend.cancelled == [event.id]


def test_concurrent_requests_share_fsyncs_and_activity_tracks_gpus(
    gw_settings: Settings, key: str
) -> None:
    backend = FakeTriton()
    app = create_app(gw_settings, backend=backend)
    n = 40

    async def scenario() -> None:
        backend.release = asyncio.Event()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            body = {"model": MODEL, "prompt": "a", "max_tokens": 2}
            tasks = [
                asyncio.ensure_future(client.post("/v1/completions", json=body, headers=auth(key)))
                for _ in range(n)
            ]
            while app.state.activity.inflight() < n:
                await asyncio.sleep(0.005)
            share = app.state.activity.inflight_by_gpu()
            assert share == pytest.approx({gpu: n / len(GPUS) for gpu in GPUS})
            backend.release.set()
            responses = await asyncio.gather(*tasks)
        assert all(r.status_code == 200 for r in responses)
        assert app.state.activity.inflight() == 0

    asyncio.run(scenario())
    writer = app.state.spool_writer
    writer.close()
    assert writer.written == n
    assert writer.batches < n  # group commit: fewer fsyncs than events
    assert len({e.id for e in events(gw_settings)}) == n


def test_keys_never_reach_logs_or_the_spool(
    gw_settings: Settings,
    key: str,
    client_factory: Callable[..., TestClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    other, record = add_key(gw_settings.api_keys_path, "globex", NOW)
    revoke_key(gw_settings.api_keys_path, record.key_id, NOW)
    client = client_factory(FakeTriton())
    body = {"model": MODEL, "prompt": "a", "max_tokens": 2}
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    for presented in (key, other, tampered):
        client.post("/v1/completions", json=body, headers=auth(presented))
        client.post("/v1/completions", json={**body, "stream": True}, headers=auth(presented))
    failing = {**auth(key), "X-Gpuledger-Triton-Param-Fail-After-Tokens": "1"}
    client.post("/v1/completions", json=body, headers=failing)
    client.post(f"/v1/completions?api_key={key}", content=b"{bad", headers=auth(key))
    client.__exit__(None, None, None)
    # The test's own HTTP client (httpx) logs the URL it calls; the server side must not.
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert server_side, "expected the gateway to log something"
    text = "\n".join(
        r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in server_side
    )
    for secret in (key, other, tampered):
        tail = secret[len("glk_0123456789ab_") :]
        assert tail not in text
        for path in gw_settings.spool_path.rglob("*"):
            if path.is_file():
                assert tail.encode() not in path.read_bytes(), path
    assert f"glk_{key.split('_')[1]}_…" in text  # the redacted id is what is logged


def test_the_log_scrubber_redacts_a_key_in_any_log_line() -> None:
    key = "glk_0123456789ab_" + "x" * 32
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '"%s" %d', (f"GET /?k={key}", 200), None
    )
    KeyScrubber().filter(record)
    assert record.getMessage() == '"GET /?k=glk_0123456789ab_…" 200'


def test_spool_files_are_written_before_the_answer(
    gw_settings: Settings, key: str, client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Guards against answering a request whose usage is not yet on disk."""
    client = client_factory()
    body = {"model": MODEL, "prompt": "a", "max_tokens": 1}
    for _ in range(3):
        response = client.post("/v1/completions", json=body, headers=auth(key))
        request_id = response.json()["id"].removeprefix("cmpl-")
        # Read back by a second reader while the app is still running.
        assert request_id in {e.id for e in events(gw_settings)}


# -- the server: real uvicorn on a free port, fake Triton and Kafka -----------------------


def test_gateway_thread_serves_meters_forwards_and_stops(gw_settings: Settings, key: str) -> None:
    from ingest.gateway.server import GatewayThread
    from tests.unit.test_gateway_forwarder import Broker, first_deliveries

    broker = Broker()
    with GatewayThread(gw_settings, backend=FakeTriton(), producer_factory=broker.factory) as gw:
        body = {"model": MODEL, "prompt": "a b", "max_tokens": 3, "stream": True}
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            assert client.get("/healthz").json()["status"] == "ok"
            streamed = client.post("/v1/completions", json=body, headers=auth(key))
            assert parse_sse(streamed.text)[-1] == "[DONE]"
            unary = client.post(
                "/v1/completions", json={**body, "stream": False}, headers=auth(key)
            )
            assert unary.status_code == 200
        assert gw.app.state.activity.inflight() == 0
    delivered = [parse_usage_event(v) for v in first_deliveries(broker)]
    assert [e.subject for e in delivered] == ["acme", "acme"]
    assert events(gw_settings) == []  # all forwarded and acknowledged


def test_serve_refuses_a_port_in_use_and_a_config_without_servers(
    gw_settings: Settings, key: str, settings_factory: SettingsFactory
) -> None:
    import socket

    from ingest.gateway.server import Gateway
    from models.errors import InputError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=rf"--port: 127.0.0.1:{port} is already in use"):
            Gateway(gw_settings, host="127.0.0.1", port=port, configure_logging=False)
    with pytest.raises(InputError, match=r"\[gateway\] servers"):
        Gateway(settings_factory("bare"), host="127.0.0.1", port=0, configure_logging=False)


def test_cli_serve_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.upper().startswith("GPULEDGER_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "gpuledger.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    assert main(["gateway", "serve", "--config", str(config)]) == 2
    assert "[gateway] servers" in capsys.readouterr().err
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[[gateway.servers]]\ngrpc_url = "t:8001"\n'
        'hostname = "h"\ngpu_uuids = ["GPU-1"]\nmodels = ["demo-llm"]\n'
    )
    assert main(["--config", str(config), "gateway", "serve"]) == 2
    err = capsys.readouterr().err
    assert "api_keys.yaml does not exist" in err and "gateway keys add" in err


def test_the_real_backend_reports_an_unreachable_server_as_unavailable() -> None:
    """The tritonclient path up to the wire: request built, connection refused at once."""
    from ingest.gateway.triton_backend import (
        BackendRequest,
        Generation,
        TritonBackend,
        TritonUnavailable,
    )

    server = TritonServerSettings(
        grpc_url="127.0.0.1:1", hostname="h", gpu_uuids=["GPU-1"], models=[MODEL]
    )
    request = BackendRequest("rid", MODEL, "a b", 4, {"fail_after_tokens": 2})
    message = TritonBackend._request(server, request)
    assert message.parameters["triton_enable_empty_final_response"].bool_param

    async def run() -> None:
        backend = TritonBackend(timeout_s=5)
        try:
            with pytest.raises(TritonUnavailable, match="UNAVAILABLE"):
                await Generation(backend, server, request, lambda: NOW).collect()
        finally:
            await backend.aclose()

    asyncio.run(run())
