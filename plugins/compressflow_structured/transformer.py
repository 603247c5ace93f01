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

Reloading: transformers 5.17's ``BertSelfAttention`` derives the head size as
``hidden_size / num_attention_heads`` and reads no ``head_dim``, so a folder of a model with
heads removed cannot describe its own shapes: ``save_pretrained`` writes it, but
transformers (hence ``hf:`` and sentence-transformers) refuses to load it, raising on the
size mismatch of ``query``/``key``/``value``. :func:`reloadable_copy` gives a copy that
does reload with identical embeddings: the removed heads come back as all-zero heads (a
head whose query, key and value are zero adds exactly nothing), the FFN stays pruned; the
attention's compute is then back to full width. :func:`heads_removed` tells the two apart.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from compressflow import ConfigError, StageFailed
from compressflow.task import Task, batch_len

IMPORTANCES = ("magnitude", "activation", "taylor")
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


# --- finding the layers ---------------------------------------------------------------------


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
            parts = _parts(layer)
        except AttributeError as error:
            raise ConfigError(f"structured_prune/heads: {name} is not a BERT layer ({error})",
                              "it prunes BERT-style encoders (BertLayer and its kin)") from None
        if not all(isinstance(p, nn.Linear) for p in parts.values()):
            raise ConfigError(f"structured_prune/heads: {name} holds non-Linear projections",
                              "prune before quantizing")
        layers.append((name, layer))
    return layers


def _parts(layer: nn.Module) -> dict[str, nn.Module]:
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


