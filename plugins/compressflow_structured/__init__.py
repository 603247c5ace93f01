"""Built-in structural pruning: ``structured_prune/depgraph`` physically removes channels.

Conv filters (output channels) and Linear neurons are removed through torch-pruning's
dependency graph (DepGraph, Fang et al. 2023), so every layer coupled to a removed channel
shrinks with it: the BatchNorm after a conv, the next layer's input channels, and every
branch of a residual add (all convs feeding one add lose the same channels). The result is a
smaller dense model: params, MACs, size on disk and latency all drop, with no sparse kernels
needed. The classifier (the last Linear/Conv the forward pass runs) keeps its outputs unless
``prune_classifier: true``; its inputs shrink with the layer before it.

Importance criteria (which channels go), each scored over a whole coupled group:

- ``magnitude``: L2 norm of the channel's weights (no data).
- ``lamp``: magnitude normalized LAMP-style; it only differs from magnitude when channels of
  different layers compete, i.e. with ``global_pruning: true``.
- ``taylor``: |w * dL/dw| summed, gradients of the cross-entropy over the calibration batches.
- ``hessian``: w^2 * E[g^2] (Optimal Brain Damage with the empirical Fisher as the Hessian's
  diagonal), the expectation taken over per-sample gradients of the calibration batches. We
  accumulate those squared gradients ourselves: torch-pruning 1.6's
  ``GroupHessianImportance.accumulate_grad`` keys its store by parameter but tests membership
  by name, so it keeps only the last sample.
- ``random``: a baseline, to see what the criteria buy.

Since the architecture changed, the model cannot be rebuilt from its zoo name and a state
dict: it is logged to MLflow as a pickled module (``mlflow.pytorch.load_model`` reloads it,
with compressflow's plugins importable), like every stage model.

    - structured_prune: {importance: hessian, ratio: 0.5}
    - finetune: {epochs: 10}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from compressflow import Stage, StageParams, StageResult, hookimpl

GRADIENT_IMPORTANCES = ("taylor", "hessian")

Ratio = Annotated[float, Field(ge=0, lt=1)]


class StructuredParams(StageParams):
    """Which channels to remove, how many, and how to rank them."""

    importance: Literal["magnitude", "taylor", "hessian", "lamp", "random"] = Field(
        "magnitude", description="how channels are ranked; taylor/hessian use calibration data")
    ratio: Ratio = Field(description="share of the channels of every prunable group removed")
    global_pruning: bool = Field(
        False, description="rank channels across all layers at once (layers end up with "
        "different widths) instead of removing `ratio` of each group")
    per_layer: dict[str, Ratio] = Field(
        default_factory=dict, description="layer-name pattern (fnmatch) -> ratio for the "
        "coupled group that layer belongs to, overriding `ratio`")
    iterative_steps: int = Field(
        1, ge=1, description="reach `ratio` in this many steps, re-ranking after each")
    round_to: int | None = Field(
        None, ge=1, description="pruned layers keep a multiple of this many channels")
    ignore: list[str] = Field(
        default_factory=list, description="layer-name patterns (fnmatch) never pruned")
    prune_classifier: bool = Field(
        False, description="also prune the outputs of the last layer (changes the output width)")
    calibration_batches: int | None = Field(
        None, ge=1, description="taylor/hessian: at most this many calibration batches "
        "(default: the whole calibration loader)")


class DepGraphPrune(Stage):
    """Remove channels through torch-pruning's dependency graph (DepGraph)."""

    kind = "structured_prune"
    tasks = ("classification",)  # its importance criteria score the cross-entropy
    method = "depgraph"
    default = True
    Params = StructuredParams

    def run(self, model, ctx):
        from compressflow_structured.depgraph import shape_table, structured_prune

        data = ctx.data
        params = self.params
        report = structured_prune(
            model,
            data.example_input(2),
            importance=params.importance,
            ratio=params.ratio,
            global_pruning=params.global_pruning,
            per_layer=params.per_layer,
            iterative_steps=params.iterative_steps,
            round_to=params.round_to,
            ignore=params.ignore,
            prune_classifier=params.prune_classifier,
            calibration=data.calibration if params.importance in GRADIENT_IMPORTANCES else None,
            calibration_batches=params.calibration_batches,
            seed=ctx.seed,
        )
        table = shape_table(report, ctx.workdir / "structured_layers.md")
        notes = ["architecture changed: the model is logged as a pickled module"]
        if report.channels_after == report.channels_before:
            notes.append("no channel was removed (ratio too small for these widths?)")
        metrics = {"channels_before": report.channels_before,
                   "channels_after": report.channels_after}
        if report.calibration_samples:
            metrics["calibration_samples"] = report.calibration_samples
        return StageResult(model, metrics=metrics, artifacts={"structured_layers": table},
                           notes=notes)


