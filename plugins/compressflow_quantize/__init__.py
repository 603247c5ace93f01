"""Built-in quantization: ``quantize/dynamic-int8``, torch.ao dynamic quantization of Linear
layers (int8 weights, activations quantized on the fly). Its speed is measured, not assumed."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from compressflow import Stage, StageParams, StageResult, hookimpl
from compressflow.training import TrainParams
from compressflow_quantize.kmeans import KMeansQuantize  # light: torch only inside run()


class DynamicInt8(Stage):
    """torch.ao ``quantize_dynamic`` on every Linear layer not excluded (fbgemm on x86), and
    with ``embeddings`` on every Embedding, weight-only."""

    kind = "quantize"
    method = "dynamic-int8"
    default = True

    class Params(StageParams):
        exclude: list[str] = Field(
            default_factory=list,
            description="layer-name patterns kept fp32 (Linear; Embedding too with `embeddings`)")
        embeddings: bool = Field(
            False, description="also quantize nn.Embedding weights to 8 bits per row, weight-only "
            "(torch.ao float_qparams_weight_only_qconfig: torch.ao.nn.quantized.Embedding)")
        per_channel: bool = Field(
            False, description="one Linear weight scale per output row (else one per layer)")

    def run(self, model, ctx):
        from torch import nn

        from compressflow_quantize.dynamic import quantize_dynamic_int8

        float_types = {n: type(m) for n, m in model.named_modules()}
        p = self.params
        quantized, names = quantize_dynamic_int8(model, p.exclude, p.embeddings, p.per_channel)
        tables = sum(float_types[n] is nn.Embedding for n in names)
        note = f"int8 weights in {len(names) - tables} Linear layers" + (
            " (per channel)" if p.per_channel else "")
        if self.params.embeddings:
            note += f" and {tables} Embedding layers (8-bit rows, weight-only)"
        return StageResult(quantized, metrics={"quantized_layers": len(names)}, notes=[note])


# --- fake-quant, static-int8, qat, auto (heavy code in fakequant/static/qat/auto.py) ---------

Bits = Annotated[int, Field(ge=2, le=8)]
Backend = Literal["x86", "fbgemm", "qnnpack"]


class FakeQuant(Stage):
    """N-bit weights (2..8) stored as packed integers plus scales, dequantized to compute."""

    kind = "quantize"
    method = "fake-quant"

    class Params(StageParams):
        bits: Bits = Field(8, description="bits per weight (2..8)")
        layer_bits: dict[str, Bits] = Field(
            default_factory=dict,
            description="bits per layer-name pattern (fnmatch), first match wins: {'layers.0': 8}")
        scheme: Literal["symmetric", "asymmetric"] = Field(
            "symmetric", description="symmetric: zero point fixed at 0; asymmetric: min..max mapped")
        granularity: Literal["per-channel", "per-tensor"] = Field(
            "per-channel", description="one scale per output channel, or one per tensor")
        group_size: int | None = Field(
            None, ge=1, description="per-channel only: one scale per this many consecutive weights "
            "of a channel (W4A16's groups: 64, 128); round-to-nearest, the baseline of GPTQ")
        full_range: bool = Field(
            False, description="symmetric: levels -2^(b-1)..2^(b-1)-1 (int4: -8..7, scale |w|max / "
            "7.5, as compressed-tensors) instead of -7..7")
        scale: Literal["minmax", "mse"] = Field(
            "minmax", description="minmax: the whole range; mse: the clipping of least squared error")
        mse_grid: int = Field(100, ge=2, le=10000, description="clipping factors tried by mse")
        include: list[str] = Field(default_factory=lambda: ["*"], description="layer-name patterns (fnmatch)")
        exclude: list[str] = Field(default_factory=list, description="layer-name patterns kept fp32")

        def spec_for(self, layer: str):
            """The QuantSpec of ``layer``."""
            from fnmatch import fnmatch

            from compressflow_quantize.fakequant import QuantSpec

            bits = next((b for p, b in self.layer_bits.items() if fnmatch(layer, p)), self.bits)
            return QuantSpec(bits=bits, symmetric=self.scheme == "symmetric",
                             per_channel=self.granularity == "per-channel", scale=self.scale,
                             grid=self.mse_grid, group_size=self.group_size,
                             full_range=self.full_range)

        @model_validator(mode="after")
        def _groups_need_channels(self):
            if self.group_size is not None and self.granularity != "per-channel":
                raise ValueError("group_size splits each channel: it needs granularity: per-channel")
            return self

    def run(self, model, ctx):
        from compressflow_quantize import fakequant

        p = self.params
        layers = fakequant.quantizable_layers(model, p.include, p.exclude)
        reports = fakequant.fake_quantize(model, layers, p.spec_for)
        table = ctx.workdir / "fake_quant_layers.md"
        table.write_text(fakequant.layer_table(reports))
        float_bytes = sum(r.float_bytes for r in reports)
        packed = sum(r.packed_bytes for r in reports)
        metrics = {"quantized_layers": len(reports),
                   "weight_mse": sum(r.mse for r in reports) / len(reports),
                   "weight_bytes_ratio": float_bytes / packed}
        bits = sorted({r.bits for r in reports})
        where = f"groups of {p.group_size}" if p.group_size else p.granularity
        notes = [f"{len(reports)} layers hold {'/'.join(map(str, bits))}-bit packed integer weights "
                 f"({p.scheme}, {where}, scale by {p.scale}); they are dequantized to "
                 "fp32 for every forward: smaller on disk, not faster"]
        return StageResult(model, metrics=metrics, artifacts={"fake_quant_layers": table},
                           notes=notes)


class GPTQ(Stage):
    """GPTQ: N-bit group-wise weights that keep each layer's output on calibration data."""

    kind = "quantize"
    method = "gptq"

    class Params(StageParams):
        bits: Bits = Field(4, description="bits per weight (2..8); W4A16 is 4")
        group_size: int | None = Field(
            128, ge=1, description="one scale per this many consecutive weights of a row; must "
            "divide every row (SmolLM2's 576 columns: 64); null: one per row")
        scheme: Literal["symmetric", "asymmetric"] = Field(
            "symmetric", description="symmetric: zero point fixed; asymmetric: min..max mapped")
        full_range: bool = Field(
            True, description="symmetric: levels -2^(b-1)..2^(b-1)-1 (int4: -8..7) with scale "
            "|w|max / 7.5, as llm-compressor and compressed-tensors; false: -7..7")
        act_order: bool = Field(
            True, description="quantize columns by decreasing H_jj (static groups: the stored "
            "layout is unchanged)")
        keep_zeros: bool = Field(True, description="weights already zero (pruned) stay zero")
        block_size: int = Field(128, ge=1, description="columns updated together (lazy batch)")
        damp: float = Field(0.01, gt=0, le=1, description="of mean(diag H), added before inverting")
        include: list[str] = Field(default_factory=lambda: ["*"], description="layer-name patterns (fnmatch)")
        exclude: list[str] = Field(default_factory=list, description="layer-name patterns kept fp32 "
                                   "(an LLM's lm_head, as llm-compressor leaves it)")
        calibration_batches: int = Field(16, ge=1, description="batches of calibration inputs")

    def run(self, model, ctx):
        from compressflow.calibration import calibration_batches
        from compressflow_quantize import fakequant, gptq

        p = self.params
        layers = fakequant.quantizable_layers(model, p.include, p.exclude)
        spec = fakequant.QuantSpec(bits=p.bits, symmetric=p.scheme == "symmetric",
                                   per_channel=True, group_size=p.group_size,
                                   full_range=p.full_range)
        batches = calibration_batches(ctx.data, p.calibration_batches, ctx.seed, ctx.task)
        records = gptq.gptq_quantize(model, layers, lambda name: spec, batches, ctx.task.feed,
                                     act_order=p.act_order, keep_zeros=p.keep_zeros,
                                     block_size=p.block_size, damp=p.damp)
        table = ctx.workdir / "gptq_layers.md"
        table.write_text(gptq.layer_table(records))
        errors = [r["output_error"] for r in records]
        baseline = [r["rtn_error"] for r in records]
        metrics = {"quantized_layers": len(records), "output_error": sum(errors) / len(errors),
                   "output_error_rtn": sum(baseline) / len(baseline)}
        where = f"groups of {p.group_size}" if p.group_size else "per row"
        notes = [f"GPTQ: {len(records)} layers hold {p.bits}-bit weights ({p.scheme}, {where}"
                 f"{', act-order' if p.act_order else ''}); they are dequantized for every forward: "
                 "smaller on disk, not faster"]
        return StageResult(model, metrics=metrics, artifacts={"gptq_layers": table}, notes=notes)


