"""``compressflow compare`` and ``compressflow ui``: reading what the pipelines logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from compressflow.cli.errors import reports_errors

UriOpt = Annotated[Optional[str], typer.Option(help="MLflow store (default: sqlite:///mlflow.db).")]


@reports_errors
def compare(
    experiment: Annotated[Optional[str], typer.Argument(help="Experiment (default: the only one, or 'quickstart').")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Task metric to compare (default: the pipeline's own).")] = None,
    by: Annotated[str, typer.Option(help="Cost: size_bytes, latency_ms_b1 or macs.")] = "size_bytes",
    tracking_uri: UriOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw metric against cost to this PNG.")] = None,
    lower_is_better: Annotated[bool, typer.Option("--lower-is-better", help="The metric is a loss (default: as the task says).")] = False,
) -> None:
    """Compare an experiment's pipeline runs: final metric, cost, ratios, gates, Pareto front."""
    from compressflow import compare as comparing
    from compressflow.errors import ConfigError
    from compressflow.tracking import DEFAULT_URI

    if by not in comparing.COSTS:
        raise ConfigError(f"--by {by}: not a cost", f"choose one of {', '.join(comparing.COSTS)}")
    uri = tracking_uri or DEFAULT_URI
    experiment = experiment or _only_experiment(uri)
    logged, higher = comparing.headline(uri, experiment)
    if metric is not None and metric != logged:
        higher = True  # another metric: its direction is the flag's to say
    metric = metric or logged
    rows = comparing.mark_pareto(comparing.load_rows(uri, experiment, metric, by),
                                 higher and not lower_is_better)
    if plot is not None:
        comparing.plot(rows, metric, by, plot, experiment)
    if as_json:
        typer.echo(json.dumps(comparing.to_json(rows), indent=2, default=str))
        return
    from compressflow.cli.output import print_comparison

    print_comparison(comparing.as_table(rows, metric, by), metric, by, experiment)


def _only_experiment(uri: str) -> str:
    from compressflow.errors import ConfigError
    from compressflow.store import experiment_names

    names = experiment_names(uri)
    if names is None:
        raise ConfigError(f"no store at {uri}", "run a pipeline first, or pass --tracking-uri")
    names = [name for name in names if name != "Default"]
    if len(names) != 1:
        raise ConfigError(f"{uri} holds {len(names)} experiments: name one",
                          f"compressflow compare EXPERIMENT; there: {', '.join(names) or 'none'}")
    return names[0]


@reports_errors
def ui(
    tracking_uri: UriOpt = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Start the MLflow UI on 127.0.0.1 over the pipelines' store (one worker)."""
    import os
    import subprocess
    import sys

    from compressflow.store import prepare
    from compressflow.tracking import DEFAULT_URI

    uri = tracking_uri or DEFAULT_URI
    prepare(uri)  # a broken store is one message here, not the server's traceback
    typer.echo(f"MLflow UI for {uri}: http://127.0.0.1:{port}  (Ctrl-C stops it)")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        raise typer.Exit(subprocess.call(command, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