class HeadsParams(StageParams):
    """How many heads and FFN neurons every encoder layer loses, and how they are ranked."""

    heads: Ratio = Field(0.0, description="share of every layer's attention heads removed "
                         "(whole heads; ceil(heads * count) go, the same in every layer)")
    ffn: Ratio = Field(0.0, description="share of every layer's intermediate (FFN) neurons removed")
    importance: Literal["activation", "magnitude", "taylor", "obs"] = Field(
        "activation", description="activation: what each head/neuron adds to the residual "
        "stream on the calibration batches; magnitude: weight norms (no data); taylor: "
        "|w * dL/dw| of the task's loss (vanishes on a model that still equals its reference); "
        "obs: what removing it costs once the rest compensate by least squares (greedy OBS)")
    calibration_batches: int | None = Field(
        None, ge=1, description="activation/taylor/refit: at most this many calibration "
        "batches (default: the whole calibration loader)")
    refit: bool = Field(
        False, description="after removal, re-solve every layer's attention.output.dense and "
        "output.dense by least squares on the calibration batches, layer by layer, toward the "
        "unpruned model's pre-LayerNorm sums (Kwon et al. 2022); no training, no labels")


class HeadsPrune(Stage):
    """Remove whole attention heads and FFN neurons of a BERT-style encoder (the ``hf:``
    source's HFEncoder), the same share in every layer, through torch-pruning's dependency
    graph; the hidden size (the embedding width), the embeddings, LayerNorms and the pooler
    stay as they are. The config's ``num_attention_heads``, ``intermediate_size`` and
    ``head_dim`` follow.

    Reloading: transformers derives BERT's head size as hidden_size / num_attention_heads,
    so a folder with fewer heads would not load; ``HFEncoder.save_pretrained`` (and
    ``export/hf``) write the removed heads back as zero heads, which reloads in transformers
    and sentence-transformers with identical embeddings (attention at full width again
    there, the FFN still pruned). In a pipeline the model is logged as a pickled module,
    which reloads as it is, at its pruned width.

        - structured_prune: {method: heads, heads: 0.5, ffn: 0.5, refit: true}
        - finetune: {epochs: 3, teacher: input}
    """

    kind = "structured_prune"
    method = "heads"
    Params = HeadsParams

    def run(self, model, ctx):
        from compressflow_structured.refit import error_metrics
        from compressflow_structured.transformer import layer_table, prune_heads_and_ffn

        params, data = self.params, ctx.data
        uses_data = params.importance != "magnitude" or params.refit
        report = prune_heads_and_ffn(
            model, data.example_input(8, ctx.task), heads=params.heads, ffn=params.ffn,
            importance=params.importance, calibration=data.calibration if uses_data else None,
            calibration_batches=params.calibration_batches, task=ctx.task,
            reference=ctx.reference() if params.importance == "taylor" else None,
            refit=params.refit, seed=ctx.seed)
        first = report.layers[0]
        notes = [f"heads {first.heads_before} -> {first.heads_after} per layer, intermediate "
                 f"{first.ffn_before} -> {first.ffn_after}, params {report.params_before:,} -> "
                 f"{report.params_after:,}"]
        if first.heads_after < first.heads_before:
            notes.append("a save_pretrained folder (export/hf) writes the removed heads back as "
                         "zero heads, since transformers cannot load fewer; it embeds identically")
        if report.params_after == report.params_before:
            notes.append("nothing was removed (heads and ffn too small for these widths?)")
        metrics = {"heads_per_layer": first.heads_after, "ffn_per_layer": first.ffn_after,
                   "params_removed": report.params_before - report.params_after}
        if report.calibration_samples:
            metrics["calibration_samples"] = report.calibration_samples
        if report.refit:
            metrics.update(error_metrics(report.refit))
        table = layer_table(report, ctx.workdir / "heads_layers.md")
        return StageResult(model, metrics=metrics, artifacts={"heads_layers": table}, notes=notes)


@hookimpl
def register_stages(registry) -> None:
    """structured_prune/depgraph and structured_prune/heads."""
    registry.add(DepGraphPrune)
    registry.add(HeadsPrune)
