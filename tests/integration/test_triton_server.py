"""The real Triton server (nvidia-pytriton's tritonserver 2.51) serving demo-llm.

One server for the module, paced at 10 ms per generated token so that streams take
long enough to overlap and to be cancelled mid-way; requests stay short otherwise.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio

from ingest.triton import (
    DEMO_MODEL,
    TritonNotInstalled,
    TritonServer,
    triton_install,
    write_model_repository,
)
from models.demo_tokenizer import count_tokens
from models.errors import InputError, ServiceError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DECODE_S_PER_TOKEN = 0.01
METRIC_LABELS = f'{{model="{DEMO_MODEL}",version="1"}}'


@pytest.fixture(scope="module")
def installed() -> None:
    try:
        triton_install()
    except TritonNotInstalled as exc:
        pytest.skip(exc.message)


@pytest.fixture(scope="module")
def server(installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(
        tmp_path_factory.mktemp("triton"),
        prefill_s_per_token=0.0001,
        decode_s_per_token=DECODE_S_PER_TOKEN,
    ) as running:
        yield running


@dataclass
class Stream:
    """Everything one request's stream delivered, with arrival times (monotonic s)."""

    tokens: list[str] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    num_input_tokens: set[int] = field(default_factory=set)
    num_output_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    final_time: float | None = None


def _inputs(module: Any, prompt: str, max_tokens: int) -> list[Any]:
    prompt_input = module.InferInput("prompt", [1], "BYTES")
    prompt_input.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    max_tokens_input = module.InferInput("max_tokens", [1], "INT32")
    max_tokens_input.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    return [prompt_input, max_tokens_input]


def _record(stream: Stream, result: Any, error: Any) -> bool:
    """Add one streamed response to `stream`; True when it was the final one."""
    now = time.monotonic()
    if error is not None:
        stream.errors.append(str(error))
        return False
    response = result.get_response()
    if response.parameters["triton_final_response"].bool_param:
        stream.final_time = now
        return True
    stream.tokens.append(result.as_numpy("text_output")[0].decode())
    stream.token_times.append(now)
    stream.num_input_tokens.add(int(result.as_numpy("num_input_tokens")[0]))
    stream.num_output_tokens += int(result.as_numpy("num_output_tokens")[0])
    return False


def run_stream(
    server: TritonServer,
    prompt: str,
    max_tokens: int,
    *,
    request_id: str = "r",
    parameters: dict[str, Any] | None = None,
    cancel_after_tokens: int | None = None,
    timeout_s: float = 30.0,
) -> Stream:
    """One request on a stream of its own, as the gateway sends them; with
    `cancel_after_tokens`, the stream is cancelled once that many tokens arrived."""
    stream = Stream()
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        if _record(stream, result, error):
            done.set()
        if cancel_after_tokens is not None and len(stream.tokens) >= cancel_after_tokens:
            done.set()

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=callback)
        client.async_stream_infer(
            DEMO_MODEL,
            _inputs(grpcclient, prompt, max_tokens),
            request_id=request_id,
            enable_empty_final_response=True,
            parameters=parameters,
        )
        assert done.wait(timeout_s), f"stream {request_id} did not finish in {timeout_s} s"
        client.stop_stream(cancel_requests=cancel_after_tokens is not None)
    finally:
        client.close()
    return stream


