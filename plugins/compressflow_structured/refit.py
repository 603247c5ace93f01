"""Least-squares refit of a BERT-style encoder after heads and FFN neurons were removed.

Removing units leaves each layer's two output projections (``attention.output.dense``,
``output.dense``) summing fewer terms than they were trained on. Kwon et al. (NeurIPS 2022,
"A Fast Post-Training Pruning Framework for Transformers") showed that re-solving those
projections by least squares, layer by layer on a little unlabelled data, recovers most of
what was lost without any training. :func:`refit_outputs` does this:

for every layer in order, for the attention sub-layer and then the FFN, it solves a ridge
regression ``[x, 1] @ W ~ y`` over the real (unpadded) tokens of the calibration batches, where

- ``x`` is what the pruned projection reads in the *pruned* model (the kept heads' context,
  the kept neurons' activations), with every earlier layer already refitted;
- ``y`` is the unpruned model's pre-LayerNorm sum at the same place, less the pruned model's
  own residual input: ``dense_0(x_0) + residual_0 - residual``, so the refit also absorbs the
  drift the earlier layers left in the residual stream.

Only the two output projections change (weights and biases); query, key, value and
``intermediate.dense`` stay as pruning left them. The same refit serves a model with layers
dropped (``structured/drop-layers``): a kept layer's FFN is then fitted to the sum of the
last layer of the span it stands for, through that layer's LayerNorm. The sums are accumulated
in float64, and the ridge term is ``ridge`` times the mean of the Gram matrix's diagonal.

Both models are walked layer by layer (:mod:`compressflow.calibration`'s block walk), as
llm-compressor's sequential pipeline walks a decoder: each calibration batch's hidden states are kept between layers, so
refitting every layer costs about four passes of one layer per batch, not one pass of the
whole prefix per sub-layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from compressflow.calibration import Call, StopForward, first_block_inputs, run_block
from compressflow.task import Task
from compressflow_structured.transformer_plan import encoder_layers, token_mask

SUBLAYERS = (("attention", lambda layer: layer.attention.output),
             ("ffn", lambda layer: layer.output))


@dataclass
class RefitError:
    """One sub-layer's relative squared error ``||xW - y||^2 / ||y||^2`` on the calibration
    tokens, with the weights pruning left and with the refitted ones."""

    layer: str
    part: str
    before: float
    after: float


def error_metrics(errors: list[RefitError]) -> dict[str, float]:
    """``refit_error_before``/``refit_error_after``: the mean relative error of the output
    projections, as cut and as refitted; what a stage that refits logs."""
    return {"refit_error_before": sum(e.before for e in errors) / len(errors),
            "refit_error_after": sum(e.after for e in errors) / len(errors)}


Reads = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called with a batch's index and the ``(hidden_states, input_tensor)`` a BertSelfOutput or
BertOutput reads for it."""


def refit_outputs(model: nn.Module, original: nn.Module, batches: Iterable[Any], task: Task,
                  *, ridge: float = 1e-2,
                  sources: list[tuple[int, int]] | None = None) -> list[RefitError]:
    """Refit ``model``'s output projections, in place, toward ``original`` (the encoder it
    was cut from); see the module docstring. Returns the errors, sub-layer by sub-layer.

    :param batches: model inputs (dicts with ``attention_mask``), reused for every layer.
    :param ridge: the ridge term, relative to the Gram matrix's mean diagonal.
    :param sources: for each of ``model``'s layers, the indices of ``original``'s layers its
        attention and its FFN are fitted to (default: its own index for both), in order. A
        layer standing in for several (layers dropped) fits its FFN to the last one's sum,
        and takes that layer's output LayerNorm, which the sum goes through.
    """
    batches = [(inputs, None) for inputs in batches]
    named = encoder_layers(model)
    theirs = [layer for _n, layer in encoder_layers(original)]
    sources = sources or [(i, i) for i in range(len(named))]
    model.eval(), original.eval()
    masks = [token_mask(inputs)[..., 0].bool() for inputs, _ in batches]
    ours_calls = first_block_inputs(model, named[0][1], batches, task.feed)
    walk = _Original(theirs, first_block_inputs(original, theirs[0], batches, task.feed))
    errors = []
    for (name, layer), (attention_from, ffn_from) in zip(named, sources):
        targets = walk.targets(attention_from, ffn_from)
        if ffn_from != attention_from:
            layer.output.LayerNorm.load_state_dict(theirs[ffn_from].output.LayerNorm.state_dict())
        for part, output_of in SUBLAYERS:
            projection = output_of(layer)
            system = _System(targets[part], masks)
            _probe(layer, ours_calls, projection, system.add)
            errors.append(system.solve(name, part, projection.dense, ridge))
        ours_calls = run_block(layer, ours_calls)
    return errors


