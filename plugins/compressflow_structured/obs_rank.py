"""``importance: obs`` of ``structured_prune/heads``: heads and FFN neurons ranked by what
their removal costs once the rest of the layer compensates (Optimal Brain Surgeon applied
to whole units, as ZipLM, Kurtic et al. 2023, does for structured pruning).

For one output projection ``y = W x`` (``attention.output.dense`` reading the heads'
context, ``output.dense`` reading the FFN's neurons) and the Gram matrix ``H = X^T X`` of
its inputs on the calibration tokens, removing the input columns ``S`` of one unit and
re-solving the other columns by least squares raises the squared error by
``tr(W_S (H^-1)_SS^-1 W_S^T)``. Units are removed greedily, the cheapest first, updating
``W`` and ``H^-1`` after each (the OBS step), until one is left; a unit's score is the step
at which it went, so the units kept are those the greedy search kept longest. Magnitude and
activation scores rank units alone; this ranks them by what the others can take over,
which is what the least-squares refit then does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressflow.task import Task
from compressflow_structured.transformer_plan import head_size_of, layer_parts, token_mask

DAMPING = 1e-2
"""Added to H's diagonal, relative to its mean: a dead or constant input stays invertible."""

STEPS = 64
"""Greedy steps at most per projection: 1536 FFN neurons go 24 at a time, heads one by one."""


def obs_scores(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Any],
               task: Task) -> dict[nn.Module, torch.Tensor]:
    """Scores for the input channels of every ``attention.output.dense`` (a head's on each
    of its channels) and ``output.dense``: higher for the units the greedy OBS search
    removes later."""
    projections = {}
    for _name, layer in layers:
        parts = layer_parts(layer)
        projections[parts["attn_out"]] = head_size_of(layer)
        projections[parts["ffn_out"]] = 1
    grams = _input_grams(model, list(projections), batches, task)
    scores = {}
    for module, size in projections.items():
        order = removal_order(module.weight.detach().double(), grams[module], size)
        rank = torch.empty(len(order))
        rank[torch.as_tensor(order)] = torch.arange(len(order), dtype=torch.float32)
        scores[module] = rank.repeat_interleave(size)
    return scores


def _input_grams(model: nn.Module, modules: list[nn.Module], batches: list[Any],
                 task: Task) -> dict[nn.Module, torch.Tensor]:
    """``X^T X`` (float64) of each module's inputs over the batches' attended tokens."""
    grams: dict[nn.Module, torch.Tensor] = {}
    state = {"mask": None}

    def hook(module, args):
        x = args[0].detach()[state["mask"]].double()
        grams[module] = grams[module] + x.T @ x if module in grams else x.T @ x

    handles = [module.register_forward_pre_hook(hook) for module in modules]
    try:
        with torch.no_grad():
            for inputs in batches:
                state["mask"] = token_mask(inputs)[..., 0].bool()
                task.feed(model.eval(), inputs)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def removal_order(weight: torch.Tensor, gram: torch.Tensor, size: int,
                  steps: int = STEPS) -> list[int]:
    """Every unit (``size`` consecutive input columns of ``weight``), cheapest removal
    first, by greedy OBS with compensation; the last is the one removed never. Many units
    (FFN neurons) go ``units / steps`` at a time, the cheapest of that step together."""
    units = weight.shape[1] // size
    eye = torch.eye(len(gram), dtype=gram.dtype)
    hinv = torch.linalg.inv(gram + DAMPING * gram.diagonal().mean() * eye)
    weight = weight.clone()
    alive = torch.ones(units, dtype=torch.bool)
    order: list[int] = []
    per_step = max(1, units // steps)
    while int(alive.sum()) > 1:
        costs = _costs(weight, hinv, size)
        costs[~alive] = float("inf")
        chosen = costs.argsort()[: min(per_step, int(alive.sum()) - 1)].tolist()
        weight, hinv = _remove(weight, hinv, chosen, size)
        alive[chosen] = False
        order += chosen
    return order + alive.nonzero().flatten().tolist()


def _costs(weight: torch.Tensor, hinv: torch.Tensor, size: int) -> torch.Tensor:
    """``tr(W_u (H^-1)_uu^-1 W_u^T)`` of every unit ``u`` at once."""
    units = weight.shape[1] // size
    blocks = hinv.view(units, size, units, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    columns = weight.view(weight.shape[0], units, size).transpose(0, 1)  # [units, out, size]
    solved = torch.linalg.solve(blocks, columns.transpose(1, 2))  # [units, size, out]
    return (columns.transpose(1, 2) * solved).sum((1, 2))


def _remove(weight: torch.Tensor, hinv: torch.Tensor, units: list[int], size: int):
    """The OBS step for a set of units: their columns go to zero, the others compensate;
    their rows and columns leave ``H^-1`` (identity stands there; never chosen again)."""
    cols = torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])
    inverse_block = torch.linalg.inv(hinv[cols][:, cols])
    weight = weight - weight[:, cols] @ inverse_block @ hinv[cols, :]
    hinv = hinv - hinv[:, cols] @ inverse_block @ hinv[cols, :]
    hinv[cols, :], hinv[:, cols] = 0.0, 0.0
    hinv[cols, cols] = 1.0
    return weight, hinv
