"""Sweeps: one pipeline file, many variants (``sweep:`` paths x values), one experiment.

Every variant is validated before the first one runs. Variants run with stage reuse: a
stage whose key (its input, params, plugin version, data, seed) another variant already
logged is taken from that run, so a 3x2 sweep over prune and quantize trains its baseline
once. Variants run one after another in this process, or on an executor
(:mod:`compressflow.executor`: ``--jobs N`` worker processes, or a plugin's, such as Ray);
a lock per stage key, held across the executor's workers, makes each shared stage computed
once, whoever gets there first.
"""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressflow.config import load_pipeline
from compressflow.engine import Plan, validate
from compressflow.errors import CompressflowError, ConfigError
from compressflow.executor import (ExecutorOptions, FileLocks, LocalExecutor, SweepExecutor,
                                   SweepJob, VariantOutcome, run_job)
from compressflow.plugins import Plugins
from compressflow.tracking import Tag


@dataclass
class Variant:
    """One point of the sweep: its values by path, and its validated plan."""

    index: int
    values: dict[str, Any]
    plan: Plan

    @property
    def label(self) -> str:
        """``sparsity=0.7, method=fake-quant``: the last part of each path and its value."""
        return ", ".join(f"{path.split('.')[-1]}={value}" for path, value in self.values.items())


def expand(sweep: dict[str, Any], place: str) -> list[dict[str, Any]]:
    """The variants' values: the cross product of the lists, or (mode: zip) their rows."""
    axes = dict(sweep)
    mode = axes.pop("mode", "product")
    if mode not in ("product", "zip"):
        raise ConfigError(f"{place}: sweep mode '{mode}' is neither product nor zip",
                          "write mode: product (every combination) or mode: zip (row by row)")
    if not axes:
        raise ConfigError(f"{place}: the sweep names no path", "e.g. stages.2.prune.sparsity: [0.5, 0.9]")
    for path, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{place}: sweep values of '{path}' must be a non-empty list")
    if mode == "zip":
        lengths = {len(v) for v in axes.values()}
        if len(lengths) > 1:
            raise ConfigError(f"{place}: mode zip needs lists of one length, got {sorted(lengths)}",
                              "give every path as many values, or use mode: product")
        return [dict(zip(axes, row)) for row in zip(*axes.values())]
    return [dict(zip(axes, row)) for row in itertools.product(*axes.values())]


def plan_variants(path: str | Path, overrides: list[str], plugins: Plugins) -> list[Variant]:
    """Expand the sweep and validate every variant, each named in its errors."""
    base = load_pipeline(path, overrides)
    place = base.place(("sweep",))
    variants = []
    for index, values in enumerate(expand(base.spec.sweep or {}, place)):
        try:
            plan = validate(path, [*overrides, *values.items()], plugins)
        except CompressflowError as error:
            error.message = f"sweep variant {index} ({values}): {error.message}"
            raise
        variants.append(Variant(index, values, plan))
    return variants


def reuse_plan(variants: list[Variant], logged: set[str]) -> list[list[str]]:
    """For each variant, each stage's fate: 'run', 'reuse: store' or 'reuse: variant N'."""
    first_seen: dict[str, int] = {}
    fates = []
    for variant in variants:
        row = []
        for key in [variant.plan.input_key, *(s.key for s in variant.plan.stages)]:
            if key in logged:
                row.append("reuse: store")
            elif key in first_seen:
                row.append(f"reuse: variant {first_seen[key]}")
            else:
                first_seen[key] = variant.index
                row.append("run")
        fates.append(row)
    return fates


def new_sweep_id() -> str:
    """A short id tagging every run of one sweep."""
    return uuid.uuid4().hex[:10]


def run_variants(variants: list[Variant], path: str | Path, overrides: list[str], uri: str,
                 experiment: str, executor: SweepExecutor | None = None,
                 options: ExecutorOptions | None = None) -> tuple[str, list[VariantOutcome]]:
    """Run every variant on ``executor`` (default: local, one at a time); returns the sweep
    id and each outcome, in the variants' order."""
    from compressflow.plugins import TRUSTED_ONLY_ENV
    from compressflow.tracking import Tracker

    # the store and experiment exist before any worker starts
    Tracker(uri, experiment, artifacts=variants[0].plan.spec.tracking.artifacts)
    sweep_id = new_sweep_id()
    environment = {k: v for k, v in os.environ.items() if k == TRUSTED_ONLY_ENV}
    jobs = [SweepJob(str(Path(path).resolve()), list(overrides), v.index, v.values, uri,
                     experiment, sweep_id, environment=environment) for v in variants]
    executor, options = executor or LocalExecutor(), options or ExecutorOptions()
    if isinstance(executor, LocalExecutor) and options.jobs <= 1:  # plans already validated here
        locks = FileLocks.for_sweep(sweep_id)
        return sweep_id, [run_job(job.with_locks(locks), v.plan) for job, v in zip(jobs, variants)]
    return sweep_id, executor.run(jobs, options)


def summarize(variants: list[Variant], sweep_id: str, uri: str, experiment: str) -> dict[str, Any]:
    """The sweep's summary run: the compare table and plot, and the registered pick."""
    import json
    import tempfile

    from compressflow import compare
    from compressflow.report import summary_markdown
    from compressflow.tracking import Tracker

    spec = variants[0].plan.spec
    metric, by = spec.evaluation.metric, "size_bytes"
    higher = variants[0].plan.higher_is_better(metric)
    rows = compare.mark_pareto(compare.load_rows(uri, experiment, metric, by, sweep_id), higher)
    table = compare.as_table(rows, metric, by)
    tracker = Tracker(uri, experiment, artifacts=spec.tracking.artifacts)
    tracker.start_pipeline(f"sweep-{sweep_id}", {Tag.SWEEP_ID: sweep_id,
                                                 Tag.KIND: "sweep-summary"},
                           {"variants": len(variants), "mode": (spec.sweep or {}).get("mode", "product")})
    chosen = None
    try:
        tracker.log_text(json.dumps(table, indent=2, default=str), "compare.json")
        tracker.log_text(summary_markdown(table), "compare.md")
        folder = Path(tempfile.mkdtemp())
        tracker.log_file(compare.plot(rows, metric, by, folder / "pareto.png", f"{spec.name} sweep {sweep_id}"))
        if spec.registration is not None:
            rule = spec.select or _default_select()
            chosen = compare.select(rows, rule.max_metric_drop, rule.then, higher)
            if chosen is None or chosen.model_uri is None:
                raise ConfigError(f"sweep {sweep_id}: no finished variant passed its gates; nothing registered",
                                  "loosen the gates or the sweep's values")
            version = tracker.register(chosen.model_uri, spec.registration.name, spec.registration.alias)
            tracker.set_tags({Tag.REGISTERED: f"{spec.registration.name}/{version}",
                              Tag.SELECTED_RUN: chosen.run_id})
    finally:
        tracker.end_pipeline("FINISHED")
    return {"table": table, "chosen": chosen, "rows": rows}


def _default_select():
    from compressflow.config import SelectSpec

    return SelectSpec()