# --- importance -----------------------------------------------------------------------------


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
        parts, size = _parts(layer), head_size_of(layer)
        handles.append(parts["attn_out"].register_forward_pre_hook(
            lambda m, a, size=size: attention_hook(m, a, size)))
        handles.append(parts["ffn_out"].register_forward_pre_hook(ffn_hook))
    try:
        with torch.no_grad():
            for inputs in batches:
                state["mask"] = _token_mask(inputs)
                state["tokens"] += float(state["mask"].sum())
                task.feed(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {module: total / max(state["tokens"], 1.0) for module, total in sums.items()}


def _accumulate(sums: dict[nn.Module, torch.Tensor], module: nn.Module,
                value: torch.Tensor) -> None:
    sums[module] = sums[module] + value if module in sums else value


def _token_mask(inputs: Any) -> torch.Tensor:
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


# --- pruning --------------------------------------------------------------------------------

# torch-pruning 1.6 removes heads only inside a ranking scope that removes some channels;
# with prune_head_dims off no channel of an attention group goes, so this ratio only opens
# that branch. Every other group is either ignored or has its own ratio (the FFN's).
_OPEN_SCOPE = 0.5


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


def prune_heads_and_ffn(model: nn.Module, example: Any, *, heads: float, ffn: float,
                        importance: str = "magnitude", calibration: Iterable | None = None,
                        calibration_batches: int | None = None, task: Task | None = None,
                        reference: nn.Module | None = None, seed: int = 0) -> HeadsReport:
    """Remove ``heads`` of every layer's attention heads and ``ffn`` of its FFN neurons,
    in place; see the module docstring. Returns what changed, layer by layer.

    :param example: a real batch of inputs (a dict of tensors, 2 rows or more), traced to
        build the dependency graph and run once afterwards to check the pruned model.
    :param importance: magnitude (weights only), activation (each unit's contribution to
        the residual stream on the calibration batches) or taylor (|w * dL/dw|, the
        task's loss on the calibration batches; see :func:`taylor_gradients`).
    :param calibration: the loader of batches for activation/taylor (``task.split`` reads them).
    :param reference: taylor, tasks judging fidelity: the model whose predictions the loss matches.
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
    batches = _calibration(importance, calibration, calibration_batches, task)
    samples, scorer = _scorer(model, layers, importance, batches, task, reference)
    pruner = _pruner(model, layers, example, scorer, heads, ffn)
    try:
        pruner.step()
    finally:
        model.zero_grad(set_to_none=True)
    widths = _update_modules(model, layers, before, heads, ffn)
    check_forward(model, example, task, tuple(expected.shape))
    return HeadsReport(widths, before["head_size"], before["hidden"], before["params"],
                       count_params(model), samples)


def _calibration(importance: str, calibration: Iterable | None, limit: int | None,
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


def _scorer(model: nn.Module, layers: list[tuple[str, nn.Module]], importance: str,
            batches: list[tuple[Any, Any]], task: Task,
            reference: nn.Module | None) -> tuple[int, tp.importance.Importance]:
    """``(calibration samples used, the torch-pruning importance object)``."""
    if importance == "magnitude":
        return 0, tp.importance.GroupMagnitudeImportance(p=2)
    samples = sum(batch_len(inputs) for inputs, _ in batches)
    if importance == "activation":
        scores = contribution_scores(model, layers, [inputs for inputs, _ in batches], task)
        return samples, ContributionImportance(scores)
    return taylor_gradients(model, batches, task, reference), tp.importance.GroupTaylorImportance()


def _pruner(model: nn.Module, layers: list[tuple[str, nn.Module]], example: Any,
            scorer: tp.importance.Importance, heads: float, ffn: float) -> tp.pruner.BasePruner:
    """A torch-pruning pruner that may only shrink heads and FFN neurons.

    Every Linear, Embedding and LayerNorm but query, key, value and ``intermediate.dense``
    is ignored: a group containing an ignored layer's outputs is never pruned, which keeps
    the hidden size (and the pooler) whole while the output denses still lose the inputs
    that went with removed heads and neurons.
    """
    parts = [_parts(layer) for _name, layer in layers]
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
        parts = _parts(layer)
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


# --- after pruning --------------------------------------------------------------------------


def _snapshot(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """What the checks after pruning compare with: widths, weights, every other shape."""
    sizes = {head_size_of(layer) for _n, layer in layers}
    if len(sizes) != 1:
        raise ConfigError("structured_prune/heads: the layers' head sizes differ",
                          "it prunes encoders whose layers share one head size")
    parts = {name: _parts(layer) for name, layer in layers}
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
        parts = _parts(layer)
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


# --- saving ---------------------------------------------------------------------------------


def heads_removed(model: nn.Module) -> bool:
    """Whether some layer of ``model`` has fewer heads than ``hidden_size / head size``:
    then transformers cannot reload its ``save_pretrained`` folder (module docstring)."""
    hidden = int(transformer_of(model).config.hidden_size)
    return any(_parts(layer)["query"].out_features != hidden for _n, layer in encoder_layers(model))


def reloadable_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``save_pretrained`` folder transformers and
    sentence-transformers load with the same embeddings: every removed head comes back as
    an all-zero head (zero query, key and value weights and biases, zero output columns),
    which adds exactly nothing; the FFN stays pruned. ``model`` itself is not changed.
    """
    padded = copy.deepcopy(model)
    config = transformer_of(padded).config
    hidden, size = int(config.hidden_size), 0
    for _name, layer in encoder_layers(padded):
        parts, size = _parts(layer), head_size_of(layer)
        for key in ("query", "key", "value"):
            setattr(layer.attention.self, key, _padded_rows(parts[key], hidden))
        layer.attention.output.dense = _padded_columns(parts["attn_out"], hidden)
        layer.attention.self.num_attention_heads = hidden // size
        layer.attention.self.all_head_size = hidden
    if size:
        config.num_attention_heads = hidden // size
    return padded


def _padded_rows(layer: nn.Linear, rows: int) -> nn.Linear:
    """``layer`` with zero output rows appended up to ``rows``."""
    grown = nn.Linear(layer.in_features, rows, bias=layer.bias is not None,
                      device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[: layer.out_features] = layer.weight
        if layer.bias is not None:
            grown.bias.zero_()
            grown.bias[: layer.out_features] = layer.bias
    return grown


def _padded_columns(layer: nn.Linear, columns: int) -> nn.Linear:
    """``layer`` with zero input columns appended up to ``columns``."""
    grown = nn.Linear(columns, layer.out_features, bias=layer.bias is not None,
                      device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[:, : layer.in_features] = layer.weight
        if layer.bias is not None:
            grown.bias.copy_(layer.bias)
    return grown


def layer_table(report: HeadsReport, path) -> Any:
    """A Markdown table, one row a layer: heads (and which were kept) and FFN width."""
    rows = ["| layer | heads | heads kept | ffn |", "|---|---|---|---|"]
    for w in report.layers:
        rows.append(f"| {w.name} | {w.heads_before} -> {w.heads_after} | "
                    f"{', '.join(map(str, w.kept_heads))} | {w.ffn_before} -> {w.ffn_after} |")
    rows.append(f"\nhead size {report.head_size}, hidden size {report.hidden_size} (unchanged); "
                f"params {report.params_before:,} -> {report.params_after:,}")
    path.write_text("\n".join(rows) + "\n")
    return path
