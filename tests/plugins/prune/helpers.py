"""What the criteria, pattern and schedule tests share: a trained MLP on the real digits, a
StageContext that records what a stage logs, and running a prune stage class directly."""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import torch
from torch import nn

from compressflow import DataSpec, StageContext
from compressflow.training import TrainParams, fit

HIDDEN = (128, 64)  # rows of 64, 128 and 64 weights: every N:M of M <= 8 fits


class Recorder(StageContext):
    """A real StageContext over the digits bundle; keeps ``logged`` (name, value, step) and
    ``progressed`` (step, total) instead of sending them to MLflow and observers."""

    def __init__(self, bundle, seed: int = 1):
        from compressflow_tasks import accuracy, loss

        def evaluate(model, loader=None):
            model.eval()
            loader = loader if loader is not None else bundle.val
            return {"accuracy": accuracy(model, loader), "loss": loss(model, loader)}

        self.logged: list[tuple[str, float, int | None]] = []
        self.progressed: list[tuple[int, int]] = []
        super().__init__(
            name="prune", seed=seed, workdir=Path(tempfile.mkdtemp(prefix="prune-test-")),
            metric="accuracy", data=lambda: bundle, evaluate=evaluate,
            model_at=lambda ref: None, build_model=lambda spec: None,
            log_metric=lambda name, value, step: self.logged.append((name, value, step)),
            progress=lambda step, total, figures: self.progressed.append((step, total)),
        )

    def history(self, name: str) -> list[tuple[int | None, float]]:
        return [(step, value) for logged, value, step in self.logged if logged == name]


@functools.lru_cache(maxsize=None)
def _trained():
    from compressflow_data.loaders import load_digits_bundle
    from compressflow_models.zoo import MLP

    bundle = load_digits_bundle(DataSpec(dataset="digits", batch_size=64), 0, (64,))
    torch.manual_seed(0)
    model = MLP(64, list(HIDDEN), 10)
    fit(model, bundle, TrainParams(epochs=8, lr=3e-3), Recorder(bundle))
    return model.eval(), bundle


def trained_mlp():
    """A fresh copy of the 64-128-64-10 MLP trained on digits (trained once per session)."""
    model, bundle = _trained()
    return copy.deepcopy(model), bundle


def run_stage(stage_class, model: nn.Module, bundle, **params):
    """``stage_class(params).run(model)`` as the engine calls it; returns (result, context)."""
    ctx = Recorder(bundle, seed=2)
    stage = stage_class("prune", stage_class.Params(**params))
    return stage.run(model, ctx), ctx


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}


def sparsity(weight: torch.Tensor) -> float:
    return 1 - int(torch.count_nonzero(weight)) / weight.numel()
