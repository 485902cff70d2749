"""`gpuledger dashboard`: the Streamlit dashboard over the published analytics catalog."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

import pipelines
from ingest.settings import Settings
from models.errors import InputError
from pipelines.cli.app import app, state

#: The dashboard is not an installed package; it lives beside `pipelines/` in the repo.
DASHBOARD_APP = Path(pipelines.__file__).resolve().parents[1] / "dashboards" / "app.py"


def dashboard_catalog(settings: Settings, catalog: Path | None) -> Path:
    """The catalog to show: `catalog` if given, else the settings' published one."""
    return (catalog or settings.analytics_path).expanduser().resolve()


def dashboard_command(
    settings: Settings, catalog: Path | None, host: str = "127.0.0.1", port: int = 8501
) -> list[str]:
    """The argv that serves the dashboard over `catalog` on host:port, headless."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(DASHBOARD_APP),
        "--server.headless",
        "true",
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
        # A served dashboard, not a development session: no Deploy button or rerun
        # menu, and no file watcher on the source tree.
        "--client.toolbarMode",
        "viewer",
        "--server.fileWatcherType",
        "none",
        "--",
        "--catalog",
        str(dashboard_catalog(settings, catalog)),
    ]


@app.command("dashboard")
def dashboard(
    ctx: typer.Context,
    catalog: Annotated[
        Path | None,
        typer.Option(
            help="Published analytics catalog (DuckDB). [default: the settings' "
            "published/analytics.duckdb]",
            dir_okay=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8501,
    print_url_only: Annotated[
        bool, typer.Option(help="Print the URL and exit without starting the server.")
    ] = False,
) -> None:
    """Serve the browser dashboard (Streamlit) over the published analytics catalog."""
    settings = state(ctx).settings()
    path = dashboard_catalog(settings, catalog)
    if not path.is_file():
        raise InputError(
            f"--catalog: no published snapshot at {path}; run `make demo` to publish one"
        )
    typer.echo(f"http://{host}:{port}/")
    if print_url_only:
        return
    argv = dashboard_command(settings, path, host, port)
    sys.stdout.flush()
    os.execv(argv[0], argv)
