"""Attention heads and FFN neurons removed from a BERT-style encoder; the heavy half of
``structured_prune/heads``.

:func:`prune_heads_and_ffn` changes a model in place through torch-pruning's dependency
graph: in every layer the same share of attention heads goes as whole heads (the rows of
query, key and value and the matching columns of ``attention.output.dense``), and the same
share of intermediate neurons (rows of ``intermediate.dense``, columns of ``output.dense``).
Every module whose output is the hidden state (embeddings, both output denses, LayerNorms,
the pooler) is left out of the graph's pruning, so the hidden size, the width users index,
never changes, and the BERT pooler keeps its shapes. Afterwards each attention module's
``num_attention_heads``/``all_head_size`` and the config's ``num_attention_heads``,
``intermediate_size`` and ``head_dim`` say what the weights hold.

What to remove (the layers, the widths a plan keeps, the importance scores) is
:mod:`compressflow_structured.transformer_plan`'s; this module applies it and checks the result.

Reloading: transformers 5.17's ``BertSelfAttention`` derives the head size as
``hidden_size / num_attention_heads`` and reads no ``head_dim``, so the weights of a model
with heads removed do not fit a folder's config. ``HFModel.save_pretrained`` (the ``hf:``
plugin, ``export/hf``) therefore writes the removed heads back as all-zero heads, which add
exactly nothing: the folder reloads with identical embeddings, its FFN still pruned, its
attention at full width again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch_pruning as tp
from torch import nn

from compressflow import ConfigError, StageFailed
from compressflow.task import Task, batch_len
from compressflow_structured.refit import RefitError, refit_outputs
from compressflow_structured.transformer_plan import (
    calibration_for,
    count_params,
    encoder_layers,
    head_size_of,
    layer_parts,
    planned_widths,
    scorer_for,
    transformer_of,
)

HIDDEN_TYPES = (nn.Linear, nn.Embedding, nn.LayerNorm)
HINT_SHAPES = ("the pruned model's shapes do not fit together; this is a bug of "
               "structured_prune/heads for this architecture: try heads: 0 to prune the FFN only")


@dataclass
class LayerWidths:
    """One encoder layer's widths before and after; ``kept_heads`` are original indices."""

    name: str
    heads_before: int
    heads_after: int
    kept_heads: list[int]
    ffn_before: int
    ffn_after: int


@dataclass
class HeadsReport:
    """What :func:`prune_heads_and_ffn` did, layer by layer, and the parameter counts."""

    layers: list[LayerWidths]
    head_size: int
    hidden_size: int
    params_before: int
    params_after: int
    calibration_samples: int = 0
    notes: list[str] = field(default_factory=list)
    refit: list[RefitError] = field(default_factory=list)


# --- pruning -------------------------------------------------------------------------------

# torch-pruning 1.6 removes heads only inside a ranking scope that removes some channels;
# with prune_head_dims off no channel of an attention group goes, so this ratio only opens
# that branch. Every other group is either ignored or has its own ratio (the FFN's).
_OPEN_SCOPE = 0.5


def prune_heads_and_ffn(model: nn.Module, example: Any, *, heads: float, ffn: float,
                        importance: str = "magnitude", calibration: Iterable | None = None,
                        calibration_batches: int | None = None, task: Task | None = None,
                        reference: nn.Module | None = None, refit: bool = False,
                        seed: int = 0) -> HeadsReport:
    """Remove ``heads`` of every layer's attention heads and ``ffn`` of its FFN neurons,
    in place; see the module docstring. Returns what changed, layer by layer.

    :param example: a real batch of inputs (a dict of tensors, 2 rows or more), traced to
        build the dependency graph and run once afterwards to check the pruned model.
    :param importance: magnitude (weights only), activation (each unit's contribution to
        the residual stream on the calibration batches) or taylor (|w * dL/dw|, the
        task's loss on the calibration batches; see :func:`taylor_gradients`).
    :param calibration: the loader of batches for activation/taylor (``task.split`` reads them).
    :param reference: taylor, tasks judging fidelity: the model whose predictions the loss matches.
    :param refit: afterwards, re-solve every layer's output projections by least squares on
        the calibration batches (:func:`compressflow_structured.refit.refit_outputs`).
    """
    from compressflow.task import default_task

    torch.manual_seed(seed)
    task = task or default_task()
    layers = encoder_layers(model)
    model.eval()
    before = _snapshot(model, layers)
    for name, _layer in layers:  # an impossible plan fails before any work
        planned_widths(before["heads"][name], before["ffn"][name], heads, ffn)
    with torch.no_grad():
        expected = task.predict(model, example)
    batches = calibration_for("activation" if refit else importance, calibration,
                              calibration_batches, task)
    original = copy.deepcopy(model) if refit else None
    samples, scorer = scorer_for(model, layers, importance, batches, task, reference)
    pruner = _pruner(model, layers, example, scorer, heads, ffn)
    try:
        pruner.step()
    finally:
        model.zero_grad(set_to_none=True)
    widths = _update_modules(model, layers, before, heads, ffn)
    check_forward(model, example, task, tuple(expected.shape))
    report = HeadsReport(widths, before["head_size"], before["hidden"], before["params"],
                         count_params(model), samples)
    if original is not None:
        report.refit = refit_outputs(model, original, [inputs for inputs, _ in batches], task)
        report.calibration_samples = sum(batch_len(inputs) for inputs, _ in batches)
        check_forward(model, example, task, tuple(expected.shape))
    return report


