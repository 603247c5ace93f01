"""Least-squares pruning: OBS as SparseGPT does it (Frantar & Alistarh 2023).

For one layer with weight W (rows = outputs; a Conv's kernel flattened, ``W.flatten(1)``) and
calibration inputs X (columns = samples; a Conv's unfolded patches), pruning a set of weights
and updating the rest to minimise ||W X - W' X||^2 decomposes into rows that share
H = X X^T / samples. Following SparseGPT: H is damped by ``damp`` * mean(diag H), its inverse
taken through Cholesky, and columns processed left to right in blocks of ``block_size``; at
column p the weights of lowest w^2 / [H^-1]_pp (the sequential inverse's diagonal: the upper
Cholesky factor of H^-1, squared) are zeroed and their error (w_p / [H^-1]_pp) spread over
the columns to its right: at once over the rest of the block, and over the columns after the
block in one product per block (SparseGPT's lazy batch updates). H and its inverse in
float64, the weight updates in float32 (as SparseGPT's own code). Unstructured: each block
prunes its share of the layer's count (masks chosen per block, on weights already updated by
the earlier blocks); N:M: the mask of every group of M columns is
chosen when the group is reached. Layers run in the forward pass's order, each calibrated on
inputs through the already-pruned earlier layers.
"""

from __future__ import annotations

import torch
from torch import nn

from compressflow import calibration
from compressflow.task import call
from compressflow_prune.masks import Plan, forced_first, lowest, n_m_mask, prune_counts

