"""What the CLI prints: the plan, live progress (a lifecycle-hook observer), the summary."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table

from compressflow.hookspecs import hookimpl

# wide enough for the summary even when stdout is not a terminal (rich would assume 80)
console = Console(width=None if Console().is_terminal else 140)


class ProgressObserver:
    """Shows one bar for the pipeline's stages and one for the running stage's epochs."""

    def __init__(self, progress: Progress, stage_count: int) -> None:
        self.progress = progress
        self.stages = progress.add_task("stages", total=stage_count)
        self.current = None

    @hookimpl
    def stage_start(self, stage) -> None:
        self.current = self.progress.add_task(f"{stage.name} ({stage.kind}/{stage.method})", total=None)

    @hookimpl
    def stage_progress(self, stage, step, total, metrics) -> None:
        shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.progress.update(self.current, completed=step, total=total,
                             description=f"{stage.name}  {shown}")

    @hookimpl
    def stage_end(self, stage, result) -> None:
        self.progress.update(self.current, visible=False)
        self.progress.advance(self.stages)
        self.progress.console.print(f"[green]done[/] {stage.name}")

    @hookimpl
    def stage_error(self, stage, error) -> None:
        self.progress.console.print(f"[red]failed[/] {stage.name}: {type(error).__name__}")


@contextlib.contextmanager
def progress_observer(plugins, stage_count: int, enabled: bool) -> Iterator[None]:
    """Register a progress observer for the duration of a run."""
    if not enabled:
        yield
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        observer = ProgressObserver(progress, stage_count)
        plugins.add_observer(observer, "compressflow-cli-progress")
        try:
            yield
        finally:
            plugins.remove_observer("compressflow-cli-progress")


def print_plan(plan) -> None:
    """The validated stages, their methods, providers and resolved params."""
    table = Table(title=f"{plan.spec.name}: {len(plan.stages)} stages (dry run)")
    for column in ("#", "stage", "kind/method", "plugin", "params"):
        table.add_column(column)
    for planned in plan.stages:
        params = ", ".join(f"{k}={v}" for k, v in planned.stage.params.model_dump(mode="json").items())
        table.add_row(str(planned.entry.index), planned.entry.name,
                      f"{planned.stage.kind}/{planned.stage.method}", str(planned.provider), params)
    console.print(table)
    caveat = reuse_caveat(plan.spec)
    if caveat:
        console.print(f"[yellow]note[/]: {caveat}")


def reuse_caveat(spec) -> str | None:
    """Why no stage of ``spec`` can be reused, where that is so; else None.

    Reuse (``--reuse``, sweeps) takes a logged model from the store, so a plan that logs
    none must not promise it.
    """
    if spec.tracking.log_models:
        return None
    return ("tracking.log_models is false, so nothing will be reused: reuse (--reuse, sweeps) "
            "takes a stage's logged model from the store, and every stage will run")


def print_summary(ctx) -> None:
    """One row a stage: the metric, size, sparsity, latency and ratios to the input."""
    metric = ctx.spec.evaluation.metric
    table = Table(title=f"{ctx.spec.name}  (experiment '{ctx.experiment}', run {ctx.run_id})")
    at = ctx.summary[0]["timed_at"] if ctx.summary else "b1"
    for column in ("stage", "method", metric, "size_bytes", "sparsity", f"latency ms ({at})",
                   "smaller x", f"faster x ({at})"):
        table.add_column(column, overflow="fold")
    for row in ctx.summary:
        latency = row.get("latency_ms", row["latency_ms_b1"])
        size, smaller = f"{row['size_bytes']:,}", f"{row['size_ratio']:.2f}"
        if row.get("compressed_bytes"):
            size += f" (packed {int(row['compressed_bytes']):,})"
            smaller += f" (packed {row['compressed_ratio']:.1f})"
        speedup = row.get("latency_speedup", row["latency_b1_speedup"])
        table.add_row(row["stage"], row["method"], f"{row[metric]:.4f}", size,
                      f"{row['sparsity']:.1%}", "-" if latency is None else f"{latency:.3f}",
                      smaller, "-" if speedup is None else f"{speedup:.2f}")
    console.print(table)
    for row in ctx.summary:
        if row["notes"]:
            console.print(f"  {row['stage']}: {row['notes']}")
    console.print(f"tracking: {ctx.tracking_uri}  (mlflow ui --backend-store-uri {ctx.tracking_uri})")


def print_plugins(listing: dict) -> None:
    """Stages (with params and defaults), then sources, metrics, executors, tasks, datasets,
    broken plugins and conflicts."""
    table = Table(title="stages")
    for column in ("kind/method", "provided by", "params (default)"):
        table.add_column(column, overflow="fold")
    for stage in listing["stages"]:
        params = ", ".join(
            f"{name}" + ("" if p["required"] else f"={p['default']}") for name, p in stage["params"].items())
        default = " (default)" if stage["default"] else ""
        table.add_row(f"{stage['kind']}/{stage['method']}{default}",
                      f"{stage['plugin']}: {stage['distribution']} {stage['version']}", params)
    console.print(table)
    for section in ("model_sources", "metrics", "executors"):
        names = ", ".join(f"{e['name']} ({e['distribution']})" for e in listing[section]) or "none"
        console.print(f"[bold]{section.replace('_', ' ')}[/]: {names}")
    tasks = Table(title="tasks")
    for column in ("task", "provided by", "metrics (default first)"):
        tasks.add_column(column, overflow="fold")
    for task in listing["tasks"]:
        metrics = sorted(task["metrics"], key=lambda m: m != task["default_metric"])
        tasks.add_row(task["name"], f"{task['plugin']}: {task['distribution']}", ", ".join(
            f"{m} ({'higher' if task['metrics'][m]['higher_is_better'] else 'lower'} is better)"
            for m in metrics))
    console.print(tasks)
    datasets = Table(title="datasets (data.args)")
    for column in ("dataset", "provided by", "tasks", "args (default)"):
        datasets.add_column(column, overflow="fold")
    for entry in listing["datasets"]:
        params = "not declared (a factory: args unchecked)" if entry["params"] is None else ", ".join(
            name + ("" if p["required"] else f"={p['default']}") for name, p in entry["params"].items())
        datasets.add_row(entry["name"], f"{entry['plugin']}: {entry['distribution']}",
                         ", ".join(entry["tasks"]) or "any", params or "-")
    console.print(datasets)
    for broken in listing["broken"]:
        console.print(f"[red]broken[/]: {broken['entry_point']} from {broken['distribution']}: {broken['error']}")
    for conflict in listing.get("conflicts", []):  # the first registration is the one shown
        console.print(f"[red]conflict[/]: {escape(conflict['message'])}\n  hint: {escape(conflict['hint'])}")


def print_comparison(rows: list[dict], metric: str, by: str, experiment: str) -> None:
    """The compare table: one row a pipeline run, Pareto rows starred."""
    table = Table(title=f"{experiment}: {metric} vs {by}  (* = Pareto front)")
    columns = [c for c in rows[0] if c != "run_id"] if rows else []
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[escape(_shown(row[c], c)) for c in columns])
    console.print(table)


def _shown(value, column: str) -> str:
    if column == "pareto":
        return "*" if value else ""
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"
    return "-" if value is None else str(value)
