"""The ``compressflow`` command: thin typer commands over the engine.

Nothing here imports torch or mlflow at module level, so ``--help`` stays instant.
"""

from __future__ import annotations

import typer

from compressflow.cli import comparing, info, joining, running

app = typer.Typer(
    name="compressflow",
    help="Compress PyTorch models with YAML pipelines of plugin stages, every result in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("run")(running.run)
app.command("validate")(running.validate)
app.command("plugins")(info.plugins)
app.command("schema")(info.schema)
app.command("compare")(comparing.compare)
app.command("ui")(comparing.ui)
app.command("join")(joining.join)


def main() -> None:
    """Entry point of the console script."""
    app()
