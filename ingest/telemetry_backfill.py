"""Loading simulated DCGM telemetry into Prometheus as history.

The samples are written as OpenMetrics text and turned into TSDB blocks by
`promtool tsdb create-blocks-from openmetrics`; the blocks are moved into the local
stack's Prometheus data directory and Prometheus is restarted so they are queryable at
once (it would otherwise pick them up at its next block reload).

Two traps (DESIGN.md): a `counter` family's samples must end in `_total` in an
OpenMetrics backfill file, which would rename `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`, so
every family is declared `unknown` or `gauge` to keep dcgm-exporter's exact names; and
Prometheus deletes blocks older than its retention, so the local stack runs with a long
one.

Loading is idempotent per window: the series of the simulated nodes are deleted over
the window (admin API) before the new blocks go in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl

from ingest.simulator.telemetry import DCGM_INT64_BLANK, METRICS, Telemetry
from models.errors import ServiceError

#: promtool re-reads the input once per block window, so its time grows with the number
#: of windows the data spans. Measured here on 5.1 M samples of a simulated week (one
#: of two files): 337 s with its default 2 h, 52 s with 24 h, 16 s with 168 h, 14 s with
#: one window per year. Prometheus serves blocks of any length (the local stack's
#: retention of 10 years lets it keep them whole).
MAX_BLOCK_DURATION = "8760h"

StepCallback = Callable[[str], None]


@dataclass(frozen=True)
class BackfillReport:
    samples: int
    series: int
    blocks: int
    openmetrics_bytes: int


def _series_prefixes(telemetry: Telemetry) -> pl.DataFrame:
    """`metric{label="value",...}` per series, labels in dcgm-exporter's order."""
    labels = telemetry.label_names
    parts: list[pl.Expr] = []
    for i, name in enumerate(labels):
        sep = "" if i == 0 else ","
        parts.append(
            pl.when(pl.col(name).is_not_null())
            .then(pl.format(f'{sep}{name}="{{}}"', pl.col(name)))
            .otherwise(pl.lit(""))
        )
    inner = pl.concat_str(parts).str.strip_chars_start(",")
    return telemetry.series.select(
        "series_id", "metric", prefix=pl.format("{}{{{}}}", pl.col("metric"), inner)
    )