def _pruner(model: nn.Module, layers: list[tuple[str, nn.Module]], example: Any,
            scorer: tp.importance.Importance, heads: float, ffn: float) -> tp.pruner.BasePruner:
    """A torch-pruning pruner that may only shrink heads and FFN neurons.

    Every Linear, Embedding and LayerNorm but query, key, value and ``intermediate.dense``
    is ignored: a group containing an ignored layer's outputs is never pruned, which keeps
    the hidden size (and the pooler) whole while the output denses still lose the inputs
    that went with removed heads and neurons.
    """
    parts = [layer_parts(layer) for _name, layer in layers]
    roots = {id(p[k]) for p in parts for k in ("query", "key", "value", "ffn_in")}
    ignored = [m for m in model.modules() if isinstance(m, HIDDEN_TYPES) and id(m) not in roots]
    num_heads = {p[k]: int(layer.attention.self.num_attention_heads)
                 for p, (_n, layer) in zip(parts, layers) for k in ("query", "key", "value")}
    pruner = tp.pruner.BasePruner(
        model, example, importance=scorer, pruning_ratio=_OPEN_SCOPE,
        pruning_ratio_dict={p["ffn_in"]: ffn for p in parts}, ignored_layers=ignored,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=heads, root_module_types=[nn.Linear])
    _check_coupling(pruner.DG, layers)
    return pruner


def _check_coupling(graph: tp.DependencyGraph, layers: list[tuple[str, nn.Module]]) -> None:
    """Query, key, value and attention.output.dense must be one group, else heads would be
    chosen per projection; intermediate.dense and output.dense likewise. StageFailed if not."""
    for name, layer in layers:
        parts = layer_parts(layer)
        wanted = {"attention": ("query", "key", "value", "attn_out"), "ffn": ("ffn_in", "ffn_out")}
        for what, members in wanted.items():
            root = parts[members[0]]
            group = graph.get_pruning_group(root, tp.prune_linear_out_channels, idxs=[0])
            coupled = {id(dep.target.module) for dep, _ in group}
            missing = [m for m in members if id(parts[m]) not in coupled]
            if missing:
                raise StageFailed(
                    f"structured_prune/heads: in {name} torch-pruning does not couple "
                    f"{', '.join(missing)} with {members[0]} ({what}): pruning would break them",
                    "the attention implementation may hide the coupling from its tracer")


# --- after pruning -------------------------------------------------------------------------


def _snapshot(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """What the checks after pruning compare with: widths, weights, every other shape."""
    sizes = {head_size_of(layer) for _n, layer in layers}
    if len(sizes) != 1:
        raise ConfigError("structured_prune/heads: the layers' head sizes differ",
                          "it prunes encoders whose layers share one head size")
    parts = {name: layer_parts(layer) for name, layer in layers}
    weights = {name: {k: p[k].weight.detach().clone()
                      for k in ("query", "key", "value", "attn_out")} for name, p in parts.items()}
    pruned = {id(p[k]) for p in parts.values() for k in p}
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, HIDDEN_TYPES) and id(m) not in pruned and m.weight is not None}
    return {"head_size": sizes.pop(), "hidden": int(transformer_of(model).config.hidden_size),
            "weights": weights, "shapes": shapes, "params": count_params(model),
            "heads": {name: int(layer.attention.self.num_attention_heads)
                      for name, layer in layers},
            "ffn": {name: p["ffn_in"].out_features for name, p in parts.items()}}


