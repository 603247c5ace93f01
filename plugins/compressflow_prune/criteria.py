"""Importance of each weight: magnitude, first-order Taylor, and OBD with the empirical Fisher.

Every score has its weight's shape; the lowest are pruned first. Taylor and OBD estimate the
increase of the task's mean loss (cross-entropy for classification) when a weight is zeroed, so their scores are in the same
units in every layer and can be ranked across layers as they are. Gradients are taken with the
model in eval mode (BatchNorm on its running statistics, no dropout); the model's weights and
its ``.grad`` fields are left as they were.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from compressflow.task import Task, batch_len, call_args, default_task, map_inputs, take

Batches = list[tuple]
"""``(inputs, targets)`` pairs, split by the task: inputs a tensor, tuple or dict of tensors."""


def magnitude_scores(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """|w|."""
    return {name: module.weight.detach().abs() for name, module in layers.items()}


class _EvalMode:
    """Eval mode for the block, the previous mode and gradients restored after it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.grads = {p: p.grad for p in self.model.parameters()}
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.training)
        for param, grad in self.grads.items():
            param.grad = grad


def _require(batches: Iterable) -> None:
    if not batches:
        raise ValueError("no calibration batch to compute gradients on")


def taylor_scores(model: nn.Module, layers: dict[str, nn.Module],
                  batches: Batches, task: Task | None = None) -> dict[str, torch.Tensor]:
    """|w * dL/dw| of the task's mean loss, averaged over the calibration batches.

    Each batch's term is taken in absolute value before averaging: at a trained minimum the
    full-data gradient is ~0, while each batch's still says which weights the loss leans on.
    """
    _require(batches)
    task = task or default_task()
    weights = {n: m.weight for n, m in layers.items()}
    sums = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    with _EvalMode(model):
        for inputs, targets in batches:
            loss = task.loss(task.predict(model, inputs), targets)
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (name, weight), grad in zip(weights.items(), grads):
                if grad is not None:
                    sums[name] += (weight.detach() * grad).abs()
    return {n: s / len(batches) for n, s in sums.items()}


def fisher_diagonal(model: nn.Module, layers: dict[str, nn.Module],
                    batches: Batches, task: Task | None = None) -> dict[str, torch.Tensor]:
    """The empirical Fisher's diagonal: mean over samples of each weight's squared per-sample
    gradient of the task's loss (``torch.func.vmap``; one backward a sample where vmap cannot
    run the model). It estimates the Hessian's diagonal of the mean loss near a minimum."""
    _require(batches)
    task = task or default_task()
    names = {id(m.weight): n for n, m in layers.items()}
    sums = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in layers.items()}
    seen = 0
    with _EvalMode(model):
        for inputs, targets in batches:
            for name, squares in _squared_sample_grads(model, names, inputs, targets, task).items():
                sums[name] += squares
            seen += batch_len(inputs)
    return {n: s / seen for n, s in sums.items()}


def obd_scores(model: nn.Module, layers: dict[str, nn.Module], batches: Batches,
               task: Task | None = None) -> dict[str, torch.Tensor]:
    """1/2 * w^2 * H_ii, H_ii from :func:`fisher_diagonal` (Optimal Brain Damage)."""
    fisher = fisher_diagonal(model, layers, batches, task)
    return {n: 0.5 * m.weight.detach().double() ** 2 * fisher[n] for n, m in layers.items()}


def _squared_sample_grads(model: nn.Module, names: dict[int, str], inputs, targets,
                          task: Task) -> dict[str, torch.Tensor]:
    """Sum over the batch of each sample's squared gradient, for the weights in ``names``."""
    from torch.func import functional_call, grad, vmap

    chosen = {n: p.detach() for n, p in model.named_parameters() if id(p) in names}
    fixed = {n: p.detach() for n, p in model.named_parameters() if id(p) not in names}
    fixed.update(dict(model.named_buffers()))
    by_param = {n: names[id(p)] for n, p in model.named_parameters() if id(p) in names}

    def sample_loss(values, x, y):
        args, kwargs = call_args(map_inputs(lambda t: t.unsqueeze(0), x))
        out = functional_call(model, {**fixed, **values}, args, kwargs)
        return task.loss(task.prediction(out), y.unsqueeze(0))

    try:
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(chosen, inputs, targets)
        return {by_param[n]: (g.double() ** 2).sum(0) for n, g in grads.items()}
    except Exception:  # an op vmap cannot batch: one backward pass per sample
        params = [p for p in model.parameters() if id(p) in names]
        sums = {names[id(p)]: torch.zeros_like(p, dtype=torch.float64) for p in params}
        for index in range(batch_len(inputs)):
            one, y = take(inputs, index, index + 1), targets[index:index + 1]
            loss = task.loss(task.predict(model, one), y)
            for param, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    sums[names[id(param)]] += g.double() ** 2
        return sums
