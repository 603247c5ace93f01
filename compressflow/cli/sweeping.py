"""``compressflow run`` on a pipeline with ``sweep:``: plan, run the variants, summarize."""

from __future__ import annotations

import sys

from rich.markup import escape
from rich.table import Table

from compressflow.cli.output import console, reuse_caveat


def run_sweep(pipeline, overrides, plugins, experiment, tracking_uri, dry_run, quiet, on, reuse) -> None:
    """Validate every variant, show or run them (``on``: the executor's name and options),
    then print the comparison."""
    from compressflow import sweep
    from compressflow.gates import GateFailed
    from compressflow.errors import StageFailed
    from compressflow.store import check_uri
    from compressflow.tracking import DEFAULT_URI

    name, options = on
    executor = plugins.executors.get(name, "--executor")
    variants = sweep.plan_variants(pipeline, overrides, plugins)
    spec = variants[0].plan.spec
    uri = tracking_uri or spec.tracking.uri or DEFAULT_URI
    check_uri(uri)
    experiment = experiment or spec.tracking.experiment or spec.name
    if dry_run:
        fates = sweep.reuse_plan(variants, _logged_keys(uri, experiment) if reuse else set())
        caveat = reuse_caveat(spec)
        if caveat:  # reuse needs logged models: every stage would run
            fates = [["run"] * len(row) for row in fates]
        _print_variants(variants, fates)
        if caveat:
            console.print(f"[yellow]note[/]: {caveat}")
        return
    if not reuse:
        raise_no_reuse()
    sweep_id, outcomes = sweep.run_variants(variants, pipeline, overrides, uri, experiment, executor, options)
    for outcome in outcomes:
        if not quiet:
            console.print(f"variant {outcome.variant}: {outcome.status}  computed: "
                          f"{', '.join(outcome.computed) or '-'}  reused: {', '.join(outcome.reused) or '-'}")
        if outcome.message:
            print(f"variant {outcome.variant}: {outcome.message}", file=sys.stderr)
    summary = sweep.summarize(variants, sweep_id, uri, experiment)
    _print_comparison(summary, spec.evaluation.metric, sweep_id)
    statuses = {o.status for o in outcomes}
    if "KILLED" in statuses:  # the executor lost a worker, or cancelled it
        raise StageFailed(f"sweep {sweep_id}: a variant was killed", "see the messages above; "
                          "`compressflow run` again reuses every stage that finished")
    if "FAILED" in statuses:
        raise StageFailed(f"sweep {sweep_id}: a variant failed", "see the messages above; the other variants are logged")
    if statuses == {"GATE_FAILED"}:
        raise GateFailed(f"sweep {sweep_id}: every variant failed its gate", "loosen the gates or the values")


def raise_no_reuse() -> None:
    """Sweeps share stages by reuse; without it every variant would retrain everything."""
    from compressflow.errors import ConfigError

    raise ConfigError("--no-reuse is not supported for sweeps",
                      "run the variants as separate `compressflow run --set ...` commands instead")


def _logged_keys(uri: str, experiment: str) -> set[str]:
    from compressflow.store import experiment_runs
    from compressflow.tracking import Tag

    runs = experiment_runs(uri, experiment, "attributes.status = 'FINISHED'") or []
    return {r.data.tags[Tag.STAGE_KEY] for r in runs
            if Tag.STAGE_KEY in r.data.tags and Tag.MODEL_URI in r.data.tags}


def _print_variants(variants, fates) -> None:
    stages = ["input", *(p.entry.name for p in variants[0].plan.stages)]
    table = Table(title=f"{variants[0].plan.spec.name}: {len(variants)} variants (dry run)")
    table.add_column("#")
    table.add_column("values")
    for name in stages:
        table.add_column(name, overflow="fold")
    for variant, row in zip(variants, fates):
        table.add_row(str(variant.index), escape(variant.label), *row)
    console.print(table)


def _print_comparison(summary, metric: str, sweep_id: str) -> None:
    rows = summary["table"]
    table = Table(title=f"sweep {sweep_id}: * = Pareto front ({metric} vs bytes on disk)")
    for column in ("run", "status", "gate", metric, "size_bytes", "size x", "latency_ms_b1", "pareto"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(escape(row["run"]), row["status"], row["gate"], _num(row[metric]), _num(row["size_bytes"], ",.0f"),
                      _num(row["size_ratio"], ".2f"), _num(row["latency_ms_b1"]), "*" if row["pareto"] else "")
    console.print(table)
    chosen = summary["chosen"]
    if chosen is not None:
        console.print(f"registered: {escape(chosen.run_name)} (run {chosen.run_id})")


def _num(value, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)
