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
    """List every stage kind/method with the distribution that provides it and its params.

    Broken plugins and names two plugins registered are listed too, with everything else,
    so that the culprit can be found; `run` and `validate` refuse a conflict.
    """
    from compressflow.plugins import load_plugins
    from compressflow.schema import plugin_listing

    plugins = load_plugins(strict=False)
    listing = plugin_listing(plugins)
    listing["conflicts"] = [{"message": c.message, "hint": c.hint} for c in plugins.conflicts]
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