class SmoothQuant(Stage):
    """SmoothQuant through llm-compressor (activation outliers moved into the weights), then
    torch.ao dynamic int8 (W8A8): an hf: causal LM only."""

    kind = "quantize"
    method = "smoothquant"
    tasks = ("causal-lm",)

    class Params(StageParams):
        strength: float = Field(0.8, gt=0, lt=1, description="alpha: how much of the activations' "
                                "range moves into the weights (the paper: 0.5-0.85)")
        quantize: bool = Field(True, description="then torch.ao dynamic int8 of every Linear "
                               "(weights per channel); false: smoothing alone, the same function")
        exclude: list[str] = Field(default_factory=lambda: ["*lm_head"],
                                   description="Linear-name patterns kept fp32 by the int8 step")
        calibration_batches: int = Field(4, ge=1, description="batches whose activation ranges set s")

    def run(self, model, ctx):
        from compressflow.calibration import calibration_batches
        from compressflow_quantize.dynamic import quantize_dynamic_int8
        from compressflow_quantize.smoothquant import smooth

        p = self.params
        batches = calibration_batches(ctx.data, p.calibration_batches, ctx.seed, ctx.task)
        smooth(model, batches, p.strength)
        notes = [f"SmoothQuant (llm-compressor's SmoothQuantModifier, strength {p.strength}) on "
                 f"{sum(len(b[0]['input_ids']) for b in batches)} calibration windows"]
        if not p.quantize:
            return StageResult(model, notes=notes + ["smoothing only: the same function, fp32"])
        quantized, names = quantize_dynamic_int8(model, p.exclude, per_channel=True)
        notes.append(f"then torch.ao dynamic int8 in {len(names)} Linear layers (per channel)")
        return StageResult(quantized, metrics={"quantized_layers": len(names)}, notes=notes)


