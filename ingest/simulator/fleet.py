"""The simulated fleet: nodes, GPUs, model replicas and tenants.

A fleet is a validated pydantic document, so it can be written as YAML and passed with
`gpuledger simulate --fleet FILE`; `default_fleet()` builds the built-in one from a node
count, GPUs per node and a tenant count.

Built-in layout: nodes cycle through four patterns (two H100 SXM, two A100 SXM), each a
list of (model, tensor-parallel degree) packed onto the node's GPUs in order; a GPU no
replica needs stays idle with no process, as spare capacity does in a real fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ingest.simulator.calibration import GPU_TYPES, MODELS, GpuType
from models.errors import InputError

GpuTypeKey = Literal["H100", "A100"]

#: PCI bus ids of the eight GPUs of a DGX/HGX H100 board, in `nvidia-smi` order.
_PCI_BUSES = ("18", "2A", "3A", "5D", "9A", "AB", "BA", "DB")

_NODE_PATTERNS: tuple[tuple[GpuTypeKey, tuple[tuple[str, int], ...]], ...] = (
    ("H100", (("llama-3.1-70b", 4), ("llama-3.1-70b", 4))),
    ("H100", (("llama-3.1-8b", 1), ("llama-3.1-8b", 1), ("qwen3-32b", 2), ("llama-3.1-70b", 4))),
    ("A100", (("llama-3.1-8b", 1),) * 2 + (("qwen3-14b", 1),) * 2 + (("qwen3-32b", 2),) * 2),
    ("A100", (("llama-3.1-70b", 4), ("qwen3-14b", 1), ("qwen3-14b", 1))),
)

_TENANT_NAMES = (
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell",
    "cyberdyne", "wonka", "soylent", "aperture", "massive", "oscorp", "vandelay", "pied-piper",
)  # fmt: skip

#: Workload profiles: (name, prompt median, completion median, cache hit rate).
#: Chosen to span chat, retrieval-augmented, code and agent traffic. Completions are
#: log-normal (sigma 0.8, so the mean is 1.38 x the median): chat averages ~620 output
#: tokens, as in ML.ENERGY's lm-arena-chat runs (350-640 by model).
_PROFILES = (
    ("chat", 700, 450, 0.35),
    ("rag", 2600, 320, 0.15),
    ("code", 1400, 200, 0.55),
    ("agent", 3800, 550, 0.70),
    ("summarise", 3000, 240, 0.05),
)


class DeploymentSpec(BaseModel):
    """One model replica: `tp` GPUs of a node serving `model` as one tensor-parallel group."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    tp: int = Field(ge=1, le=8)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; known: {', '.join(sorted(MODELS))}")
        return value


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hostname: str = Field(min_length=1, max_length=253)
    gpu_type: GpuTypeKey
    gpus: int = Field(default=8, ge=1, le=16)
    driver_version: str = "550.90.07"
    deployments: list[DeploymentSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fits(self) -> NodeSpec:
        used = sum(d.tp for d in self.deployments)
        if used > self.gpus:
            raise ValueError(f"node {self.hostname}: deployments need {used} GPUs, has {self.gpus}")
        return self


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    weight: float = Field(gt=0, description="relative share of requests")
    peak_hour_utc: float = Field(ge=0, lt=24, description="hour of the daily peak")
    model_mix: dict[str, float] = Field(description="model -> relative share")
    prompt_median: int = Field(ge=1, le=200_000)
    completion_median: int = Field(ge=1, le=32_000)
    cache_hit_rate: float = Field(ge=0, le=1, description="share of requests with a cached prefix")
    profile: str = "chat"


class FleetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: list[NodeSpec] = Field(min_length=1)
    tenants: list[TenantSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> FleetSpec:
        hosts = [n.hostname for n in self.nodes]
        if len(set(hosts)) != len(hosts):
            raise ValueError("fleet: node hostnames must be unique")
        ids = [t.id for t in self.tenants]
        if len(set(ids)) != len(ids):
            raise ValueError("fleet: tenant ids must be unique")
        served = {d.model for n in self.nodes for d in n.deployments}
        if not served:
            raise ValueError("fleet: no node serves any model")
        for tenant in self.tenants:
            unknown = set(tenant.model_mix) - set(MODELS)
            if unknown:
                raise ValueError(f"tenant {tenant.id}: unknown model(s) {sorted(unknown)}")
        return self


@dataclass(frozen=True)
class Gpu:
    """One physical GPU, with the identity dcgm-exporter reports."""

    index: int  # fleet-wide
    hostname: str
    node_index: int
    local_index: int  # `gpu` label
    uuid: str
    pci_bus_id: str
    gpu_type: GpuType
    driver_version: str
    replica: int | None  # index into Fleet.replicas, None for a spare GPU


@dataclass(frozen=True)
class Replica:
    """A model served by a tensor-parallel group of GPUs on one node."""

    index: int
    model: str
    tp: int
    hostname: str
    gpu_type: GpuType
    gpu_indices: tuple[int, ...]


class Fleet:
    """A `FleetSpec` expanded to GPUs and replicas with stable, seeded identities."""

    def __init__(self, spec: FleetSpec, seed: int) -> None:
        self.spec = spec
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6770]))
        gpus: list[Gpu] = []
        replicas: list[Replica] = []
        for node_index, node in enumerate(spec.nodes):
            local = 0
            owner: dict[int, int] = {}
            for deployment in node.deployments:
                group = tuple(range(len(gpus) + local, len(gpus) + local + deployment.tp))
                replica = Replica(
                    index=len(replicas),
                    model=deployment.model,
                    tp=deployment.tp,
                    hostname=node.hostname,
                    gpu_type=GPU_TYPES[node.gpu_type],
                    gpu_indices=group,
                )
                replicas.append(replica)
                for offset in range(deployment.tp):
                    owner[local + offset] = replica.index
                local += deployment.tp
            for local_index in range(node.gpus):
                gpus.append(
                    Gpu(
                        index=len(gpus),
                        hostname=node.hostname,
                        node_index=node_index,
                        local_index=local_index,
                        uuid=_uuid(rng, "GPU-"),
                        pci_bus_id=f"00000000:{_PCI_BUSES[local_index % 8]}:00.0"
                        if local_index < 8
                        else f"00000000:{0xE0 + local_index:02X}:00.0",
                        gpu_type=GPU_TYPES[node.gpu_type],
                        driver_version=node.driver_version,
                        replica=owner.get(local_index),
                    )
                )
        self.gpus: tuple[Gpu, ...] = tuple(gpus)
        self.replicas: tuple[Replica, ...] = tuple(replicas)

    @cached_property
    def served_models(self) -> tuple[str, ...]:
        return tuple(sorted({r.model for r in self.replicas}))

    def replicas_of(self, model: str) -> tuple[Replica, ...]:
        return tuple(r for r in self.replicas if r.model == model)


