"""Comparing an experiment's pipelines: final figures, the Pareto front, a pick, a plot.

A row is a parent run (one ``compressflow run`` or one sweep variant) with the figures of
its final stage. The front holds the rows no other row beats on both the task metric
(higher is better unless the metric says otherwise) and the cost; gate-failed and failed
runs are listed but never on the front.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compressflow.gates import size_of
from compressflow.tracking import Tag

COSTS = ("size_bytes", "latency_ms_b1", "macs")


@dataclass
class Row:
    """One pipeline run's final figures."""

    run_id: str
    run_name: str
    status: str
    gate: str
    metric: float | None
    cost: float | None
    figures: dict[str, float]
    variant: dict[str, str] = field(default_factory=dict)
    model_uri: str | None = None
    pareto: bool = False

    @property
    def eligible(self) -> bool:
        """Finished, gate passed, and measured: may be on the front."""
        return self.status == "FINISHED" and self.gate != "failed" and None not in (self.metric, self.cost)


def cost_of(figures: dict[str, float], by: str) -> float | None:
    """The cost figure; for size, the packed file where the pipeline wrote one."""
    if by == "size_bytes":
        return size_of(figures) if "size_bytes" in figures else None
    return figures.get(by)


def headline(uri: str, experiment: str) -> tuple[str, bool]:
    """The metric the experiment's newest pipeline run ranks by, and its direction (runs
    logged before tasks existed: accuracy, higher is better)."""
    from compressflow.store import experiment_runs

    for run in reversed(experiment_runs(uri, experiment, order_by=["attributes.start_time ASC"]) or []):
        if Tag.METRIC in run.data.tags:
            return run.data.tags[Tag.METRIC], run.data.tags.get(Tag.HIGHER_IS_BETTER) != "false"
    return "accuracy", True


def load_rows(uri: str, experiment: str, metric: str = "accuracy", by: str = "size_bytes",
              sweep_id: str | None = None) -> list[Row]:
    """Every pipeline (parent) run of ``experiment``, oldest first; a sweep's alone if given."""
    from compressflow.errors import ConfigError
    from compressflow.store import experiment_names, experiment_runs

    runs = experiment_runs(uri, experiment, order_by=["attributes.start_time ASC"])
    if runs is None:
        names = experiment_names(uri)
        if names is None:
            raise ConfigError(f"no store at {uri}", "run a pipeline first, or pass --tracking-uri")
        raise ConfigError(f"no experiment '{experiment}' in {uri}",
                          f"experiments there: {', '.join(names) or 'none'}; check --tracking-uri")
    rows = []
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" in tags or tags.get(Tag.KIND) == "sweep-summary":
            continue
        if sweep_id and tags.get(Tag.SWEEP_ID) != sweep_id:
            continue
        figures = dict(run.data.metrics)
        rows.append(Row(
            run_id=run.info.run_id, run_name=run.info.run_name, status=run.info.status,
            gate=tags.get(Tag.GATE, "passed" if run.info.status == "FINISHED" else "-"),
            metric=figures.get(metric), cost=cost_of(figures, by), figures=figures,
            variant={k.removeprefix("sweep."): v for k, v in run.data.params.items()
                     if k.startswith("sweep.")},
            model_uri=tags.get(Tag.FINAL_MODEL_URI),
        ))
    mark_pareto(rows)
    return rows


def mark_pareto(rows: list[Row], higher_is_better: bool = True) -> list[Row]:
    """Set ``pareto`` on the rows no eligible row dominates (better or equal on both, better on one)."""
    sign = 1 if higher_is_better else -1
    eligible = [r for r in rows if r.eligible]
    for row in rows:
        row.pareto = row.eligible and not any(
            sign * other.metric >= sign * row.metric and other.cost <= row.cost
            and (sign * other.metric > sign * row.metric or other.cost < row.cost)
            for other in eligible)
    return rows


def select(rows: list[Row], max_metric_drop: float, then: str, higher_is_better: bool = True) -> Row | None:
    """pareto-best: on the front, within ``max_metric_drop`` of the best metric, the cheapest."""
    front = [r for r in rows if r.pareto]
    if not front:
        return None
    sign = 1 if higher_is_better else -1
    best = max(sign * r.metric for r in front)
    within = [r for r in front if best - sign * r.metric <= max_metric_drop + 1e-12]
    figure = {"smallest": "size_bytes", "fastest": "latency_ms_b1", "fewest-macs": "macs"}[then]
    return min(within, key=lambda r: (cost_of(r.figures, figure) or float("inf"), -sign * r.metric))


def as_table(rows: list[Row], metric: str, by: str) -> list[dict[str, Any]]:
    """Rows as plain dicts for printing and JSON."""
    table = []
    for row in rows:
        figures = row.figures
        table.append({
            "run": row.run_name, "run_id": row.run_id, "status": row.status, "gate": row.gate,
            **{f"sweep.{k}": v for k, v in row.variant.items()},
            metric: row.metric, by: row.cost,
            "size_bytes": cost_of(figures, "size_bytes"), "latency_ms_b1": figures.get("latency_ms_b1"),
            "size_ratio": figures.get("compressed_ratio") or figures.get("size_ratio"),
            "latency_b1_speedup": figures.get("latency_b1_speedup"),
            "pareto": row.pareto,
        })
    return table


def to_json(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows with every figure, for ``--json``."""
    return [asdict(row) for row in rows]


def plot(rows: list[Row], metric: str, by: str, path: Path, title: str) -> Path:
    """Metric against cost, every run labelled, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.metric is not None and r.cost is not None]
    figure, axes = plt.subplots(figsize=(8, 5))
    for row in shown:
        colour = "tab:red" if row.pareto else ("tab:gray" if row.eligible else "black")
        axes.scatter(row.cost, row.metric, color=colour, marker="o" if row.eligible else "x")
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row.variant.items()) or row.run_name
        axes.annotate(label, (row.cost, row.metric), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((r for r in shown if r.pareto), key=lambda r: r.cost)
    if front:
        axes.step([r.cost for r in front], [r.metric for r in front], where="post",
                  color="tab:red", label="Pareto front")
        axes.legend()
    axes.set_xlabel(by + (" (log)" if by != "latency_ms_b1" else ""))
    if by != "latency_ms_b1":
        axes.set_xscale("log")
    axes.set_ylabel(metric)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
