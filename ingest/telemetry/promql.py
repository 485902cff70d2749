"""The PromQL of a pull: series selectors and the GPU discovery query."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ingest.telemetry.schema import METRIC_NAMES


def _promql_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _regex_literal(text: str) -> str:
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def series_selector(job: str | None, uuids: Sequence[str] | None = None) -> str:
    matchers = []
    if job:
        matchers.append(f"job={_promql_string(job)}")
    if uuids is not None:
        matchers.append(f"UUID=~{_promql_string('|'.join(_regex_literal(u) for u in uuids))}")
    return "{" + ",".join(matchers) + "}"


def discovery_query(job: str | None, range_ms: int) -> str:
    selector = series_selector(job)
    inner = " or ".join(f"last_over_time({m}{selector}[{range_ms}ms])" for m in METRIC_NAMES)
    return f"group by (UUID, GPU_I_ID, instance, Hostname, hostname) ({inner})"
