"""Built-in export stages.

- ``export/packed``: the Deep Compression storage (relative indices, codebook indices,
  Huffman-coded streams; biases and small tensors plainly), see :mod:`compressflow_export.packed`.
  Its ``compressed_bytes`` is the file's size, and the model it passes on is the one rebuilt
  from the file, checked to give bit-identical outputs.
- ``export/onnx`` (default): ``torch.onnx.export`` (the onnxscript exporter) checked against
  onnxruntime: largest output difference and onnxruntime latency. The model passes on unchanged.

The heavy work lives in modules imported inside ``run()``: loading the plugin imports no torch.
Both write where ``filename`` says, which must stay inside the stage's work folder
(:mod:`compressflow_export.workfile`).
"""

from __future__ import annotations

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
    """Where the file goes and how onnxruntime is timed."""

    filename: WorkFile = Field("model.onnx", description="file name in the stage's work folder "
                               "(subfolders allowed; no absolute path, no ..)")
    opset: int | None = Field(None, ge=7, description="ONNX opset (default: the exporter's)")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads")
    warmup: int = Field(5, ge=0)
    repeats: int = Field(30, ge=1)
    tolerance: float | None = Field(
        1e-4, gt=0, description="fail when onnxruntime's outputs differ more (None: only log)")


class OnnxExport(Stage):
    """torch.onnx.export, then onnxruntime: parity with torch and latency; model unchanged."""

    kind = "export"
    method = "onnx"
    default = True
    Params = OnnxParams

    def run(self, model, ctx):
        from compressflow_export.onnx_export import export_and_check

        p = self.params
        path = inside(ctx.workdir, p.filename)
        metrics = export_and_check(model, ctx.data, path, opset=p.opset, threads=p.threads,
                                   warmup=p.warmup, repeats=p.repeats)
        if p.tolerance is not None and metrics["onnx_max_abs_diff"] > p.tolerance:
            raise RuntimeError(f"onnxruntime's outputs differ from torch's by "
                               f"{metrics['onnx_max_abs_diff']:.3g} > tolerance {p.tolerance}")
        return StageResult(model, metrics=metrics, artifacts={"onnx": path},
                           notes=[f"ONNX {metrics['onnx_bytes']:,} bytes, onnxruntime max abs "
                                  f"diff {metrics['onnx_max_abs_diff']:.2g}"])


@hookimpl
def register_stages(registry) -> None:
    """export/packed and export/onnx."""
    registry.add(PackedExport)
    registry.add(OnnxExport)
