"""ONNX export (torch.onnx), checked and timed with onnxruntime, for inputs of any form.

The graph's inputs are the model's: ``input`` for a model of one tensor, else the names the
task feeds (a tokenizer's ``input_ids``, ``attention_mask``, ...), in the order of the
model's ``forward``. Axis 0 of every input and output is dynamic (``batch``), and axis 1 of
token inputs (2-D integer tensors) too (``sequence``): one file serves every batch size and
every sentence length. All weights sit inside the one ``.onnx`` file.

Exporters: ``dynamo`` (torch.export + onnxscript) for tensor models; for token models the
TorchScript exporter, whose BERT graph onnxruntime runs faster once quantized (measured
here on all-MiniLM-L6-v2: 2.2-2.4x torch vs 1.4-1.9x for the dynamo graph, per-channel
dynamic int8, batch 32). A model may offer ``for_onnx_export()``, a copy better suited to
tracing (the hf: encoders switch to eager attention, whose pattern onnxruntime fuses).

Parity is the largest absolute difference between torch's and onnxruntime's outputs over
the whole validation split. Latency: the onnxruntime session and the torch model are timed
interleaved, round by round, in one window (:func:`compressflow.timing.time_models`), for
batches of 1 and 64 after warm-up, both on ``threads`` threads; ``onnx_latency_ms_b*`` is
onnxruntime's median, ``onnx_speedup_b*`` the median of the per-round ratios torch ms /
onnxruntime ms (above 1: onnxruntime is faster).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from compressflow import DataBundle, StageFailed
from compressflow.timing import Timings, time_models
from compressflow_export.ort_quantize import quiet

Exporter = Literal["auto", "dynamo", "torchscript"]


def quantized_layers(model: nn.Module) -> list[str]:
    """Names (and types) of torch.ao quantized modules, which torch.onnx cannot export."""
    found = []
    for name, module in model.named_modules():
        package = type(module).__module__
        if package.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                               "torch.nn.quantized")) or hasattr(module, "_packed_params"):
            found.append(f"{name or '<root>'} ({type(module).__name__})")
    return found


def input_names(model: nn.Module, example: Any) -> list[str]:
    """The graph's input names: ``input`` for one tensor, else the example's keys in the
    order of the model's ``forward`` (the order positional arguments fill)."""
    if not isinstance(example, Mapping):
        return ["input"]
    order = list(inspect.signature(model.forward).parameters)
    return sorted(example, key=lambda name: order.index(name) if name in order else len(order))


def _dynamic_axes(example: Any, names: list[str]) -> dict[str, dict[int, str]]:
    tensors = example if isinstance(example, Mapping) else {"input": example}
    axes = {}
    for name in names:
        tensor = tensors[name]
        token = tensor.dim() == 2 and not tensor.is_floating_point()
        axes[name] = {0: "batch", 1: "sequence"} if token else {0: "batch"}
    return axes


def export(model: nn.Module, example: Any, path: Path, opset: int | None = None,
           exporter: Exporter = "auto") -> tuple[Path, list[str]]:
    """Write ``model`` as one ONNX file with dynamic batch (and sequence) axes; returns
    ``path`` and the graph's input names."""
    quantized = quantized_layers(model)
    if quantized:
        shown = ", ".join(quantized[:3]) + (", ..." if len(quantized) > 3 else "")
        raise StageFailed(
            f"export/onnx: the model has torch.ao quantized layers ({shown}); torch.onnx "
            "cannot export torch.ao quantized (packed int8) modules",
            "export the float model (put export/onnx before quantize/dynamic-int8), then "
            "quantize the graph with quantize/ort-dynamic or quantize/ort-static")
    tracer = model.for_onnx_export() if hasattr(model, "for_onnx_export") else model
    tracer.eval()
    names = input_names(tracer, example)
    tokens = isinstance(example, Mapping)
    if exporter == "auto":
        exporter = "torchscript" if tokens else "dynamo"
    ordered = {name: example[name] for name in names} if tokens else {"input": example}
    axes = _dynamic_axes(example, names)
    # "torchvision is not installed" and similar notices
    with quiet("torch.onnx", "torch.export", "onnxscript"), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {k: {a: torch.export.Dim(n) for a, n in v.items()} for k, v in axes.items()}
            torch.onnx.export(
                tracer, () if tokens else (example,), str(path), kwargs=ordered if tokens else None,
                dynamo=True, external_data=False, verbose=False, input_names=names,
                output_names=["output"], opset_version=opset,
                dynamic_shapes=dims if tokens else (dims["input"],))
        else:
            torch.onnx.export(
                tracer, tuple(ordered.values()), str(path), dynamo=False, input_names=names,
                output_names=["output"], dynamic_axes={**axes, "output": {0: "batch"}},
                opset_version=opset or 17)
    return path, names


def max_abs_diff(model: nn.Module, onnx_model: nn.Module, loader, task) -> float:
    """Largest |torch - onnxruntime| over every output of ``loader``'s inputs."""
    worst = 0.0
    with torch.inference_mode():
        for batch in loader:
            inputs, _ = task.split(batch)
            ours, theirs = task.predict(model, inputs), task.predict(onnx_model, inputs)
            worst = max(worst, float((ours.float() - theirs.float()).abs().max()))
    return worst


def export_and_check(model: nn.Module, data: DataBundle, path: Path, task, *, opset: int | None,
                     exporter: Exporter, threads: int, warmup: int, repeats: int
                     ) -> tuple[dict[str, float], nn.Module]:
    """Export, then measure parity and latency: the stage's metrics, and the graph as an
    :class:`~compressflow_export.runtime.OnnxModel`."""
    from compressflow_export.runtime import OnnxModel

    example = data.example_input(2, task)
    export(model, example, path, opset, exporter)
    onnx_model = OnnxModel.from_file(path, tokenizer=getattr(model, "tokenizer", None),
                                     unused=list(example) if isinstance(example, Mapping) else [])
    model.eval()
    metrics: dict[str, float] = {
        "onnx_bytes": path.stat().st_size,
        "onnx_max_abs_diff": max_abs_diff(model, onnx_model, data.val, task),
    }
    for batch, rounds in ((1, repeats), (64, max(3, repeats // 3))):
        timings: Timings = time_models({"torch": model, "onnx": onnx_model},
                                       data.example_input(batch, task), task.feed,
                                       rounds=rounds, warmup=warmup, threads=threads)
        metrics[f"onnx_latency_ms_b{batch}"] = timings.spread("onnx").median
        metrics[f"onnx_speedup_b{batch}"] = timings.speedup("torch", "onnx").median
    return metrics, onnx_model
