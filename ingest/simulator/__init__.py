"""Fleet simulator: usage events, DCGM telemetry and per-request ground truth."""

from ingest.simulator.fleet import (
    DeploymentSpec,
    Fleet,
    FleetSpec,
    NodeSpec,
    TenantSpec,
    default_fleet,
)
from ingest.simulator.physics import PhysicsConfig
from ingest.simulator.run import SimulationConfig, SimulationResult, simulate
from ingest.simulator.telemetry import METRICS, TelemetryConfig
from ingest.simulator.trace import TraceColumns, read_trace
from ingest.simulator.workload import WorkloadConfig

__all__ = [
    "METRICS",
    "DeploymentSpec",
    "Fleet",
    "FleetSpec",
    "NodeSpec",
    "PhysicsConfig",
    "SimulationConfig",
    "SimulationResult",
    "TelemetryConfig",
    "TenantSpec",
    "TraceColumns",
    "WorkloadConfig",
    "default_fleet",
    "read_trace",
    "simulate",
]