def write_openmetrics(telemetry: Telemetry, paths: list[Path]) -> int:
    """Write the samples as len(paths) OpenMetrics files, whole families per file."""
    prefixes = _series_prefixes(telemetry)
    integer = {m.name for m in METRICS if m.integer}
    counts = (
        telemetry.samples.join(prefixes.select("series_id", "metric"), on="series_id")
        .group_by("metric")
        .len()
    )
    size = dict(zip(counts["metric"].to_list(), counts["len"].to_list(), strict=True))
    # Greedy balance of families over files by sample count.
    groups: list[list[str]] = [[] for _ in paths]
    loads = [0] * len(paths)
    for metric in sorted(size, key=lambda m: -size[m]):
        slot = loads.index(min(loads))
        groups[slot].append(metric)
        loads[slot] += size[metric]
    written = 0
    for path, metrics in zip(paths, groups, strict=True):
        with path.open("wb") as handle:
            for metric_def in METRICS:
                if metric_def.name not in metrics:
                    continue
                kind = "unknown" if metric_def.kind == "counter" else "gauge"
                handle.write(
                    f"# HELP {metric_def.name} {metric_def.help}\n"
                    f"# TYPE {metric_def.name} {kind}\n".encode()
                )
                ids = prefixes.filter(pl.col("metric") == metric_def.name)
                lines = (
                    telemetry.samples.join(ids, on="series_id", how="inner", maintain_order="left")
                    .sort("series_id", "ts_ms", maintain_order=True)
                    .select(
                        line=pl.concat_str(
                            pl.col("prefix"),
                            pl.lit(" "),
                            _value_text(metric_def.name in integer),
                            pl.lit(" "),
                            (pl.col("ts_ms") // 1000).cast(pl.String),
                            pl.lit("."),
                            (pl.col("ts_ms") % 1000).cast(pl.String).str.zfill(3),
                        )
                    )
                )
                lines.write_csv(handle, include_header=False, quote_style="never")
                written += lines.height
            handle.write(b"# EOF\n")
    return written


def _value_text(integer: bool) -> pl.Expr:
    value = pl.col("value")
    if not integer:
        return value.cast(pl.String)
    # DCGM's int64 blank does not survive a float -> int64 cast; write it verbatim.
    return (
        pl.when(value >= 9e18)
        .then(pl.lit(str(DCGM_INT64_BLANK)))
        .otherwise(value.cast(pl.Int64).cast(pl.String))
    )


def promtool_path() -> str:
    found = shutil.which("promtool")
    if found is None:
        raise ServiceError(
            "promtool not found on PATH: install it with `apt-get install prometheus` "
            "(make demo and make test do this)"
        )
    return found


def create_blocks(openmetrics_files: list[Path], out_dir: Path) -> list[Path]:
    """Run promtool on each file (in parallel) and return the block directories."""
    promtool = promtool_path()
    out_dir.mkdir(parents=True, exist_ok=True)

    def run(path: Path) -> Path:
        target = out_dir / path.stem
        target.mkdir(exist_ok=True)
        result = subprocess.run(
            [
                promtool,
                "tsdb",
                "create-blocks-from",
                "openmetrics",
                f"--max-block-duration={MAX_BLOCK_DURATION}",
                str(path),
                str(target),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ServiceError(f"promtool failed on {path.name}: {tail[0]}")
        return target

    with ThreadPoolExecutor(max_workers=len(openmetrics_files)) as pool:
        targets = list(pool.map(run, openmetrics_files))
    return sorted(block for target in targets for block in target.iterdir() if block.is_dir())


def delete_window(
    prometheus_url: str, hostnames: list[str], start_ms: int, end_ms: int, *, job: str
) -> None:
    """Delete the DCGM series of `hostnames` over a window, then their tombstones."""
    instances = "|".join(f"{h}:[0-9]+" for h in hostnames)
    match = f'{{__name__=~"DCGM_.+",job="{job}",instance=~"{instances}"}}'
    try:
        with httpx.Client(base_url=prometheus_url, timeout=60.0) as client:
            response = client.post(
                "/api/v1/admin/tsdb/delete_series",
                params={"match[]": match, "start": start_ms / 1000, "end": end_ms / 1000},
            )
            response.raise_for_status()
            client.post("/api/v1/admin/tsdb/clean_tombstones").raise_for_status()
    except httpx.HTTPError as exc:
        raise ServiceError(
            f"Prometheus at {prometheus_url}: cannot delete the old window: {exc}"
        ) from None


def backfill(
    telemetry: Telemetry,
    work_dir: Path,
    data_dir: Path,
    *,
    on_step: StepCallback | None = None,
    parallelism: int | None = None,
) -> BackfillReport:
    """Write OpenMetrics files in `work_dir`, make blocks and move them into `data_dir`.

    The caller restarts Prometheus afterwards (the local stack does).
    """
    step = on_step or (lambda _name: None)
    work_dir.mkdir(parents=True, exist_ok=True)
    files = parallelism or max(1, min(4, os.cpu_count() or 1))
    paths = [work_dir / f"telemetry-{i}.om.txt" for i in range(files)]
    step("writing OpenMetrics")
    samples = write_openmetrics(telemetry, paths)
    size = sum(p.stat().st_size for p in paths)
    step("creating TSDB blocks")
    staging = work_dir / "blocks"
    if staging.exists():
        shutil.rmtree(staging)
    blocks = create_blocks(paths, staging)
    step("moving blocks into Prometheus")
    data_dir.mkdir(parents=True, exist_ok=True)
    for block in blocks:
        shutil.move(str(block), data_dir / block.name)
    shutil.rmtree(staging, ignore_errors=True)
    for path in paths:
        path.unlink()
    return BackfillReport(
        samples=samples, series=telemetry.series.height, blocks=len(blocks), openmetrics_bytes=size
    )