BLOCK_SIZE = 128
DAMP = calibration.DAMP
# the weights' updates run in float32, as SparseGPT's and llm-compressor's do (1.5-2x faster
# than float64 on a CPU); H and its damped inverse are formed in float64 first
WORKING = torch.float32


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, *, count: int | None = None,
              n_m: tuple[int, int] | None = None, forced: torch.Tensor | None = None,
              block_size: int = BLOCK_SIZE, damp: float = DAMP,
              factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``count`` weights of ``weight`` ([rows, columns]), or to ``n_m``, and update the rest.

    ``forced``: weights already pruned (they are pruned first, whatever their score).
    ``factor``: :func:`compressflow.calibration.inverse_factor` of ``hessian``, where already computed.
    Returns the new weight and its keep-mask.
    """
    W = weight.detach().clone().to(WORKING)
    rows, columns = W.shape
    forced = torch.zeros_like(W, dtype=torch.bool) if forced is None else forced.clone()
    # an input that is always zero: its weights do nothing, pruning them costs nothing (score
    # 0, before any other but after the exact zeros); SparseGPT zeroes them all, which would
    # overshoot a target below their share
    Hinv, dead = factor if factor is not None else calibration.inverse_factor(hessian, damp)
    Hinv = Hinv.to(WORKING)
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
            mask1 = lowest(score, share)
            done += share
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                span = slice(i1 + i, i1 + i + n_m[1])
                score = _scores(W1[:, group], diag[group], forced[:, span], dead[span])
                mask1[:, group] = ~n_m_mask(score, *n_m)
            # the pruned weights' error w / d, spread over the row's later columns of the
            # block; the column itself then comes out at w - (w / d) * d: set it to 0 exactly
            pruned_now = mask1[:, i]
            err = W1[:, i] * pruned_now / diag[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            W1[:, i].masked_fill_(pruned_now, 0)
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
    return calibration.output_errors(weight, [new], hessian)[0]


def least_squares_prune(model: nn.Module, layers: dict[str, nn.Module], plan: Plan, batches,
                        global_scores=None, feed=call, solve=None,
                        errors: bool = True) -> dict[str, dict[str, float]]:
    """Prune every planned layer with ``solve`` (default :func:`sparsegpt`; :func:`wanda`
    takes the same arguments), each on its true calibration inputs: block by block where the
    layers lie in repeated blocks (:mod:`compressflow.calibration`: a transformer's
    decoder layers), else layer by layer in forward order, each on inputs through the
    already-pruned earlier layers. ``global_scores(model, layers, batches)`` ranks the pool
    (``scope: global``) before any layer changes: it sets how many weights each layer loses.
    Returns, by layer, ``reconstruction_error`` and ``magnitude_error`` (magnitude's mask,
    same count or pattern, same inputs, no update). ``errors=False`` (Wanda only: SparseGPT
    needs the whole H anyway) collects H's diagonal alone and returns no errors: the error
    needs the whole H, which costs more than Wanda itself."""
    solve = solve or sparsegpt
    planned = {n: layers[n] for n in plan.sparsities()}
    counts = {}
    if plan.n_m is None:
        scores = global_scores(model, planned, batches) if plan.pool else {
            n: torch.zeros(m.weight.shape) for n, m in planned.items()}
        counts = prune_counts(forced_first(scores, planned), plan)
    records = {}

    factored: list = []  # [hessian, its inverse_factor]: the hessian held, so `is` is sound

    def prune(name: str, hessian: torch.Tensor) -> None:
        module = planned[name]
        weight = module.weight.detach().flatten(1)
        extra = {}
        if solve is sparsegpt:  # layers fed the same inputs share one Hessian: factor it once
            if not factored or factored[0] is not hessian:
                factored[:] = [hessian, calibration.inverse_factor(hessian)]
            extra["factor"] = factored[1]
        new, keep = solve(weight, hessian, count=counts.get(name), n_m=plan.n_m, forced=weight == 0,
                          **extra)
        records[name] = {}
        if hessian.dim() == 2:  # the whole H (not its diagonal alone): the errors are known
            magnitude = _magnitude_keep(weight, int((~keep).sum()), plan.n_m)
            error, baseline = calibration.output_errors(weight, [new, weight * magnitude], hessian)
            records[name] = {"reconstruction_error": error, "magnitude_error": baseline}
        with torch.no_grad():
            module.weight.copy_(new.view_as(module.weight))

    diagonal = not errors and solve is wanda
    for hessians in calibration.layer_hessians(model, planned, batches, feed, diagonal):
        for name, hessian in hessians.items():
            prune(name, hessian)
    return records


def wanda(weight: torch.Tensor, hessian: torch.Tensor, *, count: int | None = None,
          n_m: tuple[int, int] | None = None, forced: torch.Tensor | None = None,
          **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda (Sun, Liu, Bair, Kolter 2024): prune the weights of lowest |w_ij| * ||X_j||_2,
    compared within each output row (its "per output" groups), no update. ||X_j|| comes from
    H's diagonal (sqrt(H_jj) is proportional to it). Unstructured: each row prunes
    ``count / rows`` weights (rounded); N:M: N kept in every M of a row. Weights already zero
    are pruned first. Returns the new weight and its keep-mask."""
    diag = hessian if hessian.dim() == 1 else torch.diag(hessian)  # H's diagonal may come alone
    score = weight.detach().abs().double() * diag.clamp_min(0).sqrt().unsqueeze(0)
    if forced is not None:
        score = torch.where(forced, float("-inf"), score)
    if n_m is not None:
        keep = n_m_mask(score, *n_m)
    else:
        rows, columns = score.shape
        per_row = min(columns, round((count or 0) / rows))
        keep = torch.ones_like(score, dtype=torch.bool)
        if per_row:
            keep.scatter_(1, torch.topk(score, per_row, dim=1, largest=False).indices, False)
    return weight * keep, keep


def _magnitude_keep(weight: torch.Tensor, count: int, n_m: tuple[int, int] | None) -> torch.Tensor:
    """Magnitude's keep-mask for the same layer: the same count, or the same N:M pattern."""
    score = weight.abs().double()
    if n_m is not None:
        return n_m_mask(score, *n_m)
    return ~lowest(score, count)

