"""Detached child processes that outlive the command that started them.

`gpuledger stack up` returns while the broker and Prometheus keep running, so each
service is started in its own session (no terminal signals, never our pipes) with its
output in a log file, and described by a JSON state file. Any later command finds the
service through that file.

"down stops only what it started": a PID in a state file is signalled only while
psutil shows that PID alive with exactly the command line we recorded and the same
start time. A PID the kernel has since handed to another program is never touched;
its state file is stale and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

from models.errors import ServiceError

LOCALHOST = "127.0.0.1"

#: How far a recorded process start time may differ from psutil's reading of it.
_CREATE_TIME_TOLERANCE_S = 1.0
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

#: Popen objects of the services this interpreter started, kept so that a process we
#: stop from the same interpreter is reaped (no zombie) and never warned about at exit.
_children: dict[int, subprocess.Popen[bytes]] = {}


def find_free_port(host: str = LOCALHOST) -> int:
    """A TCP port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def is_port_free(port: int, host: str = LOCALHOST) -> bool:
    """True when `port` can be bound on `host` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def ensure_port_free(port: int, *, setting: str, host: str = LOCALHOST) -> None:
    """Raise a one-line ServiceError naming the port and the setting that chose it."""
    if not is_port_free(port, host):
        raise ServiceError(
            f"port {port} on {host} is in use; set {setting} to another port "
            "or leave it unset to pick a free one"
        )


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ProcessRecord:
    """What a state file says about one service process."""

    service: str
    pid: int
    port: int
    binary: str
    argv: tuple[str, ...]
    started_at: datetime
    log_path: Path
    create_time: float | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["argv"] = list(self.argv)
        data["started_at"] = self.started_at.isoformat()
        data["log_path"] = str(self.log_path)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ProcessRecord:
        data = json.loads(text)
        started_at = datetime.fromisoformat(data["started_at"])
        if started_at.tzinfo is None:
            started_at = started_at.replace(tzinfo=UTC)
        return cls(
            service=str(data["service"]),
            pid=int(data["pid"]),
            port=int(data["port"]),
            binary=str(data["binary"]),
            argv=tuple(str(arg) for arg in data["argv"]),
            started_at=started_at,
            log_path=Path(data["log_path"]),
            create_time=None if data.get("create_time") is None else float(data["create_time"]),
        )


class CorruptStateFileError(ValueError):
    """A state file exists but cannot be parsed; callers treat it as stale."""


def read_record(path: Path) -> ProcessRecord | None:
    """The record in `path`, None when there is no file; CorruptStateFileError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return ProcessRecord.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStateFileError(f"{path}: {exc}") from None


