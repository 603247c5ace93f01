"""Structural pruning with torch-pruning's dependency graph; the heavy half of the plugin.

``structured_prune`` changes a model in place and returns a :class:`PruneReport` (every
layer's weight shape before and after, channel counts). It is usable without a pipeline (the
benchmark calls it directly). ``channel_importance`` scores one layer's channels the way the
pruner does, for inspection and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from itertools import islice
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compressflow import ConfigError

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)
SHAPED = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
GRADIENT_IMPORTANCES = ("taylor", "hessian")

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PruneReport:
    """What ``structured_prune`` did: weight shapes by layer name, before and after."""

    shapes_before: dict[str, tuple[int, ...]]
    shapes_after: dict[str, tuple[int, ...]]
    channels_before: int
    channels_after: int
    classifier: str | None
    ignored: list[str] = field(default_factory=list)
    calibration_samples: int = 0


# --- importance -----------------------------------------------------------------------------


def make_importance(name: str) -> tp.importance.Importance:
    """The torch-pruning importance object for ``name``.

    ``hessian`` is torch-pruning's GroupHessianImportance, but never fed through its own
    ``accumulate_grad`` (which keeps only the last sample in 1.6.x): :func:`fill_gradients`
    puts the mean of the per-sample squared gradients in ``param.grad`` instead, which the
    importance reads as the Hessian's diagonal when its own store is empty.
    """
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "hessian":
        return tp.importance.GroupHessianImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"unknown importance {name!r}")


def squared_gradient_mean(model: nn.Module, batches: Batches,
                          max_samples: int | None = None) -> tuple[dict[nn.Parameter, torch.Tensor], int]:
    """E[g^2] over samples: the mean of every parameter's squared per-sample gradient.

    Each sample's cross-entropy gets its own gradient (``torch.func.vmap`` over the batch;
    one backward pass per sample where vmap cannot run the model), the model in eval mode so
    that BatchNorm uses its running statistics and one sample's gradient does not depend on
    the others in its batch. Returns ``({param: mean of g^2}, samples used)``.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p) for n, p in named.items()}
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            if max_samples is not None:
                inputs, targets = inputs[:max_samples - seen], targets[:max_samples - seen]
            if len(targets) == 0:
                break
            for name, squares in _per_sample_squared_grads(model, named, inputs, targets).items():
                sums[name] += squares
            seen += len(targets)
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no calibration sample to compute gradients on")
    return {named[n]: s / seen for n, s in sums.items()}, seen


