"""``structured/drop-layers``: a Hugging Face transformer with fewer layers, no training.

The kept layers stay as they were (their weights, their order); the rest are removed from
the model, so params, size on disk and latency all drop. The usual next stage is
``distill/features`` against the input (or ``distill/logits``), to recover what the dropped
layers did:

    - structured: {method: drop-layers, layers: 3}     # 6 -> 3: keeps 0, 2, 4
    - distill: {method: features, teacher: input, epochs: 5,
                layers: {model.encoder.layer.0: model.encoder.layer.1, ...}}

``keep`` names the layers to keep; ``layers: k`` keeps ``k`` spread evenly from the first
(layer ``i * n // k`` for ``i < k``): every other layer for ``n = 2k``, as DistilBERT
(Sanh et al. 2019) initialises its student "by taking one layer out of two". ``layers``
always keeps the first layer, which reads the embeddings (the others read its output);
``keep: [1, 3, 5]`` keeps the last one instead.

The layer list is found generically (BERT's ``encoder.layer``, Llama's ``model.layers``,
GPT-2's ``transformer.h``...): the one ``nn.ModuleList`` of ``config.num_hidden_layers``
blocks of one class. ``config.num_hidden_layers``, per-layer config lists (``layer_types``)
and every kept module's ``layer_idx`` (key/value caches are indexed by it) follow the new
numbering, so the model saves with ``save_pretrained`` and loads again with ``hf:``,
transformers and sentence-transformers. A real batch then runs through the model inside the
stage: a layer that cannot run in its new place fails the stage there, naming that layer.

Nothing here imports torch or transformers at import time (validation stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, NonNegativeInt, model_validator

from compressflow import ConfigError, Stage, StageFailed, StageParams, StageResult

if TYPE_CHECKING:
    from torch import nn

PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")
"""Config lists with one entry a layer, cut to the kept layers' entries."""

WHERE = "structured/drop-layers"


class DropLayersParams(StageParams):
    """Which layers stay: ``keep`` (their indices) or ``layers`` (how many), exactly one."""

    keep: list[NonNegativeInt] | None = Field(
        None, min_length=1, description="indices of the layers kept, increasing, e.g. [0, 2, 4]")
    layers: int | None = Field(
        None, ge=1, description="keep this many, spread evenly from the first "
        "(layer i * n // layers): 6 -> 3 keeps 0, 2, 4 (DistilBERT's one out of two)")
    refit: bool = Field(
        False, description="BERT-style encoders: afterwards, re-solve each kept layer's two "
        "output projections by least squares on the calibration batches so that it stands in "
        "for the layers up to the next kept one (structured_prune/heads' refit); no training")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.keep is None) == (self.layers is None):
            raise ValueError("give exactly one of keep (layer indices) and layers (how many)")
        if self.keep is not None and any(b <= a for a, b in zip(self.keep, self.keep[1:])):
            raise ValueError(f"keep must be increasing, without repeats (got {self.keep}): "
                             "kept layers stay in their order")
        return self


