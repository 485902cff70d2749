"""Shared fixtures: settings isolated from the environment, and the local stack.

`local_stack` starts one real Tansu broker and one real Prometheus for the whole test
session (well under a second) and stops them at the end, whatever happened. Tests
that stop, break or restart services build their own stack with `stack_factory`, in
their own state directory, so the shared one is never disturbed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ingest.settings import Settings
from ingest.stack import LocalStack

if TYPE_CHECKING:
    from datetime import datetime

    from ingest.simulator.run import SimulationResult

#: Scrape interval of the test stacks: 1 s, so live-scrape tests wait seconds, not 15.
TEST_SCRAPE_INTERVAL_S = 1

SettingsFactory = Callable[..., Settings]


def build_settings(state_dir: Path, **overrides: Any) -> Settings:
    """Settings from `overrides` and defaults only: no GPULEDGER_* variable, no TOML.

    The environment and working directory are changed only while Settings is built
    (it reads both then and never again), so this is safe in session fixtures.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.upper().startswith("GPULEDGER_"):
                patch.delenv(name)
        patch.chdir(state_dir)  # no ./gpuledger.toml can be found from here
        return Settings(state_dir=state_dir, **overrides)


def _stack_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    stack = {"scrape_interval_s": TEST_SCRAPE_INTERVAL_S, **overrides.pop("stack", {})}
    return {"stack": stack, **overrides}


@dataclass(frozen=True)
class RunningStack:
    """What `local_stack` yields."""

    settings: Settings
    stack: LocalStack
    kafka_bootstrap: str  # "127.0.0.1:PORT"
    prometheus_url: str  # "http://127.0.0.1:PORT"


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A running local stack shared by the session; do not stop or restart it."""
    settings = build_settings(
        tmp_path_factory.mktemp("local-stack") / "state", **_stack_overrides({})
    )
    stack = LocalStack(settings)
    try:
        status = stack.up()
        assert status.kafka.url is not None
        assert status.prometheus.url is not None
        yield RunningStack(settings, stack, status.kafka.url, status.prometheus.url)
    finally:
        stack.down()


@contextlib.contextmanager
def running_stack(state_dir: Path, **overrides: Any) -> Iterator[Settings]:
    """A local stack of its own, for tests that restart Prometheus (backfills do)."""
    settings = build_settings(state_dir, **overrides)
    stack = LocalStack(settings)
    try:
        stack.up()
        yield settings
    finally:
        stack.down()


def simulate_small_fleet(
    settings: Settings,
    out_dir: Path,
    *,
    start: datetime,
    hours: int,
    seed: int,
    rate_per_s: float,
) -> SimulationResult:
    """Simulate 2 nodes x 2 GPUs and 3 tenants for `hours` from `start` and deliver it
    to the stack of `settings` (Kafka events, Prometheus history). No node outages, so
    every GPU-hour keeps its telemetry coverage above the ingest check's threshold."""
    from ingest.simulator import SimulationConfig, TelemetryConfig, default_fleet, simulate
    from ingest.simulator.delivery import deliver

    config = SimulationConfig(
        start=start,
        duration_s=hours * 3600,
        seed=seed,
        rate_per_s=rate_per_s,
        telemetry=TelemetryConfig(outages_per_node_day=0, counter_resets_per_gpu_day=4),
    )
    result = simulate(default_fleet(nodes=2, gpus_per_node=2, tenants=3, seed=seed), config)
    deliver(result, settings, out_dir)
    return result


@pytest.fixture
def settings_factory(tmp_path: Path) -> SettingsFactory:
    """`settings_factory(name="state", **overrides)`: isolated Settings in a fresh dir."""

    def make(name: str = "state", **overrides: Any) -> Settings:
        return build_settings(tmp_path / name, **_stack_overrides(overrides))

    return make


@pytest.fixture
def isolated_settings(settings_factory: SettingsFactory) -> Settings:
    """Settings with a fresh temporary state dir and no stack running."""
    return settings_factory()


@pytest.fixture
def stack_factory(settings_factory: SettingsFactory) -> Iterator[Callable[..., LocalStack]]:
    """`stack_factory(name="stack", **overrides)`: a LocalStack (not started) in its own
    state dir, taken down after the test whatever happened."""
    stacks: list[LocalStack] = []

    def make(name: str = "stack", **overrides: Any) -> LocalStack:
        stack = LocalStack(settings_factory(name, **overrides))
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.down()


@dataclass(frozen=True)
class EfficiencyPipeline:
    """What `efficiency_pipeline` yields: a stack with two allocated hours, their
    invoices drafted, and the analysts' snapshot published by those runs."""

    settings: Settings
    #: The hours allocated so far: [start, end).
    start: datetime
    end: datetime
    #: A third simulated hour, delivered but not yet ingested or allocated.
    next_hour: datetime
    #: The hour the grid intensity file prices (others use the hour-of-day profile).
    file_hour: datetime
    file_g_per_kwh: float


@pytest.fixture(scope="session")
def efficiency_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EfficiencyPipeline]:
    """The whole pipeline on a small fleet, as `make demo` runs it: 30 Jun 2026 22:00 to
    1 Jul 01:00 simulated and delivered (so days and billing periods are crossed), the
    first two hours ingested and allocated through Dagster (which publishes a snapshot),
    the example rate card written and both months drafted (which publishes again)."""
    from datetime import UTC, datetime, timedelta

    from pipelines.cli.invoice import example_card_text
    from pipelines.materialize import materialize_all
    from pipelines.materialize_billing import materialize_invoices

    start = datetime(2026, 6, 30, 22, tzinfo=UTC)
    file_hour = start + timedelta(hours=1)
    root = tmp_path_factory.mktemp("efficiency")
    intensity = root / "grid.csv"
    intensity.write_text(f"hour_start,g_co2e_per_kwh\n{file_hour.isoformat()},125.5\n")
    profile = [300.0 + 10 * h for h in range(24)]
    with running_stack(
        root / "state",
        kafka={"topic": "gpuledger.usage.v1", "topic_partitions": 2},
        telemetry={"retries": 1, "backoff_s": 0.01},
        efficiency={
            "grid_intensity_file": intensity,
            "grid_intensity_by_hour": profile,
            "pue": 1.25,
            "energy_tariff_per_kwh": "0.12",
        },
    ) as settings:
        simulate_small_fleet(settings, root / "run", start=start, hours=3, seed=23, rate_per_s=0.3)
        end = start + timedelta(hours=2)
        allocated = materialize_all(settings, start, end)
        assert allocated.success, allocated.failed_checks
        settings.rate_card_path.write_text(example_card_text())
        for period in ("2026-06", "2026-07"):
            drafted = materialize_invoices(settings, period)
            assert drafted.success, drafted.failed_checks
        yield EfficiencyPipeline(settings, start, end, end, file_hour, 125.5)
