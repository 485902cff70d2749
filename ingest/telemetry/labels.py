"""dcgm-exporter labels of a series -> the identity of its GPU (or MIG instance)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _label(labels: Mapping[str, str], name: str) -> str | None:
    """A label by exact name, else by case-insensitive name; empty counts as absent."""
    value = labels.get(name)
    if value:
        return value
    lowered = name.lower()
    for key in sorted(labels):
        if key.lower() == lowered and labels[key]:
            return labels[key]
    return None


def _instance_host(instance: str) -> str:
    """`host:9400` -> `host`, `[::1]:9400` -> `::1`, `scheme://host:port/x` -> `host`."""
    text = instance.split("://", 1)[-1].split("/", 1)[0]
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def normalize_labels(labels: Mapping[str, str]) -> dict[str, Any]:
    """dcgm-exporter labels of one series -> the identity columns of its GPU.

    `hostname` comes from `Hostname` or `hostname` (matched case-insensitively), else
    from the host part of `instance`. `gpu_key` is `<hostname>/<UUID>`, plus
    `/<GPU_I_ID>` for a MIG instance (ALLOCATION.md: hostname + GPU UUID; a MIG instance
    adds its instance id). `metric` is the series' `__name__` (None when absent).
    """
    instance = _label(labels, "instance")
    host = _label(labels, "Hostname")
    if host is None and instance is not None:
        host = _instance_host(instance) or None
    uuid = _label(labels, "UUID")
    mig_id = _label(labels, "GPU_I_ID")
    key = f"{host or ''}/{uuid or ''}"
    if mig_id is not None:
        key += f"/{mig_id}"
    return {
        "metric": labels.get("__name__") or None,
        "gpu_key": key,
        "hostname": host,
        "gpu_uuid": uuid,
        "gpu_index": _int_or_none(_label(labels, "gpu")),
        "mig_instance_id": _int_or_none(mig_id),
        "mig_profile": _label(labels, "GPU_I_PROFILE"),
        "model_name": _label(labels, "modelName"),
        "pci_bus_id": _label(labels, "pci_bus_id"),
        "driver_version": _label(labels, "DCGM_FI_DRIVER_VERSION"),
        "instance": instance,
        "job": _label(labels, "job"),
    }