def _uuid(rng: np.random.Generator, prefix: str) -> str:
    raw = rng.bytes(16).hex()
    return f"{prefix}{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def default_fleet(
    nodes: int = 4, gpus_per_node: int = 8, tenants: int = 8, seed: int = 0
) -> FleetSpec:
    """The built-in fleet: node patterns cycled, tenants with Zipf-skewed demand.

    Tenant k (from 1) gets weight 1/k**1.1: with 8 tenants the largest sends 37 % of the
    requests and the smallest 4 %. Peak hours, model mixes and workload profiles are
    drawn from `seed`.
    """
    if nodes < 1 or gpus_per_node < 1 or tenants < 1:
        raise InputError("fleet: nodes, GPUs per node and tenants must each be at least 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF1EE7]))
    node_specs = []
    for i in range(nodes):
        gpu_type, pattern = _NODE_PATTERNS[i % len(_NODE_PATTERNS)]
        node_specs.append(
            NodeSpec(
                hostname=f"gpu-{gpu_type.lower()}-{i:02d}",
                gpu_type=gpu_type,
                gpus=gpus_per_node,
                driver_version="550.90.07" if gpu_type == "H100" else "535.183.06",
                deployments=_pack(pattern, gpus_per_node),
            )
        )
    served = sorted({d.model for n in node_specs for d in n.deployments})
    if not served:
        # Too few GPUs per node for any pattern entry: serve the smallest model anyway.
        node_specs[0].deployments.append(DeploymentSpec(model="llama-3.1-8b", tp=1))
        served = ["llama-3.1-8b"]
    tenant_specs = []
    for k in range(tenants):
        name = _TENANT_NAMES[k % len(_TENANT_NAMES)]
        if k >= len(_TENANT_NAMES):
            name = f"{name}-{k // len(_TENANT_NAMES) + 1}"
        profile, prompt, completion, cache = _PROFILES[k % len(_PROFILES)]
        mix = rng.dirichlet(np.full(len(served), 0.8))
        tenant_specs.append(
            TenantSpec(
                id=name,
                weight=round(1.0 / (k + 1) ** 1.1, 6),
                peak_hour_utc=float(rng.choice([9.0, 13.0, 15.0, 17.0, 20.0, 2.0])),
                model_mix={m: round(float(w), 4) + 0.01 for m, w in zip(served, mix, strict=True)},
                prompt_median=int(prompt * rng.uniform(0.8, 1.25)),
                completion_median=int(completion * rng.uniform(0.8, 1.25)),
                cache_hit_rate=cache,
                profile=profile,
            )
        )
    return FleetSpec(nodes=node_specs, tenants=tenant_specs)


def _pack(pattern: tuple[tuple[str, int], ...], gpus: int) -> list[DeploymentSpec]:
    """Fill `gpus` with the pattern's replicas in order, repeating it while any fits."""
    out: list[DeploymentSpec] = []
    free = gpus
    while True:
        placed = False
        for model, tp in pattern:
            if tp <= free:
                out.append(DeploymentSpec(model=model, tp=tp))
                free -= tp
                placed = True
            if free == 0:
                return out
        if not placed or gpus <= 8:
            return out
