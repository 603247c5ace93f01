"""Least-squares pruning: OBS as SparseGPT does it (Frantar & Alistarh 2023).

For one layer with weight W (rows = outputs; a Conv's kernel flattened, ``W.flatten(1)``) and
calibration inputs X (columns = samples; a Conv's unfolded patches), pruning a set of weights
and updating the rest to minimise ||W X - W' X||^2 decomposes into rows that share
H = X X^T / samples. Following SparseGPT: H is damped by ``damp`` * mean(diag H), its inverse
taken through Cholesky, and columns processed left to right in blocks of ``block_size``; at
column p the weights of lowest w^2 / [H^-1]_pp (the sequential inverse's diagonal: the upper
Cholesky factor of H^-1, squared) are zeroed and their error (w_p / [H^-1]_pp) spread over
the columns to its right: at once over the rest of the block, and over the columns after the
block in one product per block (SparseGPT's lazy batch updates). All in float64. Unstructured: each block prunes its share of the layer's count (masks chosen per block, on
weights already updated by the earlier blocks); N:M: the mask of every group of M columns is
chosen when the group is reached. Layers run in the forward pass's order, each calibrated on
inputs through the already-pruned earlier layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressflow.task import call

from compressflow_prune.masks import Plan, forced_first, n_m_mask, prune_counts

BLOCK_SIZE = 128
DAMP = 0.01


class _Stop(Exception):
    """Raised by a hook to skip the rest of a forward pass."""


def layer_columns(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``[row length, samples]`` columns: ``W.flatten(1) @ columns`` is
    the layer's output (without bias) for each sample (and each position of a Conv)."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1]).t()
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.groups != 1:
        raise ValueError(f"least-squares handles Linear and Conv1d/Conv2d with groups=1, not "
                         f"{module} (exclude it)")
    x, padding = inputs, module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * len(module.kernel_size)
    elif padding == "same":
        pads: list[int] = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            pads += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
        x, padding = F.pad(x, pads), (0,) * len(module.kernel_size)
    elif padding == "valid":
        padding = (0,) * len(module.kernel_size)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):  # as a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding = ((1, *v) for v in (kernel, stride, dilation, padding))
        padding = (0, padding[1])
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(0, 1).reshape(patches.shape[1], -1)


def forward_order(model: nn.Module, layers: dict[str, nn.Module], inputs, feed=call) -> list[str]:
    """The layers' names in the order the forward pass first runs them."""
    order: list[str] = []
    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(lambda *_a, name=n: order.append(name) if name not in order else None)
               for n, m in layers.items()]
    try:
        with torch.no_grad():
            feed(model, inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [n for n in layers if n not in order]
    if missing:
        raise ValueError(f"least-squares needs each layer's inputs; the forward pass never runs "
                         f"{', '.join(missing)} (exclude them)")
    return order


def input_hessians(model: nn.Module, layers: dict[str, nn.Module], batches,
                   stop_after: str | None = None, feed=call) -> dict[str, torch.Tensor]:
    """H = X X^T / samples (float64) of each layer's calibration inputs; with ``stop_after``,
    each forward pass ends once that layer ran."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook(module, args, _output, name):
        columns = layer_columns(module, args[0].detach()).double()
        sums[name] = sums.get(name, 0) + columns @ columns.t()
        counts[name] += columns.shape[1]
        if name == stop_after:
            raise _Stop

    handles = [m.register_forward_hook(lambda mod, a, o, name=n: hook(mod, a, o, name))
               for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs, _targets in batches:
                try:
                    feed(model, inputs)
                except _Stop:
                    pass
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {n: sums[n] / counts[n] for n in sums}


def _damped_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, more damping if needed."""
    mean_diag = float(torch.diag(hessian).mean()) or 1.0
    for attempt in range(6):
        damped = hessian + damp * 10 ** attempt * mean_diag * torch.eye(len(hessian), dtype=hessian.dtype)
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            return torch.linalg.cholesky(inverse, upper=True)
        except RuntimeError:  # not positive definite in this precision
            continue
    raise ValueError("the calibration inputs' Hessian stays singular after damping")


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, *, count: int | None = None,
              n_m: tuple[int, int] | None = None, forced: torch.Tensor | None = None,
              block_size: int = BLOCK_SIZE, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``count`` weights of ``weight`` ([rows, columns]), or to ``n_m``, and update the rest.

    ``forced``: weights already pruned (they are pruned first, whatever their score).
    Returns the new weight and its keep-mask.
    """
    W = weight.detach().clone().double()
    H = hessian.clone().double()
    rows, columns = W.shape
    forced = torch.zeros_like(W, dtype=torch.bool) if forced is None else forced.clone()
    # an input that is always zero: its weights do nothing, pruning them costs nothing (score
    # 0, before any other but after the exact zeros); SparseGPT zeroes them all, which would
    # overshoot a target below their share
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Hinv = _damped_inverse(H, damp)
    if n_m is not None:  # a group of M columns never straddles two blocks
        block_size = max(n_m[1], block_size // n_m[1] * n_m[1])
    pruned = torch.zeros_like(W, dtype=torch.bool)
    done = 0
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        diag = torch.diag(Hinv1)
        if n_m is None:
            score = _scores(W1, diag, forced[:, i1:i2], dead[i1:i2])
            # this block's share, so that the blocks together prune exactly `count`
            share = min(score.numel(), max(int(forced[:, i1:i2].sum()),
                                           round(count * i2 / columns) - done))
            mask1 = torch.zeros_like(W1, dtype=torch.bool).flatten()
            if share:
                mask1[torch.topk(score.flatten(), share, largest=False).indices] = True
            mask1 = mask1.view_as(W1)
            done += share
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                span = slice(i1 + i, i1 + i + n_m[1])
                score = _scores(W1[:, group], diag[group], forced[:, span], dead[span])
                mask1[:, group] = ~n_m_mask(score, *n_m)
            w, d = W1[:, i], diag[i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[pruned] = 0
    return W.to(weight.dtype), ~pruned


def _scores(W: torch.Tensor, diag: torch.Tensor, forced: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """w^2 / [H^-1]_pp^2 (SparseGPT's: the Cholesky factor's diagonal, squared, is the
    sequential [H^-1]_pp); weights of dead inputs 0, weights already zero -inf."""
    score = torch.where(dead.unsqueeze(0), 0.0, W ** 2 / diag.unsqueeze(0) ** 2)
    return torch.where(forced, float("-inf"), score)


def relative_error(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2 from H = X X^T."""
    W, delta = weight.double(), (weight - new).double()
    denominator = float(torch.einsum("ij,jk,ik->", W, hessian, W))
    return float(torch.einsum("ij,jk,ik->", delta, hessian, delta)) / denominator if denominator else 0.0


def least_squares_prune(model: nn.Module, layers: dict[str, nn.Module], plan: Plan, batches,
                        global_scores=None, feed=call) -> dict[str, dict[str, float]]:
    """Prune every planned layer with :func:`sparsegpt`, in forward order, each on inputs through
    the already-pruned earlier layers. ``global_scores(model, layers, batches)`` ranks the pool
    (``scope: global``) before any layer changes: it sets how many weights each layer loses.
    Returns, by layer, ``reconstruction_error`` and ``magnitude_error`` (magnitude's mask, same
    count or pattern, same inputs, no update)."""
    planned = {n: layers[n] for n in plan.sparsities()}
    counts = {}
    if plan.n_m is None:
        scores = global_scores(model, planned, batches) if plan.pool else {
            n: torch.zeros(m.weight.shape) for n, m in planned.items()}
        counts = prune_counts(forced_first(scores, planned), plan)
    records = {}
    for name in forward_order(model, planned, batches[0][0], feed):
        module = planned[name]
        hessian = input_hessians(model, {name: module}, batches, stop_after=name, feed=feed)[name]
        weight = module.weight.detach().flatten(1)
        new, keep = sparsegpt(weight, hessian, count=counts.get(name), n_m=plan.n_m,
                              forced=weight == 0)
        magnitude = _magnitude_keep(weight, int((~keep).sum()), plan.n_m)
        records[name] = {"reconstruction_error": relative_error(weight, new, hessian),
                         "magnitude_error": relative_error(weight, weight * magnitude, hessian)}
        with torch.no_grad():
            module.weight.copy_(new.view_as(module.weight))
    return records


def _magnitude_keep(weight: torch.Tensor, count: int, n_m: tuple[int, int] | None) -> torch.Tensor:
    """Magnitude's keep-mask for the same layer: the same count, or the same N:M pattern."""
    score = weight.abs().double()
    if n_m is not None:
        return n_m_mask(score, *n_m)
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if count:
        keep[torch.topk(score.flatten(), count, largest=False).indices] = False
    return keep.view_as(weight)

