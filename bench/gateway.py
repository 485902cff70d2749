"""Benchmark: the latency the metering gateway adds over calling Triton directly (issue 7).

Target: at most 2 ms added at the median.

A real Triton server (the demo LLM, CPU, no pacing: prefill and decode take no time)
serves one-token requests. Measured in the same run, alternating in rounds:
- direct: the gateway's own Triton client (`TritonBackend`, a gRPC stream per request,
  ended by Triton's empty final response), called in-process: what any client of
  Triton pays;
- gateway: an OpenAI `/v1/completions` request over HTTP to the gateway (from a
  minimal keep-alive HTTP/1.1 client, and again from httpx, which costs about 1 ms of
  client-side Python per request), which checks
  the key and its limit, calls Triton the same way, builds and validates the usage
  event, writes it to the spool (fsync; group-committed while other requests are in
  flight) and answers; its forwarder sends the
  events to a real Kafka (Tansu) meanwhile. The gateway runs as deployed, in its own
  process (`gpuledger gateway serve`): in the benchmark's process its threads would
  share the client's GIL, which adds milliseconds that no deployment pays.
Latency: one request at a time (p50, p99 over --requests per round, medians of the
rounds). Throughput: --concurrency clients for --seconds, gateway and direct.

Usage: .venv/bin/python bench/gateway.py [--requests 300] [--rounds 3]
       [--concurrency 16] [--seconds 5]
Ends with one `RESULT key=value ...` line.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import httpx

from ingest.gateway.keys_file import add_key
from ingest.gateway.triton_backend import BackendRequest, TritonBackend
from ingest.settings import Settings, TritonServerSettings
from ingest.stack import LocalStack
from ingest.stack.process import find_free_port, wait_until
from ingest.triton.server import TritonServer
from pipelines.live_fleet import DEMO_MODEL, gpu_uuid

TARGET_ADDED_P50_MS = 2.0
PROMPT = "data flow gpu fast"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def direct_call(backend: TritonBackend, server: TritonServerSettings) -> None:
    request = BackendRequest(uuid.uuid4().hex, DEMO_MODEL, PROMPT, 1)
    async for _ in backend.stream(server, request):
        pass


async def gateway_call(client: httpx.AsyncClient, key: str) -> None:
    response = await client.post(
        "/v1/completions",
        json={"model": DEMO_MODEL, "prompt": PROMPT, "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}"},
    )
    if response.status_code != 200:
        raise SystemExit(f"gateway answered {response.status_code}: {response.text}")


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client for the latency rounds: httpx spends about
    1 ms of Python per request on the client side (measured against /healthz), which
    is the client's cost, not the gateway's. Measured both ways."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{head}\r\n".encode()
            + body
        )
        for _attempt in (1, 2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            self.writer.write(request)
            status_line = await self.reader.readline()
            if status_line:
                break
            # The server closed the idle keep-alive connection (uvicorn: after 5 s, e.g.
            # while a long direct round ran): connect again and resend, once.
            self.close()
            self.writer = None
        else:
            raise SystemExit(f"the gateway closed the connection twice on {path}")
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def latencies(call: Callable[[], Awaitable[None]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1000)
    return out


async def throughput(call: Callable[[], Awaitable[None]], clients: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.perf_counter() - started)


async def measure(
    args: argparse.Namespace, url: str, key: str, server: TritonServerSettings
) -> dict[str, float]:
    backend = TritonBackend(timeout_s=30)
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def direct() -> None:
            await direct_call(backend, server)

        async def gateway() -> None:
            await gateway_call(client, key)

        raw = RawHttp(url)
        body = json.dumps({"model": DEMO_MODEL, "prompt": PROMPT, "max_tokens": 1}).encode()

        async def gateway_raw() -> None:
            status, text = await raw.post(
                "/v1/completions", body, {"Authorization": f"Bearer {key}"}
            )
            if status != 200:
                raise SystemExit(f"gateway answered {status}: {text!r}")

        await latencies(direct, 50)  # warm-up: connections, model, caches
        await latencies(gateway, 50)
        await latencies(gateway_raw, 50)
        keys = ("d50", "d99", "g50", "g99", "a50", "a99", "h50", "ah50")
        rounds: dict[str, list[float]] = {k: [] for k in keys}
        for i in range(args.rounds):
            d = await latencies(direct, args.requests)
            g = await latencies(gateway_raw, args.requests)
            h = await latencies(gateway, args.requests)
            d50, d99, g50, g99 = (
                percentile(d, 50),
                percentile(d, 99),
                percentile(g, 50),
                percentile(g, 99),
            )
            h50 = percentile(h, 50)
            rounds["d50"].append(d50)
            rounds["d99"].append(d99)
            rounds["g50"].append(g50)
            rounds["g99"].append(g99)
            rounds["a50"].append(g50 - d50)
            rounds["a99"].append(g99 - d99)
            rounds["h50"].append(h50)
            rounds["ah50"].append(h50 - d50)
            print(
                f"round {i + 1}: direct p50 {d50:.3f} ms p99 {d99:.3f} ms | gateway p50 "
                f"{g50:.3f} ms p99 {g99:.3f} ms | added p50 {g50 - d50:.3f} ms "
                f"(with httpx as the client: {h50 - d50:.3f} ms)",
                flush=True,
            )
        raw.close()
        direct_rps = await throughput(direct, args.concurrency, args.seconds)
        gateway_rps = await throughput(gateway, args.concurrency, args.seconds)
    await backend.aclose()
    figures = {k: statistics.median(v) for k, v in rounds.items()}
    figures["direct_rps"] = direct_rps
    figures["gateway_rps"] = gateway_rps
    return figures


def _toml(settings_dir: Path, bootstrap: str, server: TritonServerSettings) -> str:
    uuids = ", ".join(f'"{u}"' for u in server.gpu_uuids)
    return (
        f'state_dir = "{settings_dir}"\n'
        f'[kafka]\nbootstrap_servers = "{bootstrap}"\ntopic = "gpuledger.usage.v1.bench"\n'
        f"[[gateway.servers]]\n"
        f'grpc_url = "{server.grpc_url}"\nhostname = "{server.hostname}"\n'
        f'gpu_uuids = [{uuids}]\nmodels = ["{DEMO_MODEL}"]\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    gpuledger = Path(sys.executable).with_name("gpuledger")
    with tempfile.TemporaryDirectory(prefix="gpuledger-bench-gateway-") as tmp:
        root = Path(tmp)
        state = root / "state"
        settings = Settings(state_dir=state, kafka={"topic": "gpuledger.usage.v1.bench"})
        stack = LocalStack(settings)
        stack.up()
        gateway: subprocess.Popen[bytes] | None = None
        try:
            with TritonServer(
                root / "triton", prefill_s_per_token=0.0, decode_s_per_token=0.0
            ) as triton:
                server = TritonServerSettings(
                    grpc_url=triton.grpc_url,
                    hostname="bench-node",
                    gpu_uuids=[gpu_uuid("bench-node", 0)],
                    models=[DEMO_MODEL],
                )
                key, _ = add_key(settings.api_keys_path, "bench", datetime.now(UTC))
                bootstrap = stack.kafka_bootstrap()
                assert bootstrap is not None
                config = root / "gateway.toml"
                config.write_text(_toml(state, bootstrap, server))
                port = find_free_port()
                log = (root / "gateway.log").open("wb")
                gateway = subprocess.Popen(
                    [
                        str(gpuledger),
                        "--config",
                        str(config),
                        "gateway",
                        "serve",
                        "--port",
                        str(port),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                url = f"http://127.0.0.1:{port}"

                def healthy() -> bool:
                    try:
                        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
                    except httpx.HTTPError:
                        return False

                if not wait_until(healthy, timeout_s=60):
                    raise SystemExit(
                        f"the gateway did not start: {(root / 'gateway.log').read_text()}"
                    )
                figures = asyncio.run(measure(args, url, key, server))
                stats = httpx.get(f"{url}/stats", timeout=5).json()
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(timeout=30)
            stack.down()
    forwarded = stats.get("forwarder", {}).get("forwarded", "?")
    added = figures["a50"]
    print(
        f"direct (TritonBackend, gRPC stream): p50 {figures['d50']:.3f} ms, "
        f"p99 {figures['d99']:.3f} ms; "
        f"{figures['direct_rps']:.0f} req/s at {args.concurrency} clients"
    )
    print(
        f"gateway (HTTP, auth, event, spool fsync): p50 {figures['g50']:.3f} ms, p99 "
        f"{figures['g99']:.3f} ms; {figures['gateway_rps']:.0f} req/s at {args.concurrency} clients"
    )
    print(
        f"added by the gateway: p50 {added:.3f} ms (target <= {TARGET_ADDED_P50_MS} ms), "
        f"p99 {figures['a99']:.3f} ms (with httpx as the client: p50 {figures['ah50']:.3f} ms); "
        f"{forwarded} usage events forwarded to Kafka"
    )
    print(
        "RESULT "
        f"direct_p50_ms={figures['d50']:.3f} direct_p99_ms={figures['d99']:.3f} "
        f"gateway_p50_ms={figures['g50']:.3f} gateway_p99_ms={figures['g99']:.3f} "
        f"added_p50_ms={added:.3f} added_p99_ms={figures['a99']:.3f} "
        f"added_p50_httpx_client_ms={figures['ah50']:.3f} "
        f"direct_rps={figures['direct_rps']:.0f} gateway_rps={figures['gateway_rps']:.0f} "
        f"rps_ratio={figures['gateway_rps'] / figures['direct_rps']:.2f} "
        f"target_added_p50_ms={TARGET_ADDED_P50_MS} "
        f"meets_target={'yes' if added <= TARGET_ADDED_P50_MS else 'no'} events={forwarded}"
    )


if __name__ == "__main__":
    main()
