"""``compressflow run`` and ``compressflow validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compressflow.cli.errors import reports_errors

PipelineArg = Annotated[Path, typer.Argument(help="The pipeline YAML file.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a value: --set stages.2.prune.sparsity=0.9 (repeatable).")]


def _warn_broken(plugins) -> None:
    import sys

    for broken in plugins.broken:
        print(f"warning: {broken.describe()}", file=sys.stderr)


@reports_errors
def validate(
    pipeline: PipelineArg,
    set_: SetOpt = None,
    trusted_only: Annotated[bool, typer.Option(
        "--trusted-only", help="Refuse model sources that run code: import:, mlflow: and "
        "pickled files (sets COMPRESSFLOW_TRUSTED_ONLY=1).")] = False,
) -> None:
    """Check a pipeline file, every stage's params included, without running anything."""
    import os

    from compressflow.engine import validate as validate_plan
    from compressflow.plugins import TRUSTED_ONLY_ENV, load_plugins

    if trusted_only:  # the model sources read it, in sweep worker processes too
        os.environ[TRUSTED_ONLY_ENV] = "1"
    plugins = load_plugins()
    _warn_broken(plugins)
    plan = validate_plan(pipeline, set_ or [], plugins)
    if plan.spec.sweep is not None:  # every variant's values validate too, as `run` would
        from compressflow.sweep import plan_variants

        plan_variants(pipeline, set_ or [], plugins)
    typer.echo(f"{pipeline}: valid, {len(plan.stages)} stages: "
               + " -> ".join(f"{p.entry.name} ({p.stage.kind}/{p.stage.method})" for p in plan.stages))


@reports_errors
def run(
    pipeline: PipelineArg,
    set_: SetOpt = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default: the pipeline's).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow store (default: sqlite:///mlflow.db).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and show the plan; run nothing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; the summary only.")] = False,
    jobs: Annotated[int, typer.Option(min=1, help="Sweep variants run in this many processes.")] = 1,
    executor: Annotated[str, typer.Option(
        help="Where sweep variants run: local (this machine), or an executor a plugin adds "
        "(ray: `pip install compressflow[ray]`); `compressflow plugins` lists them.")] = "local",
    address: Annotated[Optional[str], typer.Option(
        help="The executor's cluster (ray: auto, HOST:6379 or ray://HOST:10001; default: a "
        "local one).")] = None,
    reuse: Annotated[Optional[bool], typer.Option(
        "--reuse/--no-reuse", help="Take stages already logged with the same key from the store "
        "(default: on for sweeps, off otherwise).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the latest unfinished (killed, failed) run of this pipeline "
        "in its experiment: its finished stages are kept, the rest run, with the figures an "
        "uninterrupted run gives. A sweep reuses finished stages already.")] = False,
    trusted_only: Annotated[bool, typer.Option(
        "--trusted-only", help="Refuse model sources that run code: import:, mlflow: and "
        "pickled files (sets COMPRESSFLOW_TRUSTED_ONLY=1).")] = False,
) -> None:
    """Run a pipeline: every stage in order, every model and metric logged to MLflow.

    A pipeline with `sweep:` runs every variant into one experiment, then logs a summary run
    with the comparison table, the Pareto plot and (with `register:`) the registered pick.
    Exit codes: 0 done, 1 a stage failed (its run is FAILED, earlier ones kept), 2 bad input,
    3 a quality gate stopped the pipeline.
    """
    from compressflow.cli.output import print_plan, print_summary, progress_observer
    from compressflow.config import load_pipeline
    from compressflow.engine import validate as validate_plan
    from compressflow.plugins import TRUSTED_ONLY_ENV, load_plugins

    if trusted_only:  # the model sources read it, in sweep worker processes too
        import os

        os.environ[TRUSTED_ONLY_ENV] = "1"
    plugins = load_plugins()
    _warn_broken(plugins)
    overrides = set_ or []
    if load_pipeline(pipeline, overrides).spec.sweep:
        from compressflow.cli.sweeping import run_sweep
        from compressflow.executor import ExecutorOptions

        run_sweep(pipeline, overrides, plugins, experiment, tracking_uri, dry_run, quiet,
                  (executor, ExecutorOptions(jobs, address)), True if reuse is None or resume else reuse)
        return
    if executor != "local" or address:
        from compressflow.errors import ConfigError

        raise ConfigError(f"--executor {executor} and --address run sweep variants; {pipeline} has no sweep:",
                          "add a sweep: section, or leave both options out")
    plan = validate_plan(pipeline, overrides, plugins)
    if dry_run:
        print_plan(plan)
        return
    from compressflow.runner import PipelineRunner

    runner = PipelineRunner(plan, tracking_uri, experiment, reuse=bool(reuse), resume=resume)
    try:
        with progress_observer(plugins, len(plan.stages), enabled=not quiet):
            ctx = runner.run()
    finally:
        runner.cleanup()
    print_summary(ctx)