def spread(total: int, count: int) -> list[int]:
    """``count`` of ``total`` layer indices spread evenly from the first: ``i * total // count``."""
    return [i * total // count for i in range(count)]


@dataclass
class LayerStack:
    """Where a transformers model holds its layers.

    Attributes:
        name: the ModuleList's name in the wrapper (``model.encoder.layer``), as
            ``named_modules()`` and ``distill/features`` name it.
        parent: the module holding it. attribute: its attribute on ``parent``.
        layers: the list itself. config: the transformers config it must agree with.
    """

    name: str
    parent: Any
    attribute: str
    layers: Any
    config: Any


def transformers_model(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` inside an ``hf:`` wrapper (or ``model`` itself, if it is one)."""
    from transformers import PreTrainedModel

    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, PreTrainedModel):
            return candidate
    raise ConfigError(
        f"{WHERE}: the model is a {type(model).__name__}, not a Hugging Face transformers model",
        "load the pipeline's model with hf:<folder> (an HFEncoder or HFCausalLM); for other "
        "models use structured_prune, which removes channels rather than layers")


def find_layers(model: nn.Module) -> LayerStack:
    """The model's layer list: the outermost ModuleList of ``config.num_hidden_layers``
    modules of one class (BERT ``encoder.layer``, Llama ``layers``, GPT-2 ``h``)."""
    from torch import nn

    inner = transformers_model(model)
    count = getattr(inner.config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"{WHERE}: the {type(inner).__name__}'s config has no num_hidden_layers",
                          "drop-layers works on models whose config counts their layers "
                          "(BERT, Llama, GPT-2 and most transformers architectures)")
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == count
             and len({type(child) for child in module}) == 1]
    # a layer's own lists (experts, say) may happen to be as long: the outermost list wins
    found = [(name, m) for name, m in found
             if not any(name.startswith(f"{other}.") for other, _ in found)]
    if len(found) != 1:
        what = ", ".join(name for name, _ in found) or "none"
        raise ConfigError(
            f"{WHERE}: the {type(inner).__name__} has {len(found)} lists of {count} layers "
            f"(config.num_hidden_layers) where one was expected: {what}",
            "drop-layers handles one stack of layers (an encoder or a decoder); an "
            "encoder-decoder model is not supported")
    name, layers = found[0]
    parent_name, _, attribute = name.rpartition(".")
    return LayerStack(name, model.get_submodule(parent_name), attribute, layers, inner.config)


def chosen(params: DropLayersParams, total: int) -> list[int]:
    """The indices kept, checked against the model's ``total`` layers."""
    if params.layers is not None and params.layers > total:
        raise ConfigError(f"{WHERE}: layers: {params.layers}, but the model has {total} layers",
                          f"keep at most {total}")
    keep = params.keep if params.keep is not None else spread(total, params.layers)
    outside = [i for i in keep if i >= total]
    if outside:
        raise ConfigError(f"{WHERE}: keep names layer(s) {outside}, but the model has {total} "
                          f"layers (0 to {total - 1})", "index the layers from 0")
    return list(keep)


def drop_layers(model: nn.Module, keep: list[int]) -> LayerStack:
    """Keep only the layers ``keep`` of ``model`` (in place); returns the new stack.

    The config's layer count and per-layer lists and every kept module's ``layer_idx``
    follow the new numbering.
    """
    from torch import nn

    stack = find_layers(model)
    total = len(stack.layers)
    kept = nn.ModuleList([stack.layers[i] for i in keep])
    setattr(stack.parent, stack.attribute, kept)
    config = stack.config
    for key in PER_LAYER_CONFIG:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    _validate(config, keep)
    for new, layer in enumerate(kept):
        for module in layer.modules():
            index = getattr(module, "layer_idx", None)
            if isinstance(index, int) and not isinstance(index, bool):
                module.layer_idx = new
    return LayerStack(stack.name, stack.parent, stack.attribute, kept, config)


def _validate(config: Any, keep: list[int]) -> None:
    """The config's own checks (transformers 5 runs them on save): a per-layer list this
    module does not know of fails here, at the stage, rather than when the model is saved."""
    check = getattr(config, "validate", None)
    if not callable(check):
        return
    try:
        check()
    except Exception as error:  # transformers raises its own validation error classes
        raise StageFailed(f"{WHERE}: with layers {keep} kept, the {type(config).__name__} "
                          f"no longer validates: {str(error).strip().splitlines()[-1]}",
                          "the config holds per-layer settings drop-layers does not cut "
                          f"(it cuts {', '.join(PER_LAYER_CONFIG)}); report the model") from error


class _Watch:
    """Hooks on the kept layers while a batch runs: which ran, which finished, which gave
    NaN or inf, so that a failure names the layer it happened in."""

    def __init__(self, stack: LayerStack, keep: list[int]) -> None:
        self.stack, self.keep = stack, keep
        self.entered: list[int] = []
        self.finished: list[int] = []
        self.broken: list[int] = []
        self.handles = [h for new, layer in enumerate(stack.layers) for h in self._hook(new, layer)]

    def _hook(self, new: int, layer: nn.Module) -> list[Any]:
        import torch

        def done(_module, _args, output):
            self.finished.append(new)
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, torch.Tensor) and not torch.isfinite(tensor).all():
                self.broken.append(new)
        return [layer.register_forward_pre_hook(lambda *_: self.entered.append(new)),
                layer.register_forward_hook(done)]

    def name(self, new: int) -> str:
        """A kept layer as a message names it: its module name and its index before."""
        return f"{self.stack.name}.{new} (layer {self.keep[new]} before)"

    def where(self) -> str:
        """Where a forward pass that raised stopped."""
        if not self.entered:
            return "before the first kept layer"
        last = self.entered[-1]
        if self.finished and self.finished[-1] == last:
            return f"after {self.name(last)}, outside the layers"
        return f"in {self.name(last)}"

    def verdict(self) -> None:
        """StageFailed unless every kept layer ran and gave finite outputs."""
        skipped = sorted(set(range(len(self.keep))) - set(self.entered))
        if skipped:
            raise StageFailed(
                f"{WHERE}: the forward pass never ran {', '.join(map(self.name, skipped))}",
                "the model does not run the layer list drop-layers found; report the model")
        if self.broken:
            raise StageFailed(f"{WHERE}: {self.name(self.broken[0])} gives NaN or inf on a real "
                              f"batch once layers {self.keep} are kept",
                              "keep other layers (the first one, say)")

    def close(self) -> None:
        """Remove the hooks: the model the stage returns carries none (and pickles)."""
        for handle in self.handles:
            handle.remove()


def check_forward(model: nn.Module, stack: LayerStack, keep: list[int], inputs: Any,
                  task: Any) -> None:
    """Run ``inputs`` through ``model`` by ``task``; StageFailed naming the kept layer that
    broke. Every kept layer must run and give finite outputs."""
    import torch

    watch = _Watch(stack, keep)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            task.predict(model, inputs)
    except Exception as error:
        raise StageFailed(
            f"{WHERE}: after keeping layers {keep}, the forward pass fails {watch.where()}: "
            f"{type(error).__name__}: {error}",
            "this architecture may tie layers to their position beyond layer_idx and "
            "config.num_hidden_layers; try keeping other layers, or report the model") from error
    finally:
        watch.close()
        model.train(was_training)
    watch.verdict()


class DropLayers(Stage):
    """Keep some layers of a Hugging Face transformer and drop the rest (see the module)."""

    kind = "structured"
    method = "drop-layers"
    Params = DropLayersParams

    def run(self, model, ctx):
        """Drop the layers, check a real batch runs, and say which layers stayed."""
        import copy

        total = len(find_layers(model).layers)
        keep = chosen(self.params, total)
        original = None
        if self.params.refit:  # refused before anything changes
            _bert_only(model)
            original = copy.deepcopy(model)
        stack = drop_layers(model, keep)
        example = ctx.data.example_input(2, ctx.task)
        check_forward(model, stack, keep, example, ctx.task)
        notes = [f"{total} -> {len(keep)} layers (kept {', '.join(map(str, keep))})"]
        if len(keep) == total:
            notes.append("every layer kept: nothing dropped")
        metrics = {"layers_kept": len(keep), "layers_dropped": total - len(keep)}
        if original is not None:
            metrics.update(refit_kept(model, original, keep, total, ctx))
            check_forward(model, stack, keep, example, ctx.task)
            notes.append("each kept layer's output projections refitted by least squares "
                         "to stand in for the layers up to the next kept one")
        return StageResult(model, metrics=metrics, notes=notes)


def refit_kept(model: nn.Module, original: nn.Module, keep: list[int], total: int,
               ctx) -> dict[str, float]:
    """The refit of ``refit: true``: kept layer ``keep[i]``'s attention toward its own, its
    FFN toward layer ``keep[i + 1] - 1`` (the last: ``total - 1``). Its mean errors before
    and after, as metrics."""
    from compressflow_structured.refit import error_metrics, refit_outputs

    ends = [*(k - 1 for k in keep[1:]), total - 1]
    batches = [ctx.task.split(batch)[0] for batch in ctx.data.calibration]
    errors = refit_outputs(model, original, batches, ctx.task, sources=list(zip(keep, ends)))
    return error_metrics(errors)


def _bert_only(model: nn.Module) -> None:
    """ConfigError unless ``model``'s layers are BERT-style ones, which refit re-solves."""
    from compressflow_structured.transformer_plan import encoder_layers

    try:
        encoder_layers(model)
    except ConfigError as error:
        raise ConfigError(f"{WHERE}: refit: {error.message}",
                          "refit re-solves BERT-style layers; set refit: false") from None
