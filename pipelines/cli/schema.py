"""`gpuledger schema`: the published JSON Schema of the usage event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from models.usage_event import usage_event_json_schema
from pipelines.cli.app import app

#: Where the schema is published in the repository.
SCHEMA_PATH = (
    Path(__file__).resolve().parents[2] / "models" / "schemas" / "usage-event-v1.schema.json"
)


def render_schema() -> str:
    return json.dumps(usage_event_json_schema(), indent=2, sort_keys=False) + "\n"


@app.command("schema")
def schema_command(
    write: Annotated[
        bool,
        typer.Option(
            "--write", help=f"Write it to {SCHEMA_PATH.relative_to(SCHEMA_PATH.parents[2])}."
        ),
    ] = False,
) -> None:
    """Print the usage event v1 JSON Schema (generated from the pydantic contract)."""
    text = render_schema()
    if write:
        SCHEMA_PATH.write_text(text)
        typer.echo(f"wrote {SCHEMA_PATH}")
    else:
        typer.echo(text, nl=False)
