"""A real Triton Inference Server serving the demo LLM, as a child process.

`TritonServer(work_dir)` lays out under `work_dir`:

- `model_repository/demo-llm/` — a copy of the packaged model, its pace parameters
  replaced by the overrides given;
- `backends/` — the shipped backends plus the Python 3.11 backend stub that the wheel
  keeps elsewhere;
- `tritonserver.log` — the server's output (appended across starts);

then starts `tritonserver` on 127.0.0.1 ports (free ones unless given), waits until
`/v2/health/ready` answers 200 (with `--strict-readiness`, only once every model is
loaded) and stops it with SIGTERM, then SIGKILL after `stop_timeout_s`.

A clean stop takes ~3 s. But Triton 2.51 cannot shut down while any client holds a
gRPC stream open (even one whose requests all finished: the graceful gRPC shutdown came
in a later release): it logs "Exit timeout expired. Exiting immediately." after
`--exit-timeout-secs` (3 here) and then hangs. So `stop()` sends SIGKILL as soon as
that line appears (or after `stop_timeout_s`), and then kills the backend stubs still
running and removes their /dev/shm regions (a stub whose server was killed deadlocks
and stays otherwise).

The server is our child: it is stopped when the context manager exits and, on Linux,
killed if the thread that started it dies first (`setpriv --pdeathsig KILL`; the
model's watchdog then removes its stub), so a test run killed by a timeout leaves no
server holding ports. Start it from a thread that lives as long as the server should.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from ingest.stack.process import (
    LOCALHOST,
    StopOutcome,
    ensure_port_free,
    find_free_port,
    tail_lines,
    utc_now,
)
from ingest.triton.venv import TritonInstall, triton_install
from models.errors import InputError, ServiceError

#: The demo LLM's model name and version, as Triton serves them.
DEMO_MODEL = "demo-llm"
DEMO_MODEL_VERSION = "1"

#: The packaged model repository (copied, never served in place).
MODEL_REPOSITORY = Path(__file__).resolve().parent / "model_repository"

#: Where the server writes the port it could not bind; a start that picked free ports
#: retries with new ones when another process took one in the meantime.
_PORT_TAKEN = re.compile(r"address already in use|failed to start .*(service|endpoint)", re.I)
_START_ATTEMPTS = 3
#: Triton's last words when in-flight work (an open gRPC stream) outlasts the exit timeout.
_HUNG_ON_EXIT = re.compile(r"Exit timeout expired")
#: The Python backend's shared-memory regions: /dev/shm/<prefix><uuid>.
_SHM_REGION_PREFIX = "triton_python_backend_shm_region_"


def _pace_value(name: str, value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise InputError(f"TritonServer: {name} must be a number of seconds >= 0, got {value!r}")
    return value


def write_model_repository(
    dest: Path,
    *,
    prefill_s_per_token: float | None = None,
    decode_s_per_token: float | None = None,
) -> Path:
    """Copy the packaged repository to `dest` (replacing it), with the pace overrides
    that are given written into demo-llm's config.pbtxt; returns `dest`."""
    parameters = {
        "prefill_s_per_token": _pace_value("prefill_s_per_token", prefill_s_per_token),
        "decode_s_per_token": _pace_value("decode_s_per_token", decode_s_per_token),
    }
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(MODEL_REPOSITORY, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    config = dest / DEMO_MODEL / "config.pbtxt"
    text = config.read_text(encoding="utf-8")
    for key, value in parameters.items():
        if value is not None:
            text = _set_parameter(text, key, repr(value))
    config.write_text(text, encoding="utf-8")
    return dest


def _set_parameter(config_text: str, key: str, value: str) -> str:
    """`config_text` with the string parameter `key` set to `value` (added if absent)."""
    if '"' in value or "\\" in value:
        raise InputError(f"demo-llm config parameter {key}: {value!r} may not contain quotes")
    pattern = re.compile(rf'(key:\s*"{key}"\s*value:\s*\{{\s*string_value:\s*")[^"]*(")')
    text, count = pattern.subn(lambda m: f"{m.group(1)}{value}{m.group(2)}", config_text)
    if count == 0:
        text = (
            config_text.rstrip("\n")
            + f'\nparameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
        )
    return text


def write_backends(install: TritonInstall, dest: Path) -> Path:
    """Copy the shipped backends to `dest` with the Python 3.11 stub added to python/."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(
        install.backends_dir, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    shutil.copy2(install.python_stub, dest / "python" / install.python_stub.name)
    return dest


class TritonServer:
    """A `tritonserver` child process serving the demo LLM; a context manager.

    >>> with TritonServer(tmp_path, decode_s_per_token=0.001) as server:
    ...     client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

    Ports left None are picked free at start. Pace overrides left None keep the
    packaged defaults (config.pbtxt). Raises TritonNotInstalled when .venv-triton is
    missing, ServiceError (quoting the log's last lines) when the server exits or is
    not ready within `startup_timeout_s`.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        prefill_s_per_token: float | None = None,
        decode_s_per_token: float | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 6.0,
        venv_dir: Path | None = None,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()  # tritonserver runs from elsewhere
        self.prefill_s_per_token = _pace_value("prefill_s_per_token", prefill_s_per_token)
        self.decode_s_per_token = _pace_value("decode_s_per_token", decode_s_per_token)
        self._requested_ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self._ports: dict[str, int] = {}
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._venv_dir = venv_dir
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------

    def _port(self, name: str) -> int:
        if name not in self._ports:
            raise ServiceError(f"TritonServer in {self.work_dir} is not started")
        return self._ports[name]

    @property
    def grpc_port(self) -> int:
        return self._port("grpc")

    @property
    def http_port(self) -> int:
        return self._port("http")

    @property
    def metrics_port(self) -> int:
        return self._port("metrics")

    @property
    def grpc_url(self) -> str:
        """ "127.0.0.1:PORT", as `tritonclient.grpc.InferenceServerClient(url=...)` takes it."""
        return f"{LOCALHOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """ "http://127.0.0.1:PORT" (tritonclient.http wants it without the scheme)."""
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """ "http://127.0.0.1:PORT/metrics": Prometheus text with the nv_inference_* series."""
        return f"http://{LOCALHOST}:{self.metrics_port}/metrics"

    @property
    def model_repository(self) -> Path:
        return self.work_dir / "model_repository"

    @property
    def backends_dir(self) -> Path:
        return self.work_dir / "backends"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tritonserver.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def alive(self) -> bool:
        """True while the server process runs (ready or not)."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> TritonServer:
        """Materialise the repository and backends, start the server, wait until ready."""
        if self.alive():
            return self
        install = triton_install(self._venv_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_model_repository(
            self.model_repository,
            prefill_s_per_token=self.prefill_s_per_token,
            decode_s_per_token=self.decode_s_per_token,
        )
        write_backends(install, self.backends_dir)
        picked_free = any(port is None for port in self._requested_ports.values())
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._ports = self._choose_ports()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._proc = self._spawn(install)
            try:
                self._wait_ready()
                return self
            except ServiceError:
                self.stop()
                retry = picked_free and attempt < _START_ATTEMPTS and self._port_taken(log_offset)
                if not retry:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> StopOutcome | None:
        """SIGTERM; SIGKILL once Triton says it gave up waiting (open gRPC streams make
        2.51 hang: module doc) or after `stop_timeout_s`. None when never started."""
        if self._proc is None:
            return None
        proc, self._proc = self._proc, None
        stubs = _children_of(proc.pid)
        outcome = self._terminate(proc)
        _kill_orphaned_stubs(stubs)
        return outcome

    def _terminate(self, proc: subprocess.Popen[bytes]) -> StopOutcome:
        if proc.poll() is not None:
            return StopOutcome.ALREADY_DEAD
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc.terminate()
        deadline = time.monotonic() + self.stop_timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            # Once Triton gives up waiting it never exits by itself: no point waiting on.
            if _HUNG_ON_EXIT.search(self._log_since(log_offset)):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            return StopOutcome.STOPPED
        proc.kill()
        proc.wait()
        return StopOutcome.KILLED

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------

    def _choose_ports(self) -> dict[str, int]:
        ports: dict[str, int] = {}
        for name, port in self._requested_ports.items():
            if port is None:
                port = find_free_port()
                while port in ports.values():
                    port = find_free_port()
            else:
                ensure_port_free(port, setting=f"TritonServer {name}_port")
            ports[name] = port
        return ports

    def _argv(self, install: TritonInstall) -> list[str]:
        argv = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backends_dir}",
            f"--http-address={LOCALHOST}",
            f"--http-port={self._ports['http']}",
            f"--grpc-address={LOCALHOST}",
            f"--grpc-port={self._ports['grpc']}",
            f"--metrics-address={LOCALHOST}",
            f"--metrics-port={self._ports['metrics']}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            "--strict-readiness=true",
            "--log-verbose=0",
            # In-flight streams get this long to finish after SIGTERM (default 30 s);
            # the model's finalize ends its streams sooner.
            "--exit-timeout-secs=3",
        ]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # Dies with us: no orphaned server holding ports after a killed test run.
            # KILL, as TERM can hang (module doc); the model's watchdog ends the stub.
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        return argv

    def _spawn(self, install: TritonInstall) -> subprocess.Popen[bytes]:
        argv = self._argv(install)
        with self.log_path.open("ab") as log:
            log.write(f"--- {utc_now().isoformat()} starting: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own session: a terminal's Ctrl-C reaches us, and we stop it.
                    start_new_session=True,
                    close_fds=True,
                    env=install.server_env(),
                    cwd=self.work_dir,
                )
            except OSError as exc:
                raise ServiceError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None

    def _wait_ready(self) -> None:
        url = f"http://{LOCALHOST}:{self._ports['http']}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(timeout=1.0) as client:
            while True:
                code = self._proc.poll() if self._proc is not None else -1
                if code is not None:
                    raise ServiceError(
                        f"tritonserver exited with code {code} while starting "
                        f"(log {self.log_path}): {tail_lines(self.log_path, 5)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return
                if time.monotonic() >= deadline:
                    raise ServiceError(
                        f"tritonserver not ready within {self.startup_timeout_s:g} s "
                        f"(log {self.log_path}): {tail_lines(self.log_path, 5)}"
                    )
                time.sleep(0.05)

    def _port_taken(self, log_offset: int) -> bool:
        return bool(_PORT_TAKEN.search(self._log_since(log_offset)))

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""


def _children_of(pid: int) -> list[psutil.Process]:
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return children


def _kill_orphaned_stubs(stubs: list[psutil.Process]) -> None:
    """Kill the backend stubs still running after their server is gone, and remove the
    /dev/shm region each names in its command line (Triton would have on a clean exit)."""
    _, alive = psutil.wait_procs(stubs, timeout=1.0)
    for stub in alive:
        try:
            regions = [arg for arg in stub.cmdline() if arg.startswith(_SHM_REGION_PREFIX)]
            stub.kill()
            stub.wait(timeout=5)
        except psutil.Error:
            continue
        for region in regions:
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / Path(region).name).unlink()
