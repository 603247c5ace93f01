"""Importance of each weight: magnitude, first-order Taylor, and OBD with the empirical Fisher.

Every score has its weight's shape; the lowest are pruned first. Taylor and OBD estimate the
increase of the mean cross-entropy when a weight is zeroed, so their scores are in the same
units in every layer and can be ranked across layers as they are. Gradients are taken with the
model in eval mode (BatchNorm on its running statistics, no dropout); the model's weights and
its ``.grad`` fields are left as they were.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def calibration_batches(data, count: int, seed: int) -> Batches:
    """``count`` batches: from the data's calibration loader when it holds that many, else
    from the training split shuffled with ``seed`` (at most one pass over it)."""
    from torch.utils.data import DataLoader

    if len(data.calibration) >= count:
        return list(islice(data.calibration, count))
    train = data.train
    loader = DataLoader(train.dataset, batch_size=train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return list(islice(loader, count))


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
                  batches: Batches) -> dict[str, torch.Tensor]:
    """|w * dL/dw| of the mean cross-entropy, averaged over the calibration batches.

    Each batch's term is taken in absolute value before averaging: at a trained minimum the
    full-data gradient is ~0, while each batch's still says which weights the loss leans on.
    """
    _require(batches)
    weights = {n: m.weight for n, m in layers.items()}
    sums = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    with _EvalMode(model):
        for inputs, targets in batches:
            loss = F.cross_entropy(model(inputs), targets)
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (name, weight), grad in zip(weights.items(), grads):
                if grad is not None:
                    sums[name] += (weight.detach() * grad).abs()
    return {n: s / len(batches) for n, s in sums.items()}


def fisher_diagonal(model: nn.Module, layers: dict[str, nn.Module],
                    batches: Batches) -> dict[str, torch.Tensor]:
    """The empirical Fisher's diagonal: mean over samples of each weight's squared per-sample
    gradient of the cross-entropy (``torch.func.vmap``; one backward a sample where vmap cannot
    run the model). It estimates the Hessian's diagonal of the mean loss near a minimum."""
    _require(batches)
    names = {id(m.weight): n for n, m in layers.items()}
    sums = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in layers.items()}
    seen = 0
    with _EvalMode(model):
        for inputs, targets in batches:
            for name, squares in _squared_sample_grads(model, names, inputs, targets).items():
                sums[name] += squares
            seen += len(targets)
    return {n: s / seen for n, s in sums.items()}


def obd_scores(model: nn.Module, layers: dict[str, nn.Module], batches: Batches) -> dict[str, torch.Tensor]:
    """1/2 * w^2 * H_ii, H_ii from :func:`fisher_diagonal` (Optimal Brain Damage)."""
    fisher = fisher_diagonal(model, layers, batches)
    return {n: 0.5 * m.weight.detach().double() ** 2 * fisher[n] for n, m in layers.items()}


def _squared_sample_grads(model: nn.Module, names: dict[int, str], inputs: torch.Tensor,
                          targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum over the batch of each sample's squared gradient, for the weights in ``names``."""
    from torch.func import functional_call, grad, vmap

    chosen = {n: p.detach() for n, p in model.named_parameters() if id(p) in names}
    fixed = {n: p.detach() for n, p in model.named_parameters() if id(p) not in names}
    fixed.update(dict(model.named_buffers()))
    by_param = {n: names[id(p)] for n, p in model.named_parameters() if id(p) in names}

    def sample_loss(values, x, y):
        out = functional_call(model, {**fixed, **values}, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    try:
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(chosen, inputs, targets)
        return {by_param[n]: (g.double() ** 2).sum(0) for n, g in grads.items()}
    except Exception:  # an op vmap cannot batch: one backward pass per sample
        params = [p for p in model.parameters() if id(p) in names]
        sums = {names[id(p)]: torch.zeros_like(p, dtype=torch.float64) for p in params}
        for x, y in zip(inputs, targets):
            loss = F.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0))
            for param, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    sums[names[id(param)]] += g.double() ** 2
        return sums
