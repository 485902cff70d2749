"""The local Prometheus: the Debian `prometheus` binary with a directory we own.

Layout under `<state_dir>/stack/prometheus/`:

- `prometheus.yml`, rewritten at every start from the settings;
- `data/`, the TSDB. It survives `stack down`, so a simulated past stays queryable;
  promtool-backfilled blocks moved in here become visible after `restart()`;
- `targets/`, file-based service discovery for the `dcgm-exporter` job: a live
  exporter registers by dropping `<name>.json` there (`register_scrape_target`),
  and Prometheus picks it up within 5 s without a restart;
- `triton_targets/`, the same for the `triton` job (Triton's metrics endpoints, for
  revenue assurance; `ingest.triton_counters.register_triton_targets`). Each target
  carries its `triton_server` label and, where its URL says so, its own
  `__metrics_path__` and `__scheme__`.

Retention comes from `settings.stack.prometheus_retention` (default 3650d): the
Prometheus default of 15d would delete a backfilled past at the next compaction.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx
import yaml

from ingest.stack.process import (
    LOCALHOST,
    HealthError,
    ManagedService,
    ServiceStatus,
    ensure_port_free,
    os_error_reason,
    stop_process,
)
from models.errors import ServiceError

DCGM_JOB = "dcgm-exporter"
#: The default job of Triton's metrics endpoints (`settings.reconciliation.triton_job`).
TRITON_JOB = "triton"
#: file_sd directory of the Triton job, beside `prometheus.yml`.
TRITON_TARGETS_DIR = "triton_targets"
SELF_JOB = "prometheus"
TARGETS_REFRESH_INTERVAL = "5s"


def prometheus_bin() -> str:
    """Path of `prometheus`, or a ServiceError saying how to install it."""
    return _which("prometheus")


def promtool_bin() -> str:
    """Path of `promtool` (backfills TSDB blocks), or a ServiceError saying how to install it."""
    return _which("promtool")


def _which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ServiceError(
            f"{name} not found on PATH: install it with `apt-get install prometheus` "
            "(make demo and make test do this)"
        )
    return found


def render_config(*, port: int, scrape_interval_s: int, triton_job: str = TRITON_JOB) -> str:
    """prometheus.yml: scrape ourselves, whatever `targets/*.json` lists (DCGM), and
    whatever `triton_targets/*.json` lists (Triton, in job `triton_job`).

    The file_sd path is relative, which Prometheus resolves against the config file's
    directory, so the state directory can move.
    """
    if triton_job in (SELF_JOB, DCGM_JOB):
        raise ServiceError(
            f"reconciliation.triton_job {triton_job!r} is the name of another scrape job "
            f"of the local Prometheus; choose another (default {TRITON_JOB!r})"
        )
    config = {
        "global": {
            "scrape_interval": f"{scrape_interval_s}s",
            "scrape_timeout": f"{min(10, scrape_interval_s)}s",
            "evaluation_interval": f"{scrape_interval_s}s",
        },
        "scrape_configs": [
            {
                "job_name": SELF_JOB,
                "static_configs": [{"targets": [f"{LOCALHOST}:{port}"]}],
            },
            {
                "job_name": DCGM_JOB,
                "file_sd_configs": [
                    {"files": ["targets/*.json"], "refresh_interval": TARGETS_REFRESH_INTERVAL}
                ],
            },
            {
                "job_name": triton_job,
                "metrics_path": "/metrics",
                "file_sd_configs": [
                    {
                        "files": [f"{TRITON_TARGETS_DIR}/*.json"],
                        "refresh_interval": TARGETS_REFRESH_INTERVAL,
                    }
                ],
            },
        ],
    }
    header = "# Written by gpuledger at every `stack up`; edits are overwritten.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def register_scrape_target(
    targets_dir: Path,
    name: str,
    targets: Sequence[str],
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Add `targets` ("host:port") to the dcgm-exporter job as `<name>.json`.

    Written atomically (temp file + rename, the temp name outside the `*.json`
    glob): Prometheus re-reads the directory on its own and must never see half a file.
    """
    targets_dir.mkdir(parents=True, exist_ok=True)
    path = targets_dir / f"{name}.json"
    tmp = targets_dir / f".{name}.json.{os.getpid()}.tmp"
    document = [{"targets": list(targets), "labels": dict(labels or {})}]
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def unregister_scrape_target(targets_dir: Path, name: str) -> bool:
    """Remove `<name>.json`; True when it existed."""
    path = targets_dir / f"{name}.json"
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


class PrometheusService(ManagedService):
    """Prometheus on 127.0.0.1:PORT with the admin and lifecycle APIs enabled."""

    name = "prometheus"
    port_setting = "GPULEDGER_STACK__PROMETHEUS_PORT"

    def __init__(
        self,
        stack_dir: Path,
        *,
        port: int | None,
        start_timeout_s: float,
        scrape_interval_s: int,
        retention: str,
        triton_job: str = TRITON_JOB,
    ) -> None:
        super().__init__(stack_dir, port=port, start_timeout_s=start_timeout_s)
        self.scrape_interval_s = scrape_interval_s
        self.retention = retention
        self.triton_job = triton_job

    @property
    def home(self) -> Path:
        return self.stack_dir / "prometheus"

    @property
    def config_path(self) -> Path:
        return self.home / "prometheus.yml"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def targets_dir(self) -> Path:
        return self.home / "targets"

    @property
    def triton_targets_dir(self) -> Path:
        return self.home / TRITON_TARGETS_DIR

    def binary(self) -> str:
        return prometheus_bin()

    def prepare(self, port: int) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.triton_targets_dir.mkdir(parents=True, exist_ok=True)
        text = render_config(
            port=port, scrape_interval_s=self.scrape_interval_s, triton_job=self.triton_job
        )
        tmp = self.config_path.with_name(f".{self.config_path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.config_path)

    def argv(self, binary: str, port: int) -> list[str]:
        return [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address={LOCALHOST}:{port}",
            f"--storage.tsdb.retention.time={self.retention}",
            "--web.enable-admin-api",
            "--web.enable-lifecycle",
        ]

    def url(self, port: int) -> str:
        return f"http://{LOCALHOST}:{port}"

    def probe(self, port: int, timeout_s: float) -> None:
        try:
            response = httpx.get(f"{self.url(port)}/-/ready", timeout=timeout_s)
        except httpx.ConnectError as exc:
            cause = exc.__cause__ or exc.__context__
            reason = os_error_reason(cause) if isinstance(cause, OSError) else str(exc)
            raise HealthError(reason or "connection failed") from None
        except httpx.HTTPError as exc:
            raise HealthError(f"{type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise HealthError(f"/-/ready answered HTTP {response.status_code}")

    def restart(self, progress: Callable[[str], None] | None = None) -> ServiceStatus:
        """Stop and start on the same port, then wait until ready.

        Prometheus loads the TSDB blocks in `data/` at start, so blocks promtool
        wrote and the caller moved in are queryable as soon as this returns.
        """
        rec = self.running_record()
        if rec is None:
            raise ServiceError("prometheus is not running: run `gpuledger stack up`")
        if progress is not None:
            progress(f"stopping prometheus (pid {rec.pid})")
        stop_process(rec, timeout_s=self.stop_timeout_s)
        ensure_port_free(rec.port, setting=self.port_setting)
        return self.start(rec.port, progress)
