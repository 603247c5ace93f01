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
last layer of the span it stands for, through that layer's LayerNorm. The sums are accumulated in float64, and
the ridge term is ``ridge`` times the mean of the Gram matrix's diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

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


class _Stop(Exception):
    """Raised by a capture hook: nothing after the captured place needs to run."""


def refit_outputs(model: nn.Module, original: nn.Module, batches: Iterable[Any], task: Task,
                  *, ridge: float = 1e-2,
                  sources: list[tuple[int, int]] | None = None) -> list[RefitError]:
    """Refit ``model``'s output projections, in place, toward ``original`` (the encoder it
    was cut from); see the module docstring. Returns the errors, sub-layer by sub-layer.

    :param batches: model inputs (dicts with ``attention_mask``), reused for every layer.
    :param ridge: the ridge term, relative to the Gram matrix's mean diagonal.
    :param sources: for each of ``model``'s layers, the indices of ``original``'s layers its
        attention and its FFN are fitted to (default: its own index for both). A layer
        standing in for several (layers dropped) fits its FFN to the last one's sum, and
        takes that layer's output LayerNorm, which the sum goes through.
    """
    batches = list(batches)
    ours_all, theirs = encoder_layers(model), [layer for _n, layer in encoder_layers(original)]
    sources = sources or [(i, i) for i in range(len(ours_all))]
    model.eval(), original.eval()
    errors = []
    for (name, layer), (attention_from, ffn_from) in zip(ours_all, sources):
        if ffn_from != attention_from:
            layer.output.LayerNorm.load_state_dict(theirs[ffn_from].output.LayerNorm.state_dict())
        for (part, output_of), source in zip(SUBLAYERS, (attention_from, ffn_from)):
            ours, reference = output_of(layer), output_of(theirs[source])
            gram, cross, target = _normal_equations(model, ours, original, reference, batches, task)
            solved = _ridge(gram, cross, ridge)
            current = torch.cat([ours.dense.weight.detach().T, ours.dense.bias.detach()[None]]).double()
            errors.append(RefitError(name, part, _relative(current, gram, cross, target),
                                     _relative(solved, gram, cross, target)))
            with torch.no_grad():
                ours.dense.weight.copy_(solved[:-1].T)
                ours.dense.bias.copy_(solved[-1])
    return errors


def _normal_equations(model: nn.Module, ours: nn.Module, original: nn.Module,
                      reference: nn.Module, batches: list[Any], task: Task):
    """``(X^T X, X^T Y, ||Y||^2)`` of one sub-layer over every batch's real tokens."""
    gram = cross = None
    target = 0.0
    for inputs in batches:
        mask = token_mask(inputs)[..., 0].bool()
        x, residual = _inputs_of(model, ours, inputs, task)
        x0, residual0 = _inputs_of(original, reference, inputs, task)
        with torch.no_grad():
            y = (reference.dense(x0) + residual0 - residual)[mask].double()
        x = torch.cat([x[mask].double(), torch.ones(int(mask.sum()), 1, dtype=torch.float64)], 1)
        gram = x.T @ x if gram is None else gram + x.T @ x
        cross = x.T @ y if cross is None else cross + x.T @ y
        target += float((y * y).sum())
    return gram, cross, target


def _inputs_of(model: nn.Module, module: nn.Module, inputs: Any, task: Task):
    """``(hidden_states, input_tensor)`` that ``module`` (a BertSelfOutput/BertOutput) reads
    when ``model`` runs on ``inputs``; the forward pass stops there."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        values = [*args, *kwargs.values()]
        seen["x"], seen["residual"] = values[0].detach(), values[1].detach()
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            task.feed(model, inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"], seen["residual"]


def _ridge(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin ||XW - Y||^2 + lambda ||W||^2``, lambda relative to the mean diagonal."""
    damping = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + damping * torch.eye(len(gram), dtype=gram.dtype), cross)


def _relative(weights: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
              target: float) -> float:
    """``||XW - Y||^2 / ||Y||^2`` from the normal equations' sums."""
    error = float((weights * (gram @ weights)).sum() - 2 * (weights * cross).sum()) + target
    return max(error, 0.0) / max(target, 1e-30)
