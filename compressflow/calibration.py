"""Calibration block by block, as SparseGPT, GPTQ, Wanda and llm-compressor run on transformers.

A model built of repeated blocks (a transformer's decoder layers: one ``nn.ModuleList``
whose children hold every layer to prune) is calibrated one block at a time on the *true*
inputs of that block: the inputs of the first block are captured once from the calibration
batches (the rest of the forward pass is skipped), then for each block the input statistics
of its layers are gathered in one pass, its layers pruned, and its outputs (through the
pruned block) become the next block's inputs. Each block runs twice per batch, so the whole
model costs about two forward passes, where a layer-by-layer pass from the model's input
costs one (partial) forward pass per layer.

Used by the layer-wise reconstruction stages (prune/least-squares, prune/wanda,
quantize/gptq); models without such blocks (an MLP, a CNN) keep their layer-by-layer path.
Nothing here knows an algorithm: a stage gets each block's Hessians and changes the block's
layers as it likes before the block's outputs are taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressflow.task import call


DAMP = 0.01  # of the mean of diag(H), added to its diagonal before inverting (SparseGPT, GPTQ)


class StopForward(Exception):
    """Raised by a hook to skip the rest of a forward pass."""


def repeated_blocks(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]] | None:
    """The children of the ``nn.ModuleList`` (of two or more) that hold every one of the
    layers ``names`` between them, in order; None where there is none (or a layer lies
    outside it)."""
    if not names:
        return None
    best = None
    for list_name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        prefixes = [f"{list_name}.{i}." for i in range(len(module))]
        if all(any(n.startswith(p) for p in prefixes) for n in names):
            best = [(prefix[:-1], block) for prefix, block in zip(prefixes, module)]
    return best


Call = tuple[tuple[Any, ...], dict[str, Any]]


def first_block_inputs(model: nn.Module, block: nn.Module, batches, feed=call) -> list[Call]:
    """``(args, kwargs)`` the first block is called with, one pair per calibration batch."""
    calls: list[Call] = []

    def capture(_module, args, kwargs):
        calls.append((tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()}))
        raise StopForward

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _feed_all(model, batches, feed)
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise ValueError("the model's forward pass never reaches its first block")
    return calls


def run_block(block: nn.Module, calls: list[Call]) -> list[Call]:
    """The calls of the next block: each call's hidden states replaced by this block's output."""
    following = []
    with torch.no_grad(), _eval(block):
        for args, kwargs in calls:
            output = block(*args, **kwargs)
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if args:
                following.append(((hidden, *args[1:]), kwargs))
            else:  # called with hidden_states= as a keyword
                following.append(((), {**kwargs, "hidden_states": hidden}))
    return following


def block_hessians(block: nn.Module, layers: dict[str, nn.Module], calls: list[Call],
                   columns: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                   diagonal: bool = False) -> dict[str, torch.Tensor]:
    """H = X X^T / samples (float64) of each of ``layers`` (inside ``block``) over ``calls``;
    ``columns(module, input)`` turns a layer's input into ``[row length, samples]``. With
    ``diagonal`` only H's diagonal (1-D), for a method that needs no more (Wanda).

    Layers fed the very same tensor in every call (a transformer's q, k and v; gate and up)
    get one shared Hessian, computed once. Each call's product is taken in float32 (as
    SparseGPT's and llm-compressor's) and summed in float64."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)
    fed: dict[str, list[int]] = {name: [] for name in layers}  # which input each call fed it
    newest: list = []  # [input tensor, its number, its product, its samples]: held, so `is` holds

    def hook(module, args, _output, name):
        inputs = args[0]
        if not newest or newest[0] is not inputs:
            x = columns(module, inputs.detach()).float()
            number = newest[1] + 1 if newest else 0
            newest[:] = [inputs, number, _product(x, diagonal), x.shape[1]]
        fed[name].append(newest[1])
        sums[name] = sums.get(name, 0) + newest[2]
        counts[name] += newest[3]

    handles = [m.register_forward_hook(lambda mod, a, o, name=n: hook(mod, a, o, name))
               for n, m in layers.items()]
    try:
        with torch.no_grad(), _eval(block):
            for args, kwargs in calls:
                block(*args, **kwargs)
    finally:
        newest.clear()
        for handle in handles:
            handle.remove()
    missing = [n for n in layers if n not in sums]
    if missing:
        raise ValueError(f"the block's forward pass never runs {', '.join(missing)} (exclude them)")
    hessians: dict[str, torch.Tensor] = {}
    for name in layers:
        twin = next((n for n in hessians if fed[n] == fed[name]), None)
        hessians[name] = hessians[twin] if twin else sums[name] / counts[name]
    return hessians


