"""Choosing layers and computing keep-masks (1 keeps a weight, 0 prunes it)."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from compressflow import ConfigError

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def prunable_layers(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Module]:
    """Linear and Conv layers whose names match ``include`` and not ``exclude``."""
    every = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    chosen = {n: m for n, m in every.items()
              if any(fnmatch(n, p) for p in include) and not any(fnmatch(n, p) for p in exclude)}
    if not chosen:
        raise ConfigError(f"include {include} / exclude {exclude} match no Linear or Conv layer",
                          f"the model's layers: {', '.join(every) or 'none'}")
    return chosen


def _smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A keep-mask of ``scores``' shape with exactly its ``count`` smallest entries zeroed."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if count > 0:
        keep[torch.topk(scores.flatten(), count, largest=False).indices] = False
    return keep.view_as(scores)


def magnitude_masks(layers: dict[str, nn.Module], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks pruning the smallest |w|: ``sparsity`` of each layer, or of all together."""
    scores = {name: module.weight.detach().abs() for name, module in layers.items()}
    if scope == "layer":
        return {n: _smallest(s, round(sparsity * s.numel())) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _smallest(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = keep[start:start + score.numel()].view_as(score)
        start += score.numel()
    return masks


def layer_table(layers: dict[str, nn.Module], path: Path) -> Path:
    """Write a Markdown table (layer, shape, sparsity) of the pruned layers."""
    rows = ["| layer | shape | sparsity |", "|---|---|---|"]
    for name, module in layers.items():
        weight = module.weight.detach()
        sparsity = 1 - int(torch.count_nonzero(weight)) / weight.numel()
        rows.append(f"| {name} | {tuple(weight.shape)} | {sparsity:.4f} |")
    path.write_text("\n".join(rows) + "\n")
    return path