def metric(server: TritonServer, name: str) -> float:
    text = httpx.get(server.metrics_url, timeout=5).text
    match = re.search(rf"^{name}{re.escape(METRIC_LABELS)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}{METRIC_LABELS} not in {server.metrics_url}"
    return float(match.group(1))


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def cancelled_after(server: TritonServer, request_id: str) -> int | None:
    """K from the model's log line "request '<id>' cancelled after K of N tokens"."""
    text = server.log_path.read_text(errors="replace")
    match = re.search(rf"request '{re.escape(request_id)}' cancelled after (\d+) of", text)
    return None if match is None else int(match.group(1))


def test_stream_delivers_max_tokens_with_the_prompt_count(server: TritonServer) -> None:
    prompt = "Summarise the GPU invoice for tenant acme-corp, please."
    stream = run_stream(server, prompt, 12, request_id="plain")

    assert stream.errors == []
    assert len(stream.tokens) == 12
    assert stream.num_output_tokens == 12
    assert stream.num_input_tokens == {count_tokens(prompt)}
    assert count_tokens("".join(stream.tokens)) == 12  # each response is one token
    assert stream.final_time is not None and stream.final_time >= stream.token_times[-1]
    # Deterministic: the same prompt streams the same text.
    assert run_stream(server, prompt, 12, request_id="again").tokens == stream.tokens


def test_concurrent_streams_overlap(server: TritonServer) -> None:
    # Guards against generating inside execute(), which serialises streams: then the
    # second stream's first token would come only after the first stream finished.
    streams: list[Stream] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        stream = run_stream(server, f"prompt number {index}", 50, request_id=f"c{index}")
        with lock:
            streams.append(stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(streams) == 4
    assert all(len(s.tokens) == 50 and s.errors == [] for s in streams)
    last_first_token = max(s.token_times[0] for s in streams)
    first_finish = min(s.final_time for s in streams if s.final_time is not None)
    assert last_first_token < first_finish


def test_max_tokens_below_one_is_an_error(server: TritonServer) -> None:
    stream = run_stream(server, "hello", 0, request_id="zero")

    assert stream.tokens == []
    assert stream.errors == ["max_tokens must be >= 1"]
    assert stream.final_time is not None  # the empty final response follows the error


def test_injected_failure_after_three_tokens(server: TritonServer) -> None:
    stream = run_stream(
        server, "hello", 10, request_id="fail3", parameters={"fail_after_tokens": 3}
    )

    assert len(stream.tokens) == 3
    assert stream.errors == ["injected failure after 3 tokens"]
    assert stream.final_time is not None


def test_cancelling_the_stream_stops_the_model(server: TritonServer) -> None:
    stream = run_stream(server, "a long answer", 500, request_id="cancel", cancel_after_tokens=3)

    eventually(lambda: cancelled_after(server, "cancel") is not None, "the model to log it")
    stopped_at = cancelled_after(server, "cancel")
    assert stopped_at is not None and 3 <= stopped_at < 50  # 500 would take 5 s
    assert len(stream.tokens) < 50


def test_aio_stream_cancel_stops_the_model(server: TritonServer) -> None:
    # The gateway may use the asyncio client: its stream_infer(...).cancel() must reach
    # the model too. (It cannot ask for empty final responses: `triton_*` request
    # parameters are reserved in tritonclient.)
    async def scenario() -> int:
        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": DEMO_MODEL,
                "inputs": _inputs(grpcclient_aio, "a long answer", 500),
                "request_id": "aio-cancel",
            }

        async with grpcclient_aio.InferenceServerClient(server.grpc_url) as client:
            responses = client.stream_infer(requests())
            tokens = 0
            async for result, error in responses:
                assert error is None, error
                tokens += int(result.as_numpy("num_output_tokens")[0])
                if tokens == 3:
                    responses.cancel()
                    break
            return tokens

    assert asyncio.run(scenario()) == 3
    eventually(lambda: cancelled_after(server, "aio-cancel") is not None, "the model to log it")
    stopped_at = cancelled_after(server, "aio-cancel")
    assert stopped_at is not None and 3 <= stopped_at < 50


def test_metrics_count_every_request_as_a_success(server: TritonServer) -> None:
    # Triton 2.51 counts a decoupled request once in nv_inference_request_success when
    # it is released, whether it ended normally, with an error or cancelled;
    # nv_inference_request_failure stays 0 for the Python backend. Token counts and
    # outcomes must therefore come from the streams themselves (the gateway).
    success_before = metric(server, "nv_inference_request_success")
    run_stream(server, "ok", 3, request_id="m-ok")
    run_stream(server, "bad", 0, request_id="m-error")
    run_stream(server, "fail", 5, request_id="m-fail", parameters={"fail_after_tokens": 1})
    run_stream(server, "cancel", 500, request_id="m-cancel", cancel_after_tokens=1)
    eventually(lambda: cancelled_after(server, "m-cancel") is not None, "the cancellation")

    eventually(
        lambda: metric(server, "nv_inference_request_success") - success_before == 4,
        "nv_inference_request_success to count the 4 requests",
    )
    time.sleep(0.2)
    assert metric(server, "nv_inference_request_success") - success_before == 4
    text = httpx.get(server.metrics_url, timeout=5).text
    failures = re.findall(
        rf'^nv_inference_request_failure{{model="{DEMO_MODEL}".*? (\S+)$', text, re.M
    )
    assert failures and all(float(value) == 0 for value in failures)


def test_server_addresses_and_process(server: TritonServer) -> None:
    assert server.alive()
    assert server.pid is not None and psutil.pid_exists(server.pid)
    assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"
    assert httpx.get(f"{server.http_url}/v2/health/ready", timeout=5).status_code == 200
    assert server.metrics_url.endswith("/metrics")
    assert "Started GRPCInferenceService" in server.log_path.read_text(errors="replace")
    config = (server.model_repository / DEMO_MODEL / "config.pbtxt").read_text()
    assert f'string_value: "{DECODE_S_PER_TOKEN!r}"' in config


def test_a_given_port_in_use_is_refused(installed: None, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        triton = TritonServer(tmp_path, grpc_port=port)
        with pytest.raises(ServiceError, match=rf"port {port} .* in use"):
            triton.start()
        assert not triton.alive()


@pytest.mark.slow  # 7 s: starts Triton three times
def test_a_picked_port_taken_meanwhile_is_picked_again(
    installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guards the race between picking a free port and the server binding it.
    import ingest.triton.server as server_module

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken])
        pick_free = server_module.find_free_port
        monkeypatch.setattr(
            server_module, "find_free_port", lambda: next(picks, None) or pick_free()
        )
        with TritonServer(tmp_path) as triton:
            assert taken not in (triton.grpc_port, triton.http_port, triton.metrics_port)
        assert "already in use" in triton.log_path.read_text(errors="replace")


def test_missing_venv_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(TritonNotInstalled, match="make triton-deps"):
        TritonServer(tmp_path / "work", venv_dir=tmp_path / "no-venv").start()


def test_pace_overrides_are_written_and_checked(tmp_path: Path) -> None:
    repo = write_model_repository(tmp_path / "repo", decode_s_per_token=0.005)
    config = (repo / DEMO_MODEL / "config.pbtxt").read_text()
    assert 'string_value: "0.005"' in config
    assert 'string_value: "0.0002"' in config  # prefill keeps the packaged default
    with pytest.raises(InputError, match="decode_s_per_token"):
        TritonServer(tmp_path, decode_s_per_token=-1.0)


def _long_stream(grpc_url: str, errors: list[str]) -> grpcclient.InferenceServerClient:
    """A client whose stream stays open on a 100 s request; errors land in `errors`."""
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: error and errors.append(str(error)))
    client.async_stream_infer(DEMO_MODEL, _inputs(grpcclient, "long", 10_000))
    return client


