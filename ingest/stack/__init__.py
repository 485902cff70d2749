"""The embedded local stack: a Tansu Kafka broker and Prometheus on 127.0.0.1.

Both run as detached child processes that outlive the command which started them;
everything they need lives under `<state_dir>/stack/`: one JSON state file and one
log per service, and Prometheus's config, TSDB and scrape-target directory. Any
command finds the running stack through those files, so no address has to be
exported between commands.

- `up()` is idempotent: a healthy running service is left alone, a state file whose
  process is gone is cleaned up and the service started again. Configured ports are
  honoured, otherwise free ports are picked. If a service does not become healthy
  within `settings.stack.start_timeout_s`, everything this call started is stopped
  and a ServiceError quotes the last lines of the log.
- `down()` stops only processes this stack started (see `ingest.stack.process`).
  The broker's `memory://` storage goes with it; Prometheus's data directory stays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest.settings import Settings
from ingest.stack.kafka import KafkaService
from ingest.stack.process import ManagedService, ServiceState, ServiceStatus, locked
from ingest.stack.prometheus import PrometheusService

__all__ = [
    "LocalStack",
    "ServiceState",
    "ServiceStatus",
    "StackStatus",
]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StackStatus:
    """Every service of the local stack, in start order (kafka, prometheus)."""

    stack_dir: Path
    services: tuple[ServiceStatus, ...]

    def __iter__(self) -> Iterator[ServiceStatus]:
        return iter(self.services)

    def service(self, name: str) -> ServiceStatus:
        for status in self.services:
            if status.name == name:
                return status
        raise KeyError(name)

    @property
    def kafka(self) -> ServiceStatus:
        return self.service("kafka")

    @property
    def prometheus(self) -> ServiceStatus:
        return self.service("prometheus")

    @property
    def running(self) -> bool:
        return all(s.state is ServiceState.RUNNING for s in self.services)

    @property
    def healthy(self) -> bool:
        return all(s.state is ServiceState.RUNNING and s.healthy for s in self.services)


class LocalStack:
    """The local stack of one state directory; cheap to build, reads files on demand."""

    def __init__(self, settings: Settings, *, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress = progress
        # Absolute, so the recorded command lines match whatever the working directory.
        self.stack_dir = (settings.state_dir / "stack").resolve()
        stack = settings.stack
        self.kafka = KafkaService(
            self.stack_dir, port=stack.kafka_port, start_timeout_s=stack.start_timeout_s
        )
        self.prometheus = PrometheusService(
            self.stack_dir,
            port=stack.prometheus_port,
            start_timeout_s=stack.start_timeout_s,
            scrape_interval_s=stack.scrape_interval_s,
            retention=stack.prometheus_retention,
            triton_job=settings.reconciliation.triton_job,
        )

    @property
    def services(self) -> tuple[ManagedService, ...]:
        return (self.kafka, self.prometheus)

    @property
    def _lock_path(self) -> Path:
        return self.stack_dir / ".lock"

    def up(self) -> StackStatus:
        """Start whatever is not running healthy; see the module docstring."""
        with locked(self._lock_path):
            started: list[ManagedService] = []
            statuses: list[ServiceStatus] = []
            try:
                for service in self.services:
                    status, was_started = service.ensure_running(self.progress)
                    statuses.append(status)
                    if was_started:
                        started.append(service)
            except BaseException:
                for service in reversed(started):
                    service.stop()
                raise
            return StackStatus(self.stack_dir, tuple(statuses))

    def down(self) -> StackStatus:
        """Stop what this stack started; harmless when nothing runs."""
        with locked(self._lock_path):
            statuses = {s.name: s.stop() for s in reversed(self.services)}
            return StackStatus(self.stack_dir, tuple(statuses[s.name] for s in self.services))

    def status(self, *, check_health: bool = True) -> StackStatus:
        """Read-only report; with `check_health`, each running service is probed."""
        return StackStatus(
            self.stack_dir,
            tuple(s.status(check_health=check_health) for s in self.services),
        )

    def restart_prometheus(self) -> ServiceStatus:
        """Restart Prometheus on its port and wait until ready (to load new TSDB blocks)."""
        with locked(self._lock_path):
            return self.prometheus.restart(self.progress)

    def kafka_bootstrap(self) -> str | None:
        """`127.0.0.1:PORT` of the running broker, None when it is not running."""
        rec = self.kafka.running_record()
        return None if rec is None else self.kafka.url(rec.port)

    def prometheus_url(self) -> str | None:
        """`http://127.0.0.1:PORT` of the running Prometheus, None when not running."""
        rec = self.prometheus.running_record()
        return None if rec is None else self.prometheus.url(rec.port)

    @property
    def prometheus_data_dir(self) -> Path:
        return self.prometheus.data_dir

    @property
    def prometheus_targets_dir(self) -> Path:
        return self.prometheus.targets_dir

    @property
    def prometheus_config_path(self) -> Path:
        return self.prometheus.config_path