class _Original:
    """The unpruned encoder walked forward layer by layer (:func:`run_block`), as far as
    the layers being refitted need."""

    def __init__(self, layers: list[nn.Module], calls: list[Call]):
        self.layers, self.calls, self.done = layers, calls, 0

    def targets(self, attention_from: int, ffn_from: int) -> dict[str, list]:
        """The pre-LayerNorm sums ``dense_0(x_0) + residual_0``, batch by batch, at layer
        ``attention_from``'s attention and layer ``ffn_from``'s FFN; the walk moves past
        ``ffn_from``."""
        if not self.done <= attention_from <= ffn_from:
            raise ValueError(f"refit sources must go forward: ({attention_from}, {ffn_from}) "
                             f"after layer {self.done - 1}")
        targets: dict[str, list] = {"attention": [], "ffn": []}
        handles = []
        for (part, output_of), index in zip(SUBLAYERS, (attention_from, ffn_from)):
            reference = output_of(self.layers[index])

            def keep(_module, args, kwargs, part=part, dense=reference.dense):
                x, residual = _inputs(args, kwargs)
                targets[part].append(dense(x) + residual)

            handles.append(reference.register_forward_pre_hook(keep, with_kwargs=True))
        try:
            while self.done <= ffn_from:
                self.calls = run_block(self.layers[self.done], self.calls)
                self.done += 1
        finally:
            for handle in handles:
                handle.remove()
        return targets


def _probe(layer: nn.Module, calls: list[Call], module: nn.Module, reads: Reads) -> None:
    """Run ``layer`` on every call up to ``module``, handing ``reads`` what it reads."""

    def stop(_module, args, kwargs):
        reads(index, *_inputs(args, kwargs))
        raise StopForward

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            for index, (args, kwargs) in enumerate(calls):
                try:
                    layer(*args, **kwargs)
                except StopForward:
                    pass
    finally:
        handle.remove()


def _inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states, input_tensor)`` of a BertSelfOutput/BertOutput call."""
    values = [*args, *kwargs.values()]
    return values[0].detach(), values[1].detach()


class _System:
    """The normal equations ``(X^T X, X^T Y, ||Y||^2)`` of one sub-layer, summed batch by
    batch over the real tokens; ``Y`` is the target less the pruned model's residual."""

    def __init__(self, targets: list[torch.Tensor], masks: list[torch.Tensor]):
        self.targets, self.masks = targets, masks
        self.gram = self.cross = None
        self.target = 0.0

    def add(self, index: int, x: torch.Tensor, residual: torch.Tensor) -> None:
        """Add batch ``index``, whose projection reads ``x`` beside ``residual``."""
        mask = self.masks[index]
        y = (self.targets[index] - residual)[mask].double()
        x = torch.cat([x[mask].double(), torch.ones(int(mask.sum()), 1, dtype=torch.float64)], 1)
        self.gram = x.T @ x if self.gram is None else self.gram + x.T @ x
        self.cross = x.T @ y if self.cross is None else self.cross + x.T @ y
        self.target += float((y * y).sum())

    def solve(self, layer: str, part: str, dense: nn.Linear, ridge: float) -> RefitError:
        """Replace ``dense``'s weight and bias by the ridge solution; its errors."""
        solved = _ridge(self.gram, self.cross, ridge)
        current = torch.cat([dense.weight.detach().T, dense.bias.detach()[None]]).double()
        error = RefitError(layer, part, _relative(current, self.gram, self.cross, self.target),
                           _relative(solved, self.gram, self.cross, self.target))
        with torch.no_grad():
            dense.weight.copy_(solved[:-1].T)
            dense.bias.copy_(solved[-1])
        return error


def _ridge(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin ||XW - Y||^2 + lambda ||W||^2``, lambda relative to the mean diagonal."""
    damping = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + damping * torch.eye(len(gram), dtype=gram.dtype), cross)


def _relative(weights: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
              target: float) -> float:
    """``||XW - Y||^2 / ||Y||^2`` from the normal equations' sums."""
    error = float((weights * (gram @ weights)).sum() - 2 * (weights * cross).sum()) + target
    return max(error, 0.0) / max(target, 1e-30)