def _update_modules(model: nn.Module, layers: list[tuple[str, nn.Module]],
                    before: dict[str, Any], heads: float, ffn: float) -> list[LayerWidths]:
    """Check every layer's new shapes against the plan, then make the attention modules
    and the config say what the weights hold; StageFailed naming the layer if not."""
    size, widths = before["head_size"], []
    for name, layer in layers:
        parts = layer_parts(layer)
        n_heads, n_ffn = planned_widths(before["heads"][name], before["ffn"][name], heads, ffn)
        _check_shapes(name, parts, n_heads * size, n_ffn, before["hidden"])
        kept = _same_heads(name, before["weights"][name], parts, size)
        attention = layer.attention.self
        attention.num_attention_heads, attention.all_head_size = n_heads, n_heads * size
        widths.append(LayerWidths(name, before["heads"][name], n_heads, kept,
                                  before["ffn"][name], n_ffn))
    changed = [n for n, m in model.named_modules() if n in before["shapes"]
               and tuple(m.weight.shape) != before["shapes"][n]]
    if changed:
        raise StageFailed(f"structured_prune/heads: {changed[0]} changed shape "
                          f"({len(changed)} layer(s) outside heads and FFN)", HINT_SHAPES)
    if len({(w.heads_after, w.ffn_after) for w in widths}) == 1:
        config = transformer_of(model).config
        config.num_attention_heads = widths[0].heads_after
        config.intermediate_size = widths[0].ffn_after
        config.head_dim = size  # what the weights hold; BERT itself reads hidden/heads
    return widths


def _check_shapes(name: str, parts: dict[str, nn.Linear], attention: int, ffn: int,
                  hidden: int) -> None:
    """Every projection of one layer as wide as the plan says, the hidden size untouched."""
    expected = {"query": (attention, hidden), "key": (attention, hidden),
                "value": (attention, hidden), "attn_out": (hidden, attention),
                "ffn_in": (ffn, hidden), "ffn_out": (hidden, ffn)}
    for part, shape in expected.items():
        found = tuple(parts[part].weight.shape)
        if found != shape:
            raise StageFailed(f"structured_prune/heads: {name} {part} is {found} after pruning, "
                              f"expected {shape}", HINT_SHAPES)


def _same_heads(name: str, original: dict[str, torch.Tensor], parts: dict[str, nn.Linear],
                size: int) -> list[int]:
    """The original indices of the heads kept, the same in query, key, value and the
    output's columns (whole heads, none mixed); StageFailed otherwise."""
    found = {}
    for part, weight in original.items():
        now = parts[part].weight.detach()
        if part == "attn_out":  # a head is a block of input columns there
            weight, now = weight.T, now.T
        blocks = weight.reshape(-1, size * weight.shape[1])
        kept = now.reshape(-1, size * now.shape[1])
        found[part] = [next((j for j in range(len(blocks)) if torch.equal(blocks[j], row)), -1)
                       for row in kept]
    if -1 in found["query"] or len({tuple(v) for v in found.values()}) != 1:
        raise StageFailed(f"structured_prune/heads: {name} kept different heads in query, key, "
                          f"value and output ({found})", HINT_SHAPES)
    return found["query"]


def check_forward(model: nn.Module, example: Any, task: Task, shape: tuple[int, ...]) -> None:
    """Run ``model`` on ``example``: StageFailed naming the encoder layer where it breaks,
    or if the output's shape differs from ``shape`` or holds NaN/inf."""
    where: list[str] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, _a, name=name: where.append(name))
             for name, layer in encoder_layers(model)]
    try:
        with torch.no_grad():
            output = task.predict(model.eval(), example)
    except Exception as error:
        place = where[-1] if where else "the embeddings, before the first layer"
        raise StageFailed(f"structured_prune/heads: the pruned model breaks in {place}: "
                          f"{type(error).__name__}: {error}", HINT_SHAPES) from error
    finally:
        for hook in hooks:
            hook.remove()
    if tuple(output.shape) != shape:
        raise StageFailed(f"structured_prune/heads: the output is {tuple(output.shape)} after "
                          f"pruning, {shape} before", HINT_SHAPES)
    if not torch.isfinite(output).all():
        raise StageFailed("structured_prune/heads: the pruned model outputs NaN or inf",
                          HINT_SHAPES)


# --- the record ----------------------------------------------------------------------------


def layer_table(report: HeadsReport, path) -> Any:
    """A Markdown table, one row a layer: heads (and which were kept) and FFN width."""
    rows = ["| layer | heads | heads kept | ffn |", "|---|---|---|---|"]
    for w in report.layers:
        rows.append(f"| {w.name} | {w.heads_before} -> {w.heads_after} | "
                    f"{', '.join(map(str, w.kept_heads))} | {w.ffn_before} -> {w.ffn_after} |")
    rows.append(f"\nhead size {report.head_size}, hidden size {report.hidden_size} (unchanged); "
                f"params {report.params_before:,} -> {report.params_after:,}")
    if report.refit:
        rows += ["\nLeast-squares refit of the output projections (relative squared error on "
                 f"{report.calibration_samples} calibration samples' tokens):\n",
                 "| layer | part | error as pruned | error refitted |", "|---|---|---|---|"]
        rows += [f"| {e.layer} | {e.part} | {e.before:.4f} | {e.after:.4f} |" for e in report.refit]
    path.write_text("\n".join(rows) + "\n")
    return path
