"""The dbt project as Dagster sees it: its manifest, and the dbt CLI resource.

The manifest (`dbt/target/manifest.json`) is what `@dbt_assets` builds the asset graph
from, so it must exist when the definitions load. `prepare_manifest()` runs `dbt parse`
in a child process when it is missing (a fresh clone) or older than a file of the
project (a model was edited), into a private folder first, so two processes loading the
definitions at once never see half a file. `make install` parses too. Parsing needs
neither settings nor a warehouse: the profile's DuckDB path falls back to `:memory:`.

`GpuledgerDbtResource` is dagster-dbt's `DbtCliResource` (dbt in a child process)
pointed at the warehouse of the run's settings: `cli_on(settings, args, context=...)`
sets GPULEDGER_DUCKDB_PATH for the child, and uses `<state_dir>/dbt-target` as the
target path (as `pipelines.allocation.run_dbt` does). It never opens dbt's DuckDB
adapter in the Dagster process: DuckDB refuses a second connection to a file with a
different configuration (the adapter asks for READ_ONLY), and the dbt child holds the
write lock while it runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliInvocation, DbtCliResource, DbtProject

from ingest.settings import Settings
from models.errors import ServiceError
from pipelines.allocation import DBT_PROJECT_DIR, dbt_executable

__all__ = [
    "DBT_PROJECT",
    "GpuledgerDbtResource",
    "dbt_resource",
    "dbt_target_path",
    "manifest_is_stale",
    "prepare_manifest",
]

DBT_PROJECT = DbtProject(project_dir=DBT_PROJECT_DIR, target_path="target")

#: The files whose change changes the manifest.
_PROJECT_GLOBS = ("dbt_project.yml", "profiles.yml", "models/**/*", "macros/**/*", "tests/**/*")

_ENV_LOCK = threading.Lock()


def manifest_is_stale(manifest: Path = DBT_PROJECT.manifest_path) -> bool:
    """No manifest, or a project file newer than it."""
    if not manifest.is_file():
        return True
    built = manifest.stat().st_mtime
    for pattern in _PROJECT_GLOBS:
        for path in DBT_PROJECT_DIR.glob(pattern):
            if path.is_file() and path.stat().st_mtime > built:
                return True
    return False


def prepare_manifest() -> Path:
    """The manifest's path, after `dbt parse` when it is missing or stale.

    A failed parse with an older manifest in place keeps that one (with a warning), so
    a model being edited does not stop the other domains from loading; without any
    manifest it is a ServiceError naming dbt's last lines.
    """
    manifest = DBT_PROJECT.manifest_path
    if not manifest_is_stale(manifest):
        return manifest
    manifest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".parse-", dir=manifest.parent))
    # Parse never connects, but keep it off any warehouse the environment names.
    env = {k: v for k, v in os.environ.items() if k != "GPULEDGER_DUCKDB_PATH"}
    env["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    try:
        done = subprocess.run(
            [
                dbt_executable(),
                "parse",
                "--quiet",
                "--project-dir",
                str(DBT_PROJECT_DIR),
                "--profiles-dir",
                str(DBT_PROJECT_DIR),
                "--target-path",
                str(scratch),
                "--log-path",
                str(scratch),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        parsed = scratch / "manifest.json"
        if done.returncode == 0 and parsed.is_file():
            parsed.replace(manifest)
            return manifest
        tail = " / ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        if manifest.is_file():
            warnings.warn(
                f"dbt parse failed (exit {done.returncode}), using the older manifest "
                f"{manifest}: {tail}",
                stacklevel=2,
            )
            return manifest
        raise ServiceError(f"dbt parse failed (exit {done.returncode}): {tail}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def dbt_target_path(settings: Settings) -> Path:
    """Where a run's dbt artifacts go (run_results.json, compiled SQL, dbt.log)."""
    return (settings.state_dir / "dbt-target").resolve()


@contextmanager
def _environment(extra: Mapping[str, str]) -> Iterator[None]:
    """`extra` in os.environ while the dbt child is started (DbtCliResource copies the
    environment then, and offers no other way to add to it)."""
    with _ENV_LOCK:
        saved = {name: os.environ.get(name) for name in extra}
        os.environ.update(extra)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class GpuledgerDbtResource(DbtCliResource):
    """dbt in a child process, on the warehouse of the run's settings."""

    def cli_on(
        self,
        settings: Settings,
        args: Sequence[str],
        *,
        context: dg.AssetExecutionContext | dg.OpExecutionContext | None = None,
    ) -> DbtCliInvocation:
        """Start `dbt <args>` on `settings`' warehouse; failures are left to the caller
        (`raise_on_error=False`), which reads them from run_results.json."""
        env = {
            "GPULEDGER_DUCKDB_PATH": str(settings.warehouse_path.resolve()),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        }
        target = dbt_target_path(settings)
        # The target path is reused run after run: a run that fails before dbt writes
        # its results must not be read as the previous run's.
        (target / "run_results.json").unlink(missing_ok=True)
        with _environment(env):
            return self.cli(
                list(args),
                context=context,
                target_path=target,
                raise_on_error=False,
            )

    def _initialize_dbt_core_adapter(self, args: Sequence[str]) -> Any:
        # dagster-dbt opens dbt's adapter in this process only to fetch column metadata
        # or row counts, which gpuledger does not ask for; see the module docstring.
        del args
        return None


def dbt_resource() -> GpuledgerDbtResource:
    """The resource as deployed: the dbt next to this Python (the venv's), else PATH's."""
    beside = Path(sys.executable).parent / "dbt"
    return GpuledgerDbtResource(
        project_dir=DBT_PROJECT, dbt_executable=str(beside) if beside.exists() else "dbt"
    )