def _stub_shm_regions(stubs: list[psutil.Process]) -> list[Path]:
    return [
        Path("/dev/shm", arg)
        for stub in stubs
        for arg in stub.cmdline()
        if arg.startswith("triton_python_backend_shm_region_")
    ]


def _gone(process: psutil.Process) -> bool:
    return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow  # 6 s: waits out Triton's exit timeout
def test_stop_with_an_open_stream_leaves_nothing_behind(installed: None, tmp_path: Path) -> None:
    # Triton 2.51 hangs on SIGTERM while a gRPC stream is open; guards against the
    # SIGKILL that follows leaving the backend stub deadlocked with its /dev/shm region.
    triton = TritonServer(tmp_path, decode_s_per_token=DECODE_S_PER_TOKEN).start()
    assert triton.pid is not None
    stubs = psutil.Process(triton.pid).children(recursive=True)
    regions = _stub_shm_regions(stubs)
    assert stubs and regions, "the Python backend stub should run as the server's child"
    errors: list[str] = []
    client = _long_stream(triton.grpc_url, errors)
    try:
        time.sleep(0.2)
        started = time.monotonic()
        triton.stop()
        assert time.monotonic() - started < triton.stop_timeout_s + 5
        assert not triton.alive()
        assert all(_gone(stub) for stub in stubs)
        assert not any(region.exists() for region in regions)
        eventually(lambda: bool(errors), "the open stream to fail")
    finally:
        client.close()


def test_server_dies_with_its_owner(installed: None, tmp_path: Path) -> None:
    # A test run killed by a timeout must not leave a server (holding ports) or its
    # stub behind: setpriv's parent-death signal kills the server, and the model's
    # watchdog the stub.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ingest.triton import TritonServer\n"
        "server = TritonServer(Path(sys.argv[1]), decode_s_per_token=0.01).start()\n"
        "print(server.grpc_url, server.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    client = None
    try:
        assert owner.stdout is not None
        grpc_url, pid_text = owner.stdout.readline().split()
        server = psutil.Process(int(pid_text))
        stubs = server.children(recursive=True)
        regions = _stub_shm_regions(stubs)
        errors: list[str] = []
        client = _long_stream(grpc_url, errors)
        time.sleep(0.2)
        owner.kill()
        owner.wait()
        eventually(lambda: _gone(server), "the server to die", timeout_s=10)
        eventually(lambda: all(_gone(stub) for stub in stubs), "the stub to exit", timeout_s=10)
        assert not any(region.exists() for region in regions)
        eventually(lambda: bool(errors), "the open stream to fail")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if client is not None:
            client.close()
