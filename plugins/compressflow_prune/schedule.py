"""Running a prune stage: one shot, or gradually on Zhu & Gupta's cubic schedule with the
shared training loop (``compressflow.training.fit``, zeros frozen) between the steps."""

from __future__ import annotations

from statistics import fmean
from typing import TYPE_CHECKING

import torch

from compressflow import StageResult
from compressflow.task import batch_len
from compressflow.training import fit
from compressflow.calibration import calibration_batches
from compressflow_prune.masks import Plan, layer_table, make_plan, prunable_layers

if TYPE_CHECKING:
    from torch import nn

    from compressflow import StageContext
    from compressflow_prune import PruneStage


def cubic_fraction(t: int, steps: int) -> float:
    """(1 - t/n)^3: how much of the way from s_f back to s_i the target still is at step t."""
    return (1 - t / steps) ** 3


def cubic_targets(final: float, initial: float, steps: int) -> list[float]:
    """s_t = s_f + (s_i - s_f)(1 - t/n)^3 for t = 1..n (Zhu & Gupta 2017); s_n = s_f."""
    return [final + (initial - final) * cubic_fraction(t, steps) for t in range(1, steps + 1)]


def planned_sparsity(layers: dict[str, nn.Module], plan: Plan) -> float:
    """Share of zeros over the planned layers' weights together."""
    weights = [layers[n].weight.detach() for n in plan.sparsities()]
    total = sum(w.numel() for w in weights)
    return 1 - sum(int(torch.count_nonzero(w)) for w in weights) / total


def run_prune(stage: PruneStage, model: nn.Module, ctx: StageContext) -> StageResult:
    """Choose the layers, plan the targets, prune (once or gradually), write the table."""
    params = stage.params
    layers = prunable_layers(model, params.include, params.exclude)
    plan = make_plan(layers, params.final_sparsity, params.scope, params.per_layer, params.n_m)
    batches = (calibration_batches(ctx.data, params.calibration_batches, ctx.seed, ctx.task)
               if stage.needs_data else [])
    metrics = {"target_sparsity": plan.overall(layers)}
    if batches:
        metrics["calibration_samples"] = float(sum(batch_len(inputs) for inputs, _ in batches))
    if params.schedule == "oneshot":
        records = stage.prune_layers(model, layers, plan, batches) or {}
    else:
        records = gradual(stage, model, layers, plan, batches, ctx)
    extra = {}
    records = {name: record for name, record in records.items() if record}  # errors untold: none
    if records:
        errors = [r["reconstruction_error"] for r in records.values()]
        baselines = [r["magnitude_error"] for r in records.values()]
        metrics["reconstruction_error"] = fmean(errors)
        metrics["reconstruction_error_magnitude"] = fmean(baselines)
        for name, record in records.items():
            error, baseline = record["reconstruction_error"], record["magnitude_error"]
            extra[name] = {"reconstruction error": f"{error:.4g}",
                           "magnitude's error": f"{baseline:.4g}",
                           "error / magnitude's": f"{error / baseline:.3f}" if baseline else ""}
    table = layer_table(layers, ctx.workdir / "prune_layers.md", extra)
    return StageResult(model, metrics=metrics, artifacts={"prune_layers": table})


def gradual(stage: PruneStage, model: nn.Module, layers: dict[str, nn.Module], plan: Plan,
            batches, ctx: StageContext) -> dict[str, dict[str, float]]:
    """``steps`` pruning steps on the cubic schedule, ``finetune_epochs`` of ``fit`` after each.

    Each step logs, at step = epochs trained before it (t - 1 when finetune_epochs is 0):
    ``step_target_sparsity``, ``step_sparsity`` (reached over the planned layers) and the
    validation figures right after pruning (``pruned_val_<metric>``); the training curves
    continue from step to step. Returns the last step's per-layer records.
    """
    params = stage.params
    steps, epochs = params.steps, params.finetune_epochs
    train = params.train_params()
    records: dict[str, dict[str, float]] = {}
    for t in range(1, steps + 1):
        step_plan = plan.at(cubic_fraction(t, steps), params.initial_sparsity)
        records = stage.prune_layers(model, layers, step_plan, batches) or {}
        done = (t - 1) * epochs
        figures = {"step_target_sparsity": step_plan.overall(layers),
                   "step_sparsity": planned_sparsity(layers, step_plan)}
        figures.update({f"pruned_val_{k}": v for k, v in ctx.evaluate(model).items()})
        for name, value in figures.items():
            ctx.log_metric(name, value, done if epochs else t - 1)
        if epochs:
            fit(model, ctx.data, train, _Progress(ctx, done, steps * epochs),
                freeze_zeros=True, step_offset=done)
    return records


class _Progress:
    """The stage's context, its progress counted over all steps' epochs, not one ``fit``'s."""

    def __init__(self, ctx: StageContext, done: int, total: int):
        self._ctx, self._done, self._total = ctx, done, total

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self._ctx.progress(self._done + step, self._total, metrics)
