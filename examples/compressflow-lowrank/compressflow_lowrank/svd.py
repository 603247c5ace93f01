"""Truncated-SVD factorization of Linear layers (imported by ``run``; needs torch).

A Linear layer y = W x + b with W of shape (out, in) and W = U S V^T becomes

    nn.Sequential(Linear(in, r, bias=False), Linear(r, out))
    first weight  = sqrt(S_r) V_r^T      (r x in)
    second weight = U_r sqrt(S_r)        (out x r), second bias = b

so that second(first(x)) = U_r S_r V_r^T x + b, the best rank-r approximation of W (Eckart-
Young). Only plain torch modules are used, so the model pickles and loads without this plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from compressflow import ConfigError


@dataclass
class LayerReport:
    """What happened to one Linear layer."""

    name: str
    in_features: int
    out_features: int
    rank: int
    kept_energy: float
    params_before: int
    params_after: int
    factorized: bool


def candidate_layers(model: nn.Module, exclude: list[str]) -> dict[str, nn.Linear]:
    """Every module whose type is exactly nn.Linear, by name, ``exclude`` patterns left out.

    Subclasses of nn.Linear (QAT layers, attention's out_proj, whose owner reads its
    ``weight`` directly) are never candidates: replacing them would change what they do.
    """
    every = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    chosen = {n: m for n, m in every.items() if not any(fnmatch(n, p) for p in exclude)}
    if not chosen:
        raise ConfigError(
            f"factorize: no nn.Linear layer to factorize (exclude {exclude})",
            f"the model's Linear layers: {', '.join(every) or 'none'}",
        )
    return chosen


def energy_profile(singular_values: torch.Tensor) -> torch.Tensor:
    """Cumulative share of sum(s^2) kept by ranks 1, 2, ..., len(s) (float64)."""
    squares = singular_values.detach().double() ** 2
    total = squares.sum()
    if total <= 0:  # an all-zero weight: every rank keeps everything
        return torch.ones_like(squares)
    return torch.cumsum(squares, 0) / total


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values keep at least ``energy`` of sum(s^2).

    A rank whose share falls short of ``energy`` by rounding alone (a few ulps of the dtype
    the singular values were computed in) counts as meeting it.
    """
    profile = energy_profile(singular_values)
    slack = 16 * torch.finfo(singular_values.dtype).eps
    short = int((profile < energy - slack).sum())  # ranks that fall short (profile is sorted)
    return min(short + 1, len(profile))


def _svd_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 at least (half-precision SVD is not supported on CPU), float64 stays float64."""
    return torch.promote_types(weight.dtype, torch.float32)


def factorized_params(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    """Parameters of the two-layer replacement (the bias stays on the second layer)."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """The rank-``rank`` two-layer replacement of ``layer`` (see the module docstring)."""
    weight = layer.weight.detach()
    u, s, vh = torch.linalg.svd(weight.to(_svd_dtype(weight)), full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():  # copy_ casts back to the layer's dtype
        first.weight.copy_(root[:, None] * vh[:rank])
        second.weight.copy_(u[:, :rank] * root[None, :])
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:  # the model itself is a Linear layer
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def factorize_model(model: nn.Module, *, rank: int | None = None, energy: float | None = None,
                    exclude: list[str] = ()) -> tuple[nn.Module, list[LayerReport]]:
    """Factorize every candidate Linear where it makes the layer smaller; report each one.

    Exactly one of ``rank`` (clipped to min(in, out)) and ``energy`` chooses each layer's rank.
    A layer is replaced only when r * (in + out) < in * out; otherwise it is kept as it was.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    reports = []
    for name, layer in candidate_layers(model, list(exclude)).items():
        weight = layer.weight.detach()
        singular_values = torch.linalg.svdvals(weight.to(_svd_dtype(weight)))
        if rank is not None:
            r = min(rank, len(singular_values))
        else:
            r = rank_for_energy(singular_values, energy)
        kept_energy = float(energy_profile(singular_values)[r - 1])
        n_in, n_out, bias = layer.in_features, layer.out_features, layer.bias is not None
        before = n_in * n_out + (n_out if bias else 0)
        smaller = r * (n_in + n_out) < n_in * n_out
        if smaller:
            model = _replace(model, name, factorize_linear(layer, r))
        after = factorized_params(n_in, n_out, r, bias) if smaller else before
        reports.append(LayerReport(name, n_in, n_out, r, kept_energy if smaller else 1.0,
                                   before, after, smaller))
    return model, reports


def layer_table(reports: list[LayerReport], path: Path) -> Path:
    """Write a Markdown table of every candidate layer: what was done to it and what it cost."""
    rows = ["| layer | shape (out x in) | rank | kept energy | params before | params after | result |",
            "|---|---|---|---|---|---|---|"]
    for r in reports:
        if r.factorized:
            rank, result = str(r.rank), "factorized"
        else:
            rank = "full"
            result = (f"kept: rank {r.rank} needs {r.rank * (r.in_features + r.out_features)} "
                      f">= {r.in_features * r.out_features} weights")
        rows.append(f"| {r.name or '(model)'} | {r.out_features}x{r.in_features} | {rank} | "
                    f"{r.kept_energy:.4f} | {r.params_before} | {r.params_after} | {result} |")
    path.write_text("\n".join(rows) + "\n")
    return path
