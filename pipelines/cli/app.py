"""The typer application; each command group lives in its own module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ingest.settings import Settings, load_settings


@dataclass
class CliState:
    config_file: Path | None = None

    def settings(self) -> Settings:
        return load_settings(self.config_file)


app = typer.Typer(
    name="gpuledger",
    help="Allocate measured GPU energy and time to every inference request, per tenant.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML settings file (default: $GPULEDGER_CONFIG, else ./gpuledger.toml).",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    ctx.obj = CliState(config_file=config)


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, CliState) else CliState()


def _register() -> None:
    # Command modules import `app` from here; importing them registers their commands.
    from pipelines.cli import (  # noqa: F401
        allocate,
        analytics,
        dashboard,
        demo,
        demo_live,
        gateway,
        ingest,
        invoice,
        schema,
        simulate,
        stack,
    )


_register()