def _per_sample_squared_grads(model: nn.Module, named: dict[str, nn.Parameter],
                              inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum over the batch of each sample's squared gradient, by parameter name."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in named.items()}
    buffers = dict(model.named_buffers())

    def sample_loss(values, x, y):
        out = functional_call(model, (values, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    try:
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
        return {n: (g ** 2).sum(0) for n, g in grads.items()}
    except Exception:  # an op vmap cannot batch: one backward pass per sample
        sums = {n: torch.zeros_like(p) for n, p in named.items()}
        names, leaves = list(named), list(named.values())
        for x, y in zip(inputs, targets):
            loss = F.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0))
            for name, g in zip(names, torch.autograd.grad(loss, leaves, allow_unused=True)):
                if g is not None:
                    sums[name] += g.detach() ** 2
        return sums


def loss_gradient(model: nn.Module, batches: Batches) -> tuple[dict[nn.Parameter, torch.Tensor], int]:
    """dL/dw of the mean cross-entropy over all samples of ``batches`` (model in eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = {p: torch.zeros_like(p) for p in params}
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            loss = F.cross_entropy(model(inputs), targets, reduction="sum")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for param, grad in zip(params, grads):
                if grad is not None:
                    sums[param] += grad.detach()
            seen += len(targets)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no calibration sample to compute gradients on")
    return {p: s / seen for p, s in sums.items()}, seen


def fill_gradients(model: nn.Module, importance: str, batches: list) -> int:
    """Put into ``param.grad`` what ``importance`` reads there; returns the samples used.

    taylor: the loss gradient. hessian: the mean squared per-sample gradient. Others: nothing.
    """
    if importance not in GRADIENT_IMPORTANCES:
        return 0
    if importance == "hessian":
        values, seen = squared_gradient_mean(model, batches)
    else:
        values, seen = loss_gradient(model, batches)
    for param in model.parameters():
        param.grad = values.get(param)
    return seen


# --- choosing layers --------------------------------------------------------------------------


def classifier_name(model: nn.Module, example: torch.Tensor) -> str | None:
    """The name of the last Linear/Conv layer the forward pass runs (the output layer)."""
    names = {module: name for name, module in model.named_modules() if isinstance(module, PRUNABLE)}
    order: list[str] = []
    handles = [module.register_forward_hook(lambda m, _i, _o: order.append(names[m]))
               for module in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return order[-1] if order else None


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Conv, Linear and normalization layer, by name."""
    return {name: tuple(module.weight.shape) for name, module in model.named_modules()
            if isinstance(module, SHAPED) and getattr(module, "weight", None) is not None}


def count_channels(model: nn.Module) -> int:
    """Output channels of every Conv plus output features of every Linear."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.out_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            total += module.out_channels
    return total


def _match(model: nn.Module, patterns: Iterable[str], what: str,
           types: tuple[type, ...] | None = None) -> dict[str, list[tuple[str, nn.Module]]]:
    """Modules whose names match each pattern; a pattern matching nothing is an error."""
    candidates = [(n, m) for n, m in model.named_modules()
                  if n and (types is None or isinstance(m, types))]
    found = {}
    for pattern in patterns:
        hits = [(n, m) for n, m in candidates if fnmatch(n, pattern)]
        if not hits:
            known = ", ".join(n for n, _ in candidates)
            raise ConfigError(f"{what} pattern '{pattern}' matches no layer of the model",
                              f"its layers: {known or 'none'}")
        found[pattern] = hits
    return found


# --- pruning --------------------------------------------------------------------------------


def structured_prune(
    model: nn.Module,
    example: torch.Tensor,
    *,
    importance: str = "magnitude",
    ratio: float,
    global_pruning: bool = False,
    per_layer: dict[str, float] | None = None,
    iterative_steps: int = 1,
    round_to: int | None = None,
    ignore: Iterable[str] = (),
    prune_classifier: bool = False,
    calibration: Batches | None = None,
    calibration_batches: int | None = None,
    seed: int = 0,
) -> PruneReport:
    """Remove channels of ``model`` in place; see the package docstring for the parameters.

    ``example`` (a real batch of inputs, at least 2 rows) is traced to build the dependency
    graph. ``calibration`` yields ``(inputs, targets)`` batches for taylor/hessian; with
    ``iterative_steps`` above 1 their gradients are recomputed on the shrunk model before
    each step.
    """
    torch.manual_seed(seed)
    model.eval()
    shapes_before, channels_before = layer_shapes(model), count_channels(model)
    classifier = classifier_name(model, example)

    ignored: dict[str, nn.Module] = {}
    if classifier is not None and not prune_classifier:
        ignored[classifier] = model.get_submodule(classifier)
    for hits in _match(model, ignore, "ignore").values():
        ignored.update(hits)
    ratios: dict[nn.Module, float] = {}
    for pattern, hits in _match(model, (per_layer or {}), "per_layer", PRUNABLE).items():
        for _name, module in hits:
            ratios[module] = per_layer[pattern]

    batches: list = []
    if importance in GRADIENT_IMPORTANCES:
        if calibration is None:
            raise ValueError(f"importance '{importance}' needs calibration batches")
        batches = list(islice(calibration, calibration_batches))

    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=make_importance(importance),
        global_pruning=global_pruning,
        pruning_ratio=ratio,
        pruning_ratio_dict=ratios or None,
        iterative_steps=iterative_steps,
        ignored_layers=list(ignored.values()),
        round_to=round_to,
    )
    samples = 0
    try:
        for _ in range(iterative_steps):
            samples = fill_gradients(model, importance, batches)
            pruner.step()
    finally:
        model.zero_grad(set_to_none=True)
    model.eval()
    return PruneReport(shapes_before, layer_shapes(model), channels_before,
                       count_channels(model), classifier, sorted(ignored), samples)


def channel_importance(model: nn.Module, example: torch.Tensor, layer: str, importance: str,
                       batches: list | None = None) -> torch.Tensor:
    """The score ``importance`` gives each output channel of ``layer`` (its whole group).

    For taylor/hessian the gradients come from ``batches``; the model is not changed except
    for its ``.grad`` fields, which are cleared afterwards.
    """
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    module = model.get_submodule(layer)
    if isinstance(module, nn.Linear):
        handler, channels = tp.prune_linear_out_channels, module.out_features
    else:
        handler, channels = tp.prune_conv_out_channels, module.out_channels
    group = graph.get_pruning_group(module, handler, idxs=list(range(channels)))
    try:
        fill_gradients(model, importance, batches or [])
        return make_importance(importance)(group)
    finally:
        model.zero_grad(set_to_none=True)


# --- reporting ------------------------------------------------------------------------------


def shape_table(report: PruneReport, path: Path) -> Path:
    """A Markdown table, one row a layer: weight shape before -> after."""
    rows = ["| layer | before | after | kept |", "|---|---|---|---|"]
    for name, before in report.shapes_before.items():
        after = report.shapes_after.get(name)
        kept = (_numel(after) / _numel(before)) if after else 0.0
        note = " (classifier)" if name == report.classifier else ""
        note += " (ignored)" if name in report.ignored and name != report.classifier else ""
        rows.append(f"| {name}{note} | {_shape(before)} | {_shape(after)} | {kept:.2f} |")
    rows.append(f"\nchannels: {report.channels_before} -> {report.channels_after}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _shape(shape: tuple[int, ...] | None) -> str:
    return "removed" if shape is None else " x ".join(str(s) for s in shape)