def _product(x: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """X X^T of ``[row length, samples]`` columns, or its diagonal alone, in float64."""
    return (x * x).sum(dim=1).double() if diagonal else (x @ x.t()).double()


def hessians_by_block(model: nn.Module, blocks: list[tuple[str, nn.Module]],
                      layers: dict[str, nn.Module], batches,
                      columns: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                      feed=call, diagonal: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """For each of ``blocks`` (:func:`repeated_blocks`) holding some of ``layers``, the
    Hessians of those layers on the block's true inputs (:func:`block_hessians`). The caller
    changes the layers before asking for the next block: its inputs come through the block
    as changed."""
    calls = first_block_inputs(model, blocks[0][1], batches, feed)
    last = max(i for i, (name, _) in enumerate(blocks) if layers_in(name, layers))
    for index, (block_name, block) in enumerate(blocks[: last + 1]):
        inside = layers_in(block_name, layers)
        if inside:
            yield block_hessians(block, inside, calls, columns, diagonal)
        if index < last:
            calls = run_block(block, calls)


def calibration_batches(data, count: int, seed: int, task=None) -> list:
    """``count`` batches as ``(inputs, targets)``: from the data's calibration loader when it
    holds that many, else from the training split shuffled with ``seed`` (at most one pass)."""
    from torch.utils.data import DataLoader

    from compressflow.data import batch_size
    from compressflow.task import Task

    task = task or Task()
    if len(data.calibration) >= count:
        return [task.split(b) for b in islice(data.calibration, count)]
    train = data.train
    loader = DataLoader(train.dataset, batch_size=batch_size(train), shuffle=True,
                        collate_fn=train.collate_fn, generator=torch.Generator().manual_seed(seed))
    return [task.split(b) for b in islice(loader, count)]


def inverse_factor(hessian: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Hinv, dead)``: the upper Cholesky factor of the damped inverse of ``hessian`` (dead
    inputs, always zero, given a unit diagonal first), and the dead inputs' mask. Layers fed
    the same inputs (q, k and v; gate and up) share it."""
    H = hessian.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    return damped_inverse(H, damp), dead


def damped_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (float64), ten times more
    damping at each try while H stays singular."""
    mean_diag = float(torch.diag(hessian).mean()) or 1.0
    for attempt in range(6):
        damped = hessian + damp * 10 ** attempt * mean_diag * torch.eye(len(hessian), dtype=hessian.dtype)
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            return torch.linalg.cholesky(inverse, upper=True)
        except RuntimeError:  # not positive definite in this precision
            continue
    raise ValueError("the calibration inputs' Hessian stays singular after damping")


def output_errors(weight: torch.Tensor, news: list[torch.Tensor], hessian: torch.Tensor) -> list[float]:
    """||W X - W' X||^2 / ||W X||^2 of each W' of ``news``, from H = X X^T, ||W X||^2 computed
    once; in float32 (a diagnostic: the ratios need no more, and LLM layers make float64
    costly)."""
    H = hessian.float()

    def energy(matrix: torch.Tensor) -> float:
        matrix = matrix.float()
        return float(((matrix @ H) * matrix).sum())

    total = energy(weight)
    return [energy(weight - new) / total if total else 0.0 for new in news]


def layer_columns(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``[row length, samples]`` columns: ``W.flatten(1) @ columns`` is
    the layer's output (without bias) for each sample (and each position of a Conv)."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1]).t()
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.groups != 1:
        raise ValueError(f"layer-wise calibration handles Linear and Conv1d/Conv2d with groups=1, not "
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
    handles = [m.register_forward_hook(lambda *_a, name=n: order.append(name) if name not in order else None)
               for n, m in layers.items()]
    try:
        _feed_all(model, [(inputs, None)], feed)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in layers if n not in order]
    if missing:
        raise ValueError(f"calibration needs each layer's inputs; the forward pass never runs "
                         f"{', '.join(missing)} (exclude them)")
    return order


def input_hessians(model: nn.Module, layers: dict[str, nn.Module], batches,
                   stop_after: str | None = None, feed=call,
                   diagonal: bool = False) -> dict[str, torch.Tensor]:
    """H = X X^T / samples (float64) of each layer's calibration inputs (``diagonal``: its
    diagonal alone); with ``stop_after``, each forward pass ends once that layer ran."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook(module, args, _output, name):
        columns = layer_columns(module, args[0].detach()).double()
        sums[name] = sums.get(name, 0) + _product(columns, diagonal)
        counts[name] += columns.shape[1]
        if name == stop_after:
            raise StopForward

    handles = [m.register_forward_hook(lambda mod, a, o, name=n: hook(mod, a, o, name))
               for n, m in layers.items()]
    try:
        _feed_all(model, batches, feed)
    finally:
        for handle in handles:
            handle.remove()
    return {n: sums[n] / counts[n] for n in sums}


def _feed_all(model: nn.Module, batches, feed) -> None:
    """Every batch's inputs through ``model`` in eval mode without gradients, each pass
    ended early where a hook raises :class:`StopForward`."""
    with torch.no_grad(), _eval(model):
        for inputs, _targets in batches:
            try:
                feed(model, inputs)
            except StopForward:
                pass


def layer_hessians(model: nn.Module, layers: dict[str, nn.Module], batches,
                   feed=call, diagonal: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The Hessians H = X X^T / samples of ``layers`` on their true calibration inputs, a
    group at a time: block by block where the layers lie in repeated blocks
    (:func:`hessians_by_block`), else one layer at a time in forward order, each on inputs
    through the earlier layers as the caller has changed them by then. ``diagonal``: the
    diagonals alone (1-D), which cost samples x columns instead of samples x columns^2."""
    blocks = repeated_blocks(model, list(layers))
    if blocks is not None:
        yield from hessians_by_block(model, blocks, layers, batches, layer_columns, feed, diagonal)
        return
    for name in forward_order(model, layers, batches[0][0], feed):
        yield input_hessians(model, {name: layers[name]}, batches, stop_after=name, feed=feed,
                             diagonal=diagonal)


def layers_in(block_name: str, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The layers of ``layers`` that lie inside the block called ``block_name``."""
    return {n: m for n, m in layers.items() if n.startswith(f"{block_name}.")}


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


@contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
