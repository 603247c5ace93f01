"""Built-in export stages.

- ``export/packed``: the Deep Compression storage (relative indices, codebook indices,
  Huffman-coded streams; biases and small tensors plainly), see :mod:`compressflow_export.packed`.
  Its ``compressed_bytes`` is the file's size, and the model it passes on is the one rebuilt
  from the file, checked to give bit-identical outputs.
- ``export/onnx`` (default): ``torch.onnx.export`` checked against onnxruntime: largest
  output difference and onnxruntime latency. The torch model passes on unchanged, or, with
  ``pass_on: onnxruntime``, the graph as an :class:`~compressflow_export.runtime.OnnxModel`.
- ``quantize/ort-dynamic`` and ``quantize/ort-static``: onnxruntime's int8 quantization of
  that graph (:mod:`compressflow_export.ort_quantize`); each passes on the quantized graph and
  keeps it, with the tokenizer, as the ``onnx`` artifact folder onnxruntime users load.

The heavy work lives in modules imported inside ``run()``: loading the plugin imports no torch.
Both write where ``filename`` says, which must stay inside the stage's work folder
(:mod:`compressflow_export.workfile`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from compressflow import Stage, StageParams, StageResult, hookimpl
from compressflow_export.workfile import WorkFile, inside


class PackedParams(StageParams):
    """What the packed writer may use; every option is lossless."""

    filename: WorkFile = Field("model.cfpk", description="file name in the stage's work folder "
                               "(subfolders allowed; no absolute path, no ..)")
    huffman: bool = Field(True, description="Huffman-code index and value streams where smaller")
    codebook: bool = Field(True, description="values as indices into a codebook of a tensor's "
                           "distinct values (at most max_codebook of them)")
    max_codebook: int = Field(256, ge=2, le=2**15, description="largest codebook used")
    index_bits: Annotated[int, Field(ge=2, le=8)] | Literal["auto"] = Field(
        "auto", description="bits of a relative-index gap (2..8), or auto: smallest per tensor")
    fp16: bool = Field(True, description="store floats in fp16 where every value survives exactly")

    def options(self):
        """The writer's options."""
        from compressflow_export.packed import PackOptions

        return PackOptions(codebook=self.codebook, huffman=self.huffman, fp16=self.fp16,
                           max_codebook=self.max_codebook,
                           index_bits=None if self.index_bits == "auto" else self.index_bits)


class PackedExport(Stage):
    """Write the Deep Compression file; pass on the model rebuilt from it (bit-identical)."""

    kind = "export"
    method = "packed"
    Params = PackedParams

    def run(self, model, ctx):
        from compressflow_export.packed import load_packed, save_packed, verify_same

        path = inside(ctx.workdir, self.params.filename)
        report = save_packed(model, path, self.params.options())
        rebuilt = load_packed(path, like=model)
        verify_same(model, rebuilt, ctx.data.val, ctx.task)
        table = ctx.workdir / "packed_layout.md"  # tensor by tensor: encoding, bits, bytes
        table.write_text(report.table())
        packed = path.stat().st_size
        metrics = {f"packed_{part}_bytes": size for part, size in report.parts.items()}
        return StageResult(rebuilt, metrics=metrics, artifacts={"packed": path, "packed_layout": table},
                           packed_bytes=packed,
                           notes=[f"packed file {packed:,} bytes; the model "
                                  "passed on is rebuilt from it (outputs bit-identical)"])


class OnnxParams(StageParams):
    """Where the file goes, how it is traced, what passes on, and how onnxruntime is timed."""

    filename: WorkFile = Field("model.onnx", description="file name in the stage's work folder "
                               "(subfolders allowed; no absolute path, no ..)")
    opset: int | None = Field(None, ge=7, description="ONNX opset (default: the exporter's)")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto", description="torch.onnx's exporter; auto: dynamo for tensor inputs, "
        "torchscript for token inputs (onnxruntime fuses its BERT graph)")
    pass_on: Literal["torch", "onnxruntime"] = Field(
        "torch", description="the model later stages get: the torch model unchanged, or the "
        "exported graph run by onnxruntime (then measured, quantized and logged as ONNX)")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads")
    warmup: int = Field(5, ge=0)
    repeats: int = Field(30, ge=1)
    tolerance: float | None = Field(
        1e-4, gt=0, description="fail when onnxruntime's outputs differ more (None: only log)")


