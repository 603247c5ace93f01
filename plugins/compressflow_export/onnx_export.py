"""ONNX export (torch.onnx's onnxscript exporter), checked and timed with onnxruntime.

The exported graph has a dynamic batch axis (input ``input``, output ``output``), all weights
inside the one ``.onnx`` file. Parity is the largest absolute difference between torch's and
onnxruntime's outputs over the whole validation split. Latency: the onnxruntime session and the
torch model are timed interleaved, round by round, in one window
(:func:`compressflow.timing.time_interleaved`), for batches of 1 and 64 after warm-up, both on
``threads`` threads (onnxruntime's intra-op threads, torch's threads); ``onnx_latency_ms_b*`` is
onnxruntime's median, ``onnx_speedup_b*`` the median of the per-round ratios torch ms /
onnxruntime ms (above 1: onnxruntime is faster).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressflow import DataBundle, StageFailed
from compressflow.timing import Timings, time_interleaved


def quantized_layers(model: nn.Module) -> list[str]:
    """Names (and types) of torch.ao quantized modules, which torch.onnx cannot export."""
    found = []
    for name, module in model.named_modules():
        package = type(module).__module__
        if package.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                               "torch.nn.quantized")) or hasattr(module, "_packed_params"):
            found.append(f"{name or '<root>'} ({type(module).__name__})")
    return found


def export(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None = None) -> Path:
    """Write ``model`` as one ONNX file with a dynamic batch axis; returns ``path``."""
    quantized = quantized_layers(model)
    if quantized:
        shown = ", ".join(quantized[:3]) + (", ..." if len(quantized) > 3 else "")
        raise StageFailed(
            f"export/onnx: the model has torch.ao quantized layers ({shown}); torch.onnx "
            "cannot export torch.ao quantized (packed int8) modules",
            "export the float model (put export/onnx before quantize/dynamic-int8), or use "
            "quantize/kmeans + export/packed for a small file")
    model.eval()
    kwargs = {"opset_version": opset} if opset else {}
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)  # "torchvision is not installed" and similar notices
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), **kwargs)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return path


def session(path: Path, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff(model: nn.Module, sess, loader) -> float:
    """Largest |torch - onnxruntime| over every output of ``loader``'s inputs."""
    worst = 0.0
    with torch.inference_mode():
        for inputs, _ in loader:
            ours = model(inputs).numpy()
            theirs = sess.run(None, {"input": inputs.numpy()})[0]
            worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


def time_against_torch(model: nn.Module, sess, example: torch.Tensor, *, threads: int,
                       warmup: int, rounds: int) -> Timings:
    """``torch`` (the model) and ``onnx`` (the session) on ``example``, timed interleaved."""
    feed = {"input": example.numpy()}
    model.eval()
    return time_interleaved({"torch": lambda: model(example), "onnx": lambda: sess.run(None, feed)},
                            rounds=rounds, warmup=warmup, threads=threads)


def export_and_check(model: nn.Module, data: DataBundle, path: Path, *, opset: int | None,
                     threads: int, warmup: int, repeats: int) -> dict[str, float]:
    """Export, then measure parity and latency: the stage's metrics."""
    export(model, data.example_input(2), path, opset)
    sess = session(path, threads)
    metrics: dict[str, float] = {
        "onnx_bytes": path.stat().st_size,
        "onnx_max_abs_diff": max_abs_diff(model, sess, data.val),
    }
    for batch, rounds in ((1, repeats), (64, max(3, repeats // 3))):
        timings = time_against_torch(model, sess, data.example_input(batch), threads=threads,
                                     warmup=warmup, rounds=rounds)
        metrics[f"onnx_latency_ms_b{batch}"] = timings.spread("onnx").median
        metrics[f"onnx_speedup_b{batch}"] = timings.speedup("torch", "onnx").median
    return metrics
