"""Dagster entry point: a loader plus project-wide policy, nothing else.

Each domain folder under `pipelines/defs/` (usage, telemetry, allocation, billing,
efficiency, assurance) returns its own `Definitions`; they are merged here. The domains arrive
with the ingestion and allocation work.
"""

from __future__ import annotations

import importlib
import pkgutil

import dagster as dg

import pipelines.defs


def build_definitions() -> dg.Definitions:
    parts = []
    for module_info in sorted(pkgutil.iter_modules(pipelines.defs.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"pipelines.defs.{module_info.name}")
        parts.append(module.definitions())
    return dg.Definitions.merge(*parts) if parts else dg.Definitions()


defs = build_definitions()