class OnnxExport(Stage):
    """torch.onnx.export, then onnxruntime: parity with torch and latency; passes on the
    torch model, or the graph (``pass_on: onnxruntime``)."""

    kind = "export"
    method = "onnx"
    default = True
    Params = OnnxParams

    def run(self, model, ctx):
        from compressflow_export.onnx_export import export_and_check

        p = self.params
        path = inside(ctx.workdir, p.filename)
        metrics, graph = export_and_check(model, ctx.data, path, ctx.task, opset=p.opset,
                                          exporter=p.exporter, threads=p.threads,
                                          warmup=p.warmup, repeats=p.repeats)
        if p.tolerance is not None and metrics["onnx_max_abs_diff"] > p.tolerance:
            raise RuntimeError(f"onnxruntime's outputs differ from torch's by "
                               f"{metrics['onnx_max_abs_diff']:.3g} > tolerance {p.tolerance}")
        note = f"ONNX {metrics['onnx_bytes']:,} bytes, onnxruntime max abs diff {metrics['onnx_max_abs_diff']:.2g}"
        if p.pass_on == "onnxruntime":
            return StageResult(graph, metrics=metrics, artifacts={"onnx": graph.save(ctx.workdir / "onnx")},
                               notes=[note + "; onnxruntime runs the model from here"])
        return StageResult(model, metrics=metrics, artifacts={"onnx": path}, notes=[note])


Ops = list[Annotated[str, Field(pattern=r"^[A-Za-z]\w*$")]]


class OrtDynamicParams(StageParams):
    """onnxruntime.quantization.quantize_dynamic's settings."""

    per_channel: bool = Field(True, description="one scale per output channel (else per tensor)")
    weights: Literal["int8", "uint8"] = Field("int8", description="the weights' integer type")
    op_types: Ops = Field(["MatMul", "Gather", "Conv"], description="ONNX op types to quantize "
                          "(Gather: embedding tables); empty: onnxruntime's default set")
    exclude: list[str] = Field([], description="ONNX node names to keep in float")


class _OrtQuantize(Stage):
    """Base of the onnxruntime stages: the graph in, a quantized graph out, saved where
    onnxruntime users load it; a subclass writes :meth:`quantize`."""

    kind = "quantize"

    def quantize(self, model, source: Path, target: Path, ctx) -> str:
        """Write the quantized ``source`` graph to ``target``; returns what the note says."""
        raise NotImplementedError

    def run(self, model, ctx):
        from compressflow_export.ort_quantize import require_onnx
        from compressflow_export.runtime import OnnxModel

        require_onnx(model, f"{self.kind}/{self.method}")
        source, target = ctx.workdir / "float.onnx", ctx.workdir / "model.onnx"
        source.write_bytes(model.graph_bytes())
        what = self.quantize(model, source, target, ctx)
        source.unlink()
        quantized = OnnxModel.from_file(target, tokenizer=model.tokenizer, unused=model.unused)
        return StageResult(quantized, artifacts={"onnx": quantized.save(ctx.workdir / "onnx")},
                           notes=[f"onnxruntime {what}: {target.stat().st_size:,} bytes"])


class OrtDynamic(_OrtQuantize):
    """Dynamic int8 of an exported graph by onnxruntime: int8 weights (token embedding
    included), activations quantized per batch."""

    method = "ort-dynamic"
    Params = OrtDynamicParams

    def quantize(self, model, source, target, ctx) -> str:
        from compressflow_export.ort_quantize import quantize_dynamic

        p = self.params
        quantize_dynamic(source, target, per_channel=p.per_channel, weights=p.weights,
                         op_types=p.op_types, exclude=p.exclude)
        return (f"dynamic {p.weights} ({'per channel' if p.per_channel else 'per tensor'}) of "
                f"{', '.join(p.op_types) or 'the default ops'}")


class OrtStaticParams(StageParams):
    """onnxruntime.quantization.quantize_static's settings (QDQ, int8)."""

    per_channel: bool = Field(True, description="one weight scale per output channel")
    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are calibrated")
    calibration_batches: int = Field(16, ge=1, description="training batches to calibrate on")
    activations: Literal["uint8", "int8"] = Field(
        "uint8", description="the activations' integer type (uint8: onnxruntime's faster "
        "u8s8 kernels; on all-MiniLM-L6-v2 2.4x torch vs 1.1x for int8)")
    op_types: Ops = Field(["MatMul", "Gemm", "Conv"], description="ONNX op types to quantize; empty: "
                          "onnxruntime's default set (on BERT: far lower cosine, and slower)")
    exclude: list[str] = Field([], description="ONNX node names to keep in float")


class OrtStatic(_OrtQuantize):
    """Static int8 of an exported graph by onnxruntime, activation ranges calibrated on
    the training split."""

    method = "ort-static"
    Params = OrtStaticParams

    def quantize(self, model, source, target, ctx) -> str:
        from compressflow_export.ort_quantize import Calibration, quantize_static

        p = self.params
        calibration = Calibration(ctx.data.train, ctx.task, model.input_names, p.calibration_batches,
                                  same_length=p.method != "minmax")
        quantize_static(source, target, calibration, per_channel=p.per_channel, method=p.method,
                        activations=p.activations, op_types=p.op_types, exclude=p.exclude)
        return (f"static int8 (QDQ, {p.activations} activations, {p.method} over "
                f"{p.calibration_batches} batches) of "
                f"{', '.join(p.op_types) or 'the default ops'}")


@hookimpl
def register_stages(registry) -> None:
    """export/packed, export/onnx, quantize/ort-dynamic and quantize/ort-static."""
    for stage in (PackedExport, OnnxExport, OrtDynamic, OrtStatic):
        registry.add(stage)