def write_record(path: Path, record: ProcessRecord) -> None:
    """Write atomically, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.to_json(), encoding="utf-8")
    tmp.replace(path)


def remove_record(path: Path) -> None:
    path.unlink(missing_ok=True)


class Liveness(StrEnum):
    """What became of the process a state file names."""

    OURS = "ours"  # alive, same command line and start time as recorded
    DEAD = "dead"  # no such process (or a zombie)
    FOREIGN = "foreign"  # the PID is alive but runs something else: never signal it


def liveness(record: ProcessRecord) -> Liveness:
    """Classify `record`'s PID; see the module docstring for why all three checks."""
    try:
        proc = psutil.Process(record.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return Liveness.DEAD
        cmdline = _cmdline(proc)
        create_time = proc.create_time()
    except psutil.NoSuchProcess:
        return Liveness.DEAD
    except psutil.AccessDenied:
        return Liveness.FOREIGN  # not ours to read, so certainly not ours to kill
    if cmdline != record.argv:
        return Liveness.FOREIGN
    if (
        record.create_time is not None
        and abs(create_time - record.create_time) > _CREATE_TIME_TOLERANCE_S
    ):
        return Liveness.FOREIGN
    return Liveness.OURS


def _cmdline(proc: psutil.Process, *, retries: int = 10) -> tuple[str, ...]:
    """The command line, waiting out the moment in exec() when Linux reports none.

    The kernel wakes the parent (Popen returns) before it has set up the new program's
    argument area, so a process that has just been started can read as an empty
    command line for a few milliseconds; seen here under load with Prometheus.
    """
    cmdline = tuple(proc.cmdline())
    for _ in range(retries):
        if cmdline:
            break
        time.sleep(0.01)
        cmdline = tuple(proc.cmdline())
    return cmdline


def describe_process(pid: int) -> str:
    """A short name of whatever runs as `pid` now, for messages."""
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        return " ".join(cmdline)[:80] if cmdline else proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "unknown"


def start_detached(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session, stdin from /dev/null, stdout and stderr to `log_path`.

    The log is opened in append mode so a restart keeps the previous run's lines, and
    the child never inherits our stdout/stderr: a caller reading our output (a test, a
    pipe into `less`) would otherwise wait until the service exits.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    with log_path.open("ab") as log:
        log.write(f"--- {utc_now().isoformat()} starting: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=child_env,
                cwd=cwd,
            )
        except OSError as exc:
            raise ServiceError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
    _children[proc.pid] = proc
    return proc


def process_create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def listens_on(pid: int, port: int) -> bool:
    """True when `pid` holds a listening TCP socket on `port`.

    Guards the health check: a healthy answer on the port proves nothing if another
    process owns it. Where the platform will not tell, assume yes.
    """
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return any(
        conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
        for conn in connections
    )


class StopOutcome(StrEnum):
    STOPPED = "stopped"  # exited after SIGTERM
    KILLED = "killed"  # needed SIGKILL after the timeout
    ALREADY_DEAD = "already dead"  # stale state file
    FOREIGN = "foreign"  # PID belongs to another program; not signalled


def stop_process(record: ProcessRecord, *, timeout_s: float = 10.0) -> StopOutcome:
    """SIGTERM the recorded process group leader, SIGKILL after `timeout_s`.

    Signals only a process that `liveness` says is ours. The caller removes the state
    file afterwards in every case.
    """
    state = liveness(record)
    if state is Liveness.DEAD:
        _reap(record.pid)
        return StopOutcome.ALREADY_DEAD
    if state is Liveness.FOREIGN:
        return StopOutcome.FOREIGN
    try:
        proc = psutil.Process(record.pid)
        proc.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        _reap(record.pid)
        return StopOutcome.ALREADY_DEAD
    if _wait_gone(proc, timeout_s):
        return StopOutcome.STOPPED
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(signal.SIGKILL)
    _wait_gone(proc, 5.0)
    return StopOutcome.KILLED


def stop_child(proc: subprocess.Popen[bytes], *, timeout_s: float = 10.0) -> StopOutcome:
    """Stop a process this interpreter started and still holds: no identity check needed."""
    _children.pop(proc.pid, None)
    if proc.poll() is not None:
        return StopOutcome.ALREADY_DEAD
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
        return StopOutcome.STOPPED
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return StopOutcome.KILLED


def _wait_gone(proc: psutil.Process, timeout_s: float) -> bool:
    child = _children.get(proc.pid)
    if child is not None:
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        _children.pop(proc.pid, None)
        return True
    # Not our child: its parent (often init) reaps it, maybe only seconds later (seen
    # here: a container init reaping every ~2 s), so a zombie counts as gone.
    return wait_until(lambda: not _alive(proc), timeout_s=timeout_s, interval_s=0.02)


def _alive(proc: psutil.Process) -> bool:
    try:
        status: str = proc.status()
    except psutil.NoSuchProcess:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def _reap(pid: int) -> None:
    child = _children.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)


def tail_lines(path: Path, count: int = 3, *, max_chars: int = 400) -> str:
    """The last `count` non-blank log lines joined with " | ", colour codes stripped.

    Error messages are one line, so the log excerpt they quote is one line too.
    """
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16_384))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    lines = [_ANSI_ESCAPE.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("--- ")]
    excerpt = " | ".join(lines[-count:]) or "(log is empty)"
    return excerpt if len(excerpt) <= max_chars else "…" + excerpt[-max_chars:]


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes; returns the last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Serialise `up`/`down`/restarts on one state directory across processes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tcp_connect_error(host: str, port: int, timeout_s: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout_s`, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no TCP answer within {timeout_s:g} s"
    except OSError as exc:
        return os_error_reason(exc)


def os_error_reason(exc: OSError) -> str:
    """'connection refused' rather than '[Errno 111] Connection refused'."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def exception_reason(exc: BaseException) -> str:
    """`Name: first line of the message`, without repeating the name (kafka-python does)."""
    name = type(exc).__name__
    lines = str(exc).strip().splitlines()
    message = lines[0].strip() if lines else ""
    while message.startswith(name):
        message = message[len(name) :].lstrip(": ").strip()
    return f"{name}: {message}" if message else name


class ServiceState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    STALE = "stale"  # a state file whose process is gone (or is not ours any more)


@dataclass(frozen=True)
class ServiceStatus:
    """One service of the local stack, as `up`, `down` and `status` report it.

    `healthy` is None when it was not checked; `detail` says what this call did or
    found ("started", "already running", "removed stale state: pid 123 is dead");
    `note` is a standing caveat of the service (the broker's memory storage).
    """

    name: str
    state: ServiceState
    pid: int | None = None
    port: int | None = None
    url: str | None = None
    log_path: Path | None = None
    healthy: bool | None = None
    detail: str = ""
    note: str = ""
    started_at: datetime | None = None


class HealthError(Exception):
    """A health probe's answer: the service is not (yet) usable, and why."""


class ManagedService:
    """A service the local stack runs as one detached process with a state file.

    Subclasses say how to find the binary, build the command line, prepare files,
    name the URL and probe health; this class does the lifecycle around them.
    """

    name: str = ""
    #: The environment variable that sets this service's port, for error messages.
    port_setting: str = ""
    note: str = ""

    def __init__(
        self,
        stack_dir: Path,
        *,
        port: int | None,
        start_timeout_s: float,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.stack_dir = stack_dir
        self.configured_port = port
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s

    # -- what subclasses provide -------------------------------------------------

    def binary(self) -> str:
        raise NotImplementedError

    def argv(self, binary: str, port: int) -> list[str]:
        raise NotImplementedError

    def url(self, port: int) -> str:
        raise NotImplementedError

    def probe(self, port: int, timeout_s: float) -> None:
        """Return when the service answers a real request; raise HealthError if not."""
        raise NotImplementedError

    def prepare(self, port: int) -> None:
        """Write whatever the process needs before it starts (config, directories)."""

    def env(self) -> dict[str, str] | None:
        return None

    # -- files ---------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.stack_dir / f"{self.name}.json"

    @property
    def log_path(self) -> Path:
        return self.stack_dir / f"{self.name}.log"

    def record(self) -> ProcessRecord | None:
        """The state file's record; an unreadable file counts as no record."""
        try:
            return read_record(self.state_path)
        except CorruptStateFileError:
            return None

    def running_record(self) -> ProcessRecord | None:
        """The record, only while its process is alive and ours."""
        rec = self.record()
        return rec if rec is not None and liveness(rec) is Liveness.OURS else None

    # -- lifecycle -------------------------------------------------------------------

    def health_error(self, rec: ProcessRecord, timeout_s: float) -> str | None:
        """None when `rec`'s process is ours, listens on its port and answers; else why."""
        try:
            self.probe(rec.port, timeout_s)
        except HealthError as exc:
            return str(exc)
        if not listens_on(rec.pid, rec.port):
            return f"port {rec.port} is answered by another process, not pid {rec.pid}"
        return None

    def status(self, *, check_health: bool = True, probe_timeout_s: float = 3.0) -> ServiceStatus:
        """Read-only: never starts, stops or removes anything."""
        try:
            rec = read_record(self.state_path)
        except CorruptStateFileError:
            return self._status(ServiceState.STALE, detail="unreadable state file")
        if rec is None:
            return self._status(ServiceState.STOPPED, detail="not running")
        found = liveness(rec)
        if found is not Liveness.OURS:
            return self._status(ServiceState.STALE, rec, detail=self._stale_reason(rec, found))
        if not check_health:
            return self._status(ServiceState.RUNNING, rec)
        error = self.health_error(rec, probe_timeout_s)
        return self._status(
            ServiceState.RUNNING, rec, healthy=error is None, detail=error or "healthy"
        )

    def ensure_running(
        self, progress: Callable[[str], None] | None = None
    ) -> tuple[ServiceStatus, bool]:
        """Start the service unless it already runs healthy; returns (status, started)."""
        say = progress or (lambda _message: None)
        cleaned = ""
        try:
            rec = read_record(self.state_path)
        except CorruptStateFileError:
            remove_record(self.state_path)
            rec, cleaned = None, "removed an unreadable state file"
        if rec is not None:
            found = liveness(rec)
            if found is Liveness.OURS:
                say(f"checking {self.name} (pid {rec.pid})")
                error = self._wait_healthy(rec, lambda: None, own_child=False)
                if error is not None:
                    raise ServiceError(
                        f"{self.name} (pid {rec.pid}) is running but not healthy ({error}); "
                        f"run `gpuledger stack down` and `gpuledger stack up`; "
                        f"log {rec.log_path}: {tail_lines(rec.log_path)}"
                    )
                detail = "already running"
                if self.configured_port is not None and self.configured_port != rec.port:
                    detail += (
                        f" on port {rec.port}, not the configured {self.configured_port} "
                        "(`gpuledger stack down` then `up` to move it)"
                    )
                status = self._status(ServiceState.RUNNING, rec, healthy=True, detail=detail)
                return status, False
            cleaned = f"removed stale state ({self._stale_reason(rec, found)})"
            remove_record(self.state_path)
        port = self.configured_port
        if port is None:
            port = find_free_port()
        else:
            ensure_port_free(port, setting=self.port_setting)
        status = self.start(port, progress)
        if cleaned:
            status = _with_detail(status, f"{status.detail}; {cleaned}")
        return status, True

    def start(self, port: int, progress: Callable[[str], None] | None = None) -> ServiceStatus:
        """Start on `port` and wait until healthy; on failure stop it and raise."""
        say = progress or (lambda _message: None)
        binary = self.binary()
        self.prepare(port)
        argv = self.argv(binary, port)
        say(f"starting {self.name} on {self.url(port)}")
        proc = start_detached(argv, self.log_path, env=self.env())
        rec = ProcessRecord(
            service=self.name,
            pid=proc.pid,
            port=port,
            binary=binary,
            argv=tuple(argv),
            started_at=utc_now(),
            log_path=self.log_path,
            create_time=process_create_time(proc.pid),
        )
        say(f"waiting for {self.name} (pid {proc.pid}) to become healthy")

        def exited() -> str | None:
            code = proc.poll()
            if code is None:
                return None
            _children.pop(proc.pid, None)
            return f"{self.name} exited with status {code} while starting"

        try:
            write_record(self.state_path, rec)
            error = self._wait_healthy(rec, exited, own_child=True)
        except BaseException:  # Ctrl-C while waiting, a full disk: leave nothing behind
            stop_child(proc, timeout_s=self.stop_timeout_s)
            remove_record(self.state_path)
            raise
        if error is not None:
            stop_child(proc, timeout_s=self.stop_timeout_s)
            remove_record(self.state_path)
            raise ServiceError(f"{error}; log {self.log_path}: {tail_lines(self.log_path)}")
        return self._status(ServiceState.RUNNING, rec, healthy=True, detail="started")

    def stop(self) -> ServiceStatus:
        """Stop the recorded process if it is ours; always remove the state file."""
        try:
            rec = read_record(self.state_path)
        except CorruptStateFileError:
            remove_record(self.state_path)
            return self._status(ServiceState.STALE, detail="removed an unreadable state file")
        if rec is None:
            return self._status(ServiceState.STOPPED, detail="was not running")
        foreign_name = describe_process(rec.pid)
        outcome = stop_process(rec, timeout_s=self.stop_timeout_s)
        remove_record(self.state_path)
        if outcome is StopOutcome.ALREADY_DEAD:
            return self._status(
                ServiceState.STALE, rec, detail=f"removed stale state (pid {rec.pid} is dead)"
            )
        if outcome is StopOutcome.FOREIGN:
            return self._status(
                ServiceState.STALE,
                rec,
                detail=(
                    f"removed stale state; pid {rec.pid} now runs `{foreign_name}`, "
                    "not ours: left it alone"
                ),
            )
        how = "stopped" if outcome is StopOutcome.STOPPED else "killed after SIGTERM timed out"
        return self._status(ServiceState.STOPPED, rec, detail=how)

    # -- helpers -------------------------------------------------------------------

    def _wait_healthy(
        self, rec: ProcessRecord, exited: Callable[[], str | None], *, own_child: bool
    ) -> str | None:
        """Probe until healthy (None) or the start timeout passes (the last reason).

        For a process this call started, `exited` (Popen.poll) is the authority on
        whether it still runs; otherwise psutil's liveness check is.
        """
        deadline = time.monotonic() + self.start_timeout_s
        error = "no answer yet"
        while True:
            gone = exited()
            if gone is not None:
                return gone
            if not own_child and liveness(rec) is not Liveness.OURS:
                return f"{self.name} (pid {rec.pid}) exited while starting"
            remaining_s = deadline - time.monotonic()
            error_now = self.health_error(rec, max(0.2, min(2.0, remaining_s)))
            if error_now is None:
                return None
            error = error_now
            if time.monotonic() >= deadline:
                return (
                    f"{self.name} (pid {rec.pid}) did not become healthy within "
                    f"{self.start_timeout_s:g} s ({error})"
                )
            time.sleep(0.1)

    def _stale_reason(self, rec: ProcessRecord, found: Liveness) -> str:
        if found is Liveness.DEAD:
            return f"pid {rec.pid} is dead"
        return f"pid {rec.pid} now runs `{describe_process(rec.pid)}`, not ours"

    def _status(
        self,
        state: ServiceState,
        rec: ProcessRecord | None = None,
        *,
        healthy: bool | None = None,
        detail: str = "",
    ) -> ServiceStatus:
        running = state is ServiceState.RUNNING and rec is not None
        return ServiceStatus(
            name=self.name,
            state=state,
            pid=rec.pid if rec is not None else None,
            port=rec.port if running and rec is not None else None,
            url=self.url(rec.port) if running and rec is not None else None,
            log_path=self.log_path,
            healthy=healthy,
            detail=detail,
            note=self.note,
            started_at=rec.started_at if rec is not None else None,
        )


def _with_detail(status: ServiceStatus, detail: str) -> ServiceStatus:
    return replace(status, detail=detail)