class StaticInt8(Stage):
    """torch.ao FX static int8: fused Conv/Linear(+BN+ReLU), activations calibrated."""

    kind = "quantize"
    method = "static-int8"

    class Params(StageParams):
        backend: Backend = Field("x86", description="torch.ao quantized engine and its default qconfig")
        exclude: list[str] = Field(default_factory=list, description="module-name patterns kept fp32")
        calibration_batches: int | None = Field(
            None, ge=1, description="calibration batches used (default: all of data.calibration_batches)")

    def run(self, model, ctx):
        from compressflow_quantize.static import quantize_static, quantized_layers

        p = self.params
        data = ctx.data
        quantized, seen = quantize_static(model, data.calibration, data.example_input(2, ctx.task),
                                          p.backend, p.exclude, p.calibration_batches, ctx.task)
        layers = quantized_layers(quantized)
        return StageResult(quantized, metrics={"quantized_layers": len(layers),
                                               "calibration_samples": seen},
                           notes=[f"static int8 ({p.backend}): {len(layers)} Linear/Conv layers, "
                                  f"activation scales calibrated on {seen} samples"])


class QAT(Stage):
    """Quantization-aware training: fake quantization (STE) trained by the shared loop, then int8."""

    kind = "quantize"
    method = "qat"

    class Params(TrainParams):
        epochs: int = Field(3, ge=0, description="QAT epochs over the training split")
        lr: float = Field(1e-4, gt=0, description="learning rate (small: the model is trained)")
        backend: Backend = Field("x86", description="torch.ao quantized engine and its default qconfig")
        exclude: list[str] = Field(default_factory=list, description="module-name patterns kept fp32")
        freeze_after: int | None = Field(
            None, ge=1, description="epochs after which quantization ranges and BatchNorm stats freeze")

    def run(self, model, ctx):
        from compressflow_quantize.qat import quantization_aware_training
        from compressflow_quantize.static import quantized_layers

        p = self.params
        quantized, metrics, notes = quantization_aware_training(
            model, ctx, p, p.backend, p.exclude, p.freeze_after)
        metrics["quantized_layers"] = len(quantized_layers(quantized))
        return StageResult(quantized, metrics=metrics, notes=notes)


class AutoQuantize(Stage):
    """Try the int8 candidates that apply; keep the fastest, measured here, within the drop."""

    kind = "quantize"
    method = "auto"

    class Params(StageParams):
        max_metric_drop: float = Field(
            0.01, ge=0, description="largest drop of the task metric from the input model (0.01 = 1 pt)")
        candidates: list[Literal["dynamic-int8", "static-int8", "torchao-int8-dynamic"]] = Field(
            default_factory=lambda: ["dynamic-int8", "static-int8", "torchao-int8-dynamic"],
            description="int8 candidates tried besides the fp32 input")
        optimize_for: Literal["latency_b1", "latency_b64"] = Field(
            "latency_b1", description="which measured latency decides")
        higher_is_better: bool = Field(True, description="direction of the task metric")
        backend: Backend = Field("x86", description="torch.ao engine of the torch.ao candidates")
        threads: int = Field(1, ge=1, description="torch threads while timing")
        warmup: int = Field(5, ge=0)
        repeats: int = Field(30, ge=3)
        rounds: int = Field(3, ge=1, description="timing turns over all candidates; medians taken")

    def run(self, model, ctx):
        from compressflow_quantize.auto import auto_quantize

        chosen, metrics, artifacts, notes = auto_quantize(model, ctx, self.params)
        return StageResult(chosen, metrics=metrics, artifacts=artifacts, notes=notes)


@hookimpl
def register_stages(registry) -> None:
    """quantize/dynamic-int8."""
    registry.add(DynamicInt8)
    registry.add(KMeansQuantize)  # quantize/kmeans: Deep Compression weight sharing
    registry.add(FakeQuant)  # quantize/fake-quant: packed N-bit integer weights (RTN)
    registry.add(GPTQ)  # quantize/gptq: N-bit weights reconstructing each layer's output
    registry.add(SmoothQuant)  # quantize/smoothquant: llm-compressor's smoothing, then W8A8
    registry.add(StaticInt8)  # quantize/static-int8: torch.ao FX, calibrated
    registry.add(QAT)  # quantize/qat: fake quantization trained, then int8
    registry.add(AutoQuantize)  # quantize/auto: fastest measured int8 within the drop
