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
