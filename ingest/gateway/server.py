"""Running the metering gateway: spool, forwarder, app and uvicorn, started and stopped
in the right order.

Start: check the configuration (Triton servers, active API keys), bind the port (a port
in use is a one-line error, not a uvicorn exit), open the spool, start the forwarder,
serve. Stop (SIGINT/SIGTERM, or the `stop` event): uvicorn stops accepting and lets
in-flight requests finish (each writes its usage event), the app's spool writer
commits what is queued, the forwarder drains what it can within its timeout, the spool
closes. Whatever was not forwarded stays in the spool for the next start.

Logs never carry a key: the app logs key ids only, uvicorn's access log (off unless
asked for) logs no headers, and every handler has `KeyScrubber` as a last line of
defence (a key pasted into a URL is redacted too).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ingest.gateway.app import Activity, create_app
from ingest.gateway.forwarder import Forwarder, Producer
from ingest.gateway.keys_file import load_keys
from ingest.gateway.spool import Spool
from ingest.gateway.triton_backend import Backend
from ingest.settings import Settings
from models.errors import InputError, ServiceError
from models.openai_api import build_usage_event

__all__ = ["Gateway", "GatewayThread", "check_gateway_config", "log_config", "run_gateway"]


def log_config(*, access_log: bool = False, level: str = "INFO") -> dict[str, Any]:
    """uvicorn's `log_config`: our loggers and uvicorn's, each handler scrubbing keys."""
    handlers = ["stderr"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"scrub": {"()": "ingest.gateway.app.KeyScrubber"}},
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": '%(asctime)s ACCESS %(client_addr)s "%(request_line)s" %(status_code)s',
                "use_colors": False,
            },
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
                "filters": ["scrub"],
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "access",
                "stream": "ext://sys.stderr",
                "filters": ["scrub"],
            },
        },
        "loggers": {
            "uvicorn": {"handlers": handlers, "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {
                "handlers": ["access"] if access_log else [],
                "level": level if access_log else "CRITICAL",
                "propagate": False,
            },
            "gpuledger": {"handlers": handlers, "level": level, "propagate": False},
        },
    }


def check_gateway_config(settings: Settings) -> None:
    """Raise an InputError naming the setting when the gateway cannot serve."""
    servers = settings.gateway.servers
    if not servers:
        raise InputError(
            "settings: [gateway] servers is empty: add at least one Triton server to the "
            "TOML file, e.g. [[gateway.servers]] with grpc_url, hostname, gpu_uuids, models"
        )
    now = datetime.now(UTC)
    for i, server in enumerate(servers):
        for model in server.models:
            try:
                build_usage_event(
                    request_id="config-check",
                    tenant="check",
                    server_name=server.server_name,
                    model=model,
                    model_version=server.model_version,
                    hostname=server.hostname,
                    gpu_uuids=server.gpu_uuids,
                    prompt_tokens=0,
                    completion_tokens=0,
                    arrival_time=now,
                    first_token_time=None,
                    end_time=now,
                    status="ok",
                )
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise InputError(
                    f"settings: gateway.servers.{i} ({server.server_name}): its usage events "
                    f"would be invalid: {where}: {first['msg']}"
                ) from None
    path = settings.api_keys_path
    if not path.exists():
        raise InputError(
            f"API key file {path} does not exist: create a key with "
            "`gpuledger gateway keys add --tenant <tenant>`"
        )
    if not any(record.active for record in load_keys(path)):
        raise InputError(
            f"API key file {path} has no active key: create one with "
            "`gpuledger gateway keys add --tenant <tenant>`"
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on connections of such sockets.
    # Without it, Nagle holds a response's body until the client's delayed ACK of its
    # headers: 40 ms on every request (measured by bench/gateway.py).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(
                f"--port: {host}:{port} is already in use; pick another port"
            ) from None
        raise InputError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Gateway:
    """A prepared gateway: configuration checked, port bound, spool open, forwarder
    running, app built. `serve()` blocks until stopped; `close()` drains and releases."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str,
        port: int,
        backend: Backend | None = None,
        producer_factory: Callable[[], Producer] | None = None,
        access_log: bool = False,
        configure_logging: bool = True,
        graceful_timeout_s: float = 30.0,
        drain_timeout_s: float = 10.0,
    ) -> None:
        check_gateway_config(settings)
        self.settings = settings
        self.drain_timeout_s = drain_timeout_s
        self._sock = _bind(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        try:
            self.spool = Spool(settings.spool_path)
        except Exception:
            self._sock.close()
            raise
        self.forwarder = Forwarder(settings, self.spool, producer_factory=producer_factory)
        self.forwarder.start()
        self.app = create_app(
            settings, backend=backend, spool=self.spool, on_spooled=self.forwarder.wake
        )
        self.app.state.forwarder = self.forwarder
        import uvicorn

        self._config = uvicorn.Config(
            self.app,
            log_config=log_config(access_log=access_log) if configure_logging else None,
            access_log=access_log,
            timeout_graceful_shutdown=int(graceful_timeout_s),
            lifespan="on",
            server_header=False,
        )
        self._server = uvicorn.Server(self._config)
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}"

    @property
    def activity(self) -> Activity:
        activity: Activity = self.app.state.activity
        return activity

    def serve(
        self, *, ready: threading.Event | None = None, stop: threading.Event | None = None
    ) -> None:
        """Serve until SIGINT/SIGTERM (main thread) or `stop` is set, on uvloop (libuv's
        event loop: a cheaper turn per request than asyncio's, bench/gateway.py)."""
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self._serve(ready, stop))

    async def _serve(self, ready: threading.Event | None, stop: threading.Event | None) -> None:
        server = self._server
        task = asyncio.create_task(server.serve(sockets=[self._sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if not server.started:
            await task
            raise ServiceError("the gateway did not start (see the log above)")
        if ready is not None:
            ready.set()
        while not task.done():
            if stop is not None and stop.is_set():
                server.should_exit = True
            await asyncio.wait({task}, timeout=0.1)
        await task

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.forwarder.stop(self.drain_timeout_s)
        self.spool.close()
        with contextlib.suppress(OSError):
            self._sock.close()


#: The gateway process's GIL switch interval (bench/gateway.py measured the default
#: 5 ms adding milliseconds to a request's latency).
GIL_SWITCH_INTERVAL_S = 0.0005


def run_gateway(
    settings: Settings,
    *,
    host: str,
    port: int,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    access_log: bool = False,
    on_listening: Callable[[Gateway], None] | None = None,
) -> None:
    """Run the gateway until SIGINT/SIGTERM or `stop`; errors before serving are
    one-line InputError/ServiceError."""
    # The event loop hands work to threads (the spool writer, Kafka's sender) and back;
    # each hand-off waits for the GIL up to the switch interval (5 ms by default).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gateway = Gateway(settings, host=host, port=port, access_log=access_log)
    try:
        if on_listening is not None:
            on_listening(gateway)
        gateway.serve(ready=ready, stop=stop)
    finally:
        gateway.close()


class GatewayThread:
    """The gateway in a background thread, for tests and demos.

    with GatewayThread(settings) as gw:
        httpx.post(f"{gw.url}/v1/completions", ...)
        gw.app.state.activity.inflight_by_gpu()
    """

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: Backend | None = None,
        producer_factory: Callable[[], Producer] | None = None,
        graceful_timeout_s: float = 10.0,
        drain_timeout_s: float = 10.0,
    ) -> None:
        self._kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "backend": backend,
            "producer_factory": producer_factory,
            "configure_logging": False,
            "graceful_timeout_s": graceful_timeout_s,
            "drain_timeout_s": drain_timeout_s,
        }
        self.settings = settings
        self._gateway: Gateway | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise RuntimeError("the gateway thread is not started")
        return self._gateway

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def app(self) -> Any:
        return self.gateway.app

    @property
    def forwarder(self) -> Forwarder:
        return self.gateway.forwarder

    def start(self, timeout_s: float = 30.0) -> GatewayThread:
        self._gateway = Gateway(self.settings, **self._kwargs)  # config errors raise here

        def run() -> None:
            try:
                self.gateway.serve(ready=self._ready, stop=self._stop)
            except BaseException as exc:
                self._error = exc
                self._ready.set()

        self._thread = threading.Thread(target=run, name="gpuledger-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            self.stop()
            raise ServiceError(f"the gateway did not start within {timeout_s:g} s: {self._error}")
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._gateway is not None:
            self._gateway.close()

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
