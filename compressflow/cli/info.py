"""``compressflow plugins`` and ``compressflow schema``: what the installed plugins offer."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from compressflow.cli.errors import reports_errors


@reports_errors
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """List every stage kind/method with the distribution that provides it and its params."""
    from compressflow.plugins import load_plugins
    from compressflow.schema import plugin_listing

    listing = plugin_listing(load_plugins())
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    from compressflow.cli.output import print_plugins

    print_plugins(listing)


@reports_errors
def schema() -> None:
    """Print the JSON Schema of a pipeline file, every installed stage's params included."""
    from compressflow.plugins import load_plugins
    from compressflow.schema import pipeline_schema

    typer.echo(json.dumps(pipeline_schema(load_plugins()), indent=2))
