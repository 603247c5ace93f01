"""What ``structured_prune/heads`` removes from a BERT-style encoder, before anything is
removed: the encoder layers and their projections, the widths a plan keeps, and the scores
that rank heads and FFN neurons (magnitude, activation, taylor; obs in
:mod:`compressflow_structured.obs_rank`).

:mod:`compressflow_structured.transformer` applies the plan through torch-pruning and checks
the pruned model.
"""

from __future__ import annotations

import math
from itertools import islice
from typing import Any, Iterable

import torch
import torch_pruning as tp
from torch import nn

from compressflow import ConfigError, StageFailed
from compressflow.task import Task, batch_len

IMPORTANCES = ("magnitude", "activation", "taylor", "obs")


# --- finding the layers --------------------------------------------------------------------


def transformer_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a compressflow HF wrapper (``.model``), or ``model``."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "encoder") else model


def encoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every encoder layer, names as ``model.named_modules()`` gives.

    Raises ConfigError unless every layer has BERT's parts (``attention.self.query/key/
    value``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``).
    """
    inner = transformer_of(model)
    stack = getattr(getattr(inner, "encoder", None), "layer", None)
    if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
        raise ConfigError("structured_prune/heads: the model has no encoder.layer list",
                          "it prunes BERT-style encoders (the hf: source's HFEncoder)")
    prefix = "model." if inner is not model else ""
    layers = []
    for index, layer in enumerate(stack):
        name = f"{prefix}encoder.layer.{index}"
        try:
            parts = layer_parts(layer)
        except AttributeError as error:
            raise ConfigError(f"structured_prune/heads: {name} is not a BERT layer ({error})",
                              "it prunes BERT-style encoders (BertLayer and its kin)") from None
        if not all(isinstance(p, nn.Linear) for p in parts.values()):
            raise ConfigError(f"structured_prune/heads: {name} holds non-Linear projections",
                              "prune before quantizing")
        layers.append((name, layer))
    return layers


def layer_parts(layer: nn.Module) -> dict[str, nn.Module]:
    """The Linear layers of one BERT layer that heads and neurons run through."""
    attention = layer.attention
    return {"query": attention.self.query, "key": attention.self.key,
            "value": attention.self.value, "attn_out": attention.output.dense,
            "ffn_in": layer.intermediate.dense, "ffn_out": layer.output.dense}


def head_size_of(layer: nn.Module) -> int:
    """Width of one attention head of ``layer`` (its attention module's own figure)."""
    return int(layer.attention.self.attention_head_size)


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --- importance ----------------------------------------------------------------------------


class ContributionImportance(tp.importance.Importance):
    """Scores measured beforehand for the input channels of chosen Linear layers.

    A group containing one of those layers' input channels gets its scores; torch-pruning
    averages them over each head's channels to rank heads, so every channel of a head
    carries the head's own score.
    """

    def __init__(self, scores: dict[nn.Module, torch.Tensor]) -> None:
        self.scores = scores

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        for i, (dep, idxs) in enumerate(group):
            if dep.layer in self.scores and dep.pruning_fn == tp.prune_linear_in_channels:
                root = torch.as_tensor(group[i].root_idxs)
                found = torch.zeros(int(root.max()) + 1)
                found[root] = self.scores[dep.layer][torch.as_tensor(idxs)]
                return found
        return None


def contribution_scores(model: nn.Module, layers: list[tuple[str, nn.Module]],
                        batches: list[Any], task: Task) -> dict[nn.Module, torch.Tensor]:
    """How much each head and each FFN neuron adds to the residual stream, on real tokens.

    A head's score is the mean over attended tokens of ``||W_o[:, head] @ context_head||``
    (what it writes through ``attention.output.dense``); a neuron's is the mean of
    ``|activation| * ||W[:, neuron]||`` through ``output.dense``. Padding never counts.
    Returns scores for the input channels of every ``attention.output.dense`` (a head's
    score on each of its channels) and ``output.dense``.
    """
    sums: dict[nn.Module, torch.Tensor] = {}
    state = {"mask": None, "tokens": 0.0}

    def attention_hook(module, args, head_size):
        context = args[0].detach()
        heads = context.shape[-1] // head_size
        weight = module.weight.detach().view(module.out_features, heads, head_size)
        parts = torch.einsum("btkd,okd->btko", context.view(*context.shape[:-1], heads, head_size),
                             weight).norm(dim=-1)  # [batch, seq, heads]
        _accumulate(sums, module, (parts * state["mask"]).sum((0, 1)).repeat_interleave(head_size))

    def ffn_hook(module, args):
        active = args[0].detach().abs() * state["mask"]
        _accumulate(sums, module, active.sum((0, 1)) * module.weight.detach().norm(dim=0))

    handles = []
    for _name, layer in layers:
        parts, size = layer_parts(layer), head_size_of(layer)
        handles.append(parts["attn_out"].register_forward_pre_hook(
            lambda m, a, size=size: attention_hook(m, a, size)))
        handles.append(parts["ffn_out"].register_forward_pre_hook(ffn_hook))
    try:
        with torch.no_grad():
            for inputs in batches:
                state["mask"] = token_mask(inputs)
                state["tokens"] += float(state["mask"].sum())
                task.feed(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {module: total / max(state["tokens"], 1.0) for module, total in sums.items()}


def _accumulate(sums: dict[nn.Module, torch.Tensor], module: nn.Module,
                value: torch.Tensor) -> None:
    sums[module] = sums[module] + value if module in sums else value


def token_mask(inputs: Any) -> torch.Tensor:
    """``[batch, seq, 1]``: 1 at the positions the attention mask attends (all, lacking one)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None:
        ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
        mask = torch.ones(ids.shape[:2])
    return mask.to(torch.float32).unsqueeze(-1)


def taylor_gradients(model: nn.Module, batches: list[tuple[Any, Any]], task: Task,
                     reference: nn.Module | None) -> int:
    """Put into ``param.grad`` the gradient of the task's loss over ``batches``.

    The loss is ``task.loss(prediction, targets, reference's prediction)``, the model in
    eval mode (no dropout). Where the task judges fidelity to a reference (embedding) and
    the model still is that reference, the loss sits at its minimum and every gradient
    vanishes: nothing to rank with, so that raises StageFailed. Returns the samples used.
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    seen, total = 0, 0.0
    for inputs, targets in batches:
        expected = None
        if reference is not None:
            with torch.no_grad():
                expected = task.predict(reference.eval(), inputs)
        loss = task.loss(task.predict(model, inputs), targets, expected)
        (loss * batch_len(inputs)).backward()
        seen, total = seen + batch_len(inputs), total + float(loss.detach()) * batch_len(inputs)
    if seen == 0:
        raise StageFailed("structured_prune/heads: no calibration sample for taylor")
    if total / seen < 1e-6:
        model.zero_grad(set_to_none=True)
        raise StageFailed(
            f"structured_prune/heads: taylor has no gradient to rank with: the task loss is "
            f"{total / seen:.2g} on the calibration batches (the model still matches its "
            "reference, so the loss is at its minimum)", "use importance: activation or magnitude")
    for param in model.parameters():
        if param.grad is not None:
            param.grad /= seen
    return seen


# --- the plan ------------------------------------------------------------------------------


def planned_widths(heads: int, ffn: int, head_ratio: float, ffn_ratio: float) -> tuple[int, int]:
    """``(heads kept, neurons kept)`` per layer, as torch-pruning rounds them.

    Heads: ``ceil(ratio * heads)`` go; neurons: ``int(neurons * (1 - ratio))`` stay. A
    plan that keeps no head or no neuron is a ConfigError.
    """
    kept_heads = heads - math.ceil(head_ratio * heads)
    kept_ffn = int(ffn * (1 - ffn_ratio))
    if kept_heads < 1:
        raise ConfigError(f"structured_prune/heads: heads {head_ratio:g} of {heads} heads "
                          "leaves none",
                          f"keep at least one: heads below {(heads - 1) / heads:.3f}")
    if kept_ffn < 1:
        raise ConfigError(f"structured_prune/heads: ffn {ffn_ratio:g} of {ffn} neurons leaves none",
                          "lower ffn")
    return kept_heads, kept_ffn


def calibration_for(importance: str, calibration: Iterable | None, limit: int | None,
                    task: Task) -> list[tuple[Any, Any]]:
    """The ``(inputs, targets)`` batches an importance needs (none for magnitude)."""
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; known: {', '.join(IMPORTANCES)}")
    if importance == "magnitude":
        return []
    if calibration is None:
        raise ValueError(f"importance '{importance}' needs calibration batches")
    batches = [task.split(batch) for batch in islice(calibration, limit)]
    if not batches:
        raise StageFailed(f"structured_prune/heads: importance '{importance}' got no "
                          "calibration batch", "check the data's calibration split")
    return batches


def scorer_for(model: nn.Module, layers: list[tuple[str, nn.Module]], importance: str,
               batches: list[tuple[Any, Any]], task: Task,
               reference: nn.Module | None) -> tuple[int, tp.importance.Importance]:
    """``(calibration samples used, the torch-pruning importance object)``."""
    if importance == "magnitude":
        return 0, tp.importance.GroupMagnitudeImportance(p=2)
    samples = sum(batch_len(inputs) for inputs, _ in batches)
    if importance in ("activation", "obs"):
        from compressflow_structured.obs_rank import obs_scores

        scoring = contribution_scores if importance == "activation" else obs_scores
        scores = scoring(model, layers, [inputs for inputs, _ in batches], task)
        return samples, ContributionImportance(scores)
    return taylor_gradients(model, batches, task, reference), tp.importance.GroupTaylorImportance()
