"""Honest figures about a model: counted, serialized and timed, never assumed.

- params: elements of every weight the model stores, including the packed weights of
  quantized layers (which are not nn.Parameters).
- sparsity: counted zeros over those elements (quantized weights: zeros of the integers).
- size_bytes: length of ``torch.save(model.state_dict())``: a sparse but dense-stored model
  is not smaller, and this says so.
- macs: multiply-accumulates of one sample through Linear and Conv layers (quantized too).
- latency: median wall time of a forward pass after warm-up, torch threads fixed.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Iterator

import torch
from torch import nn


def weight_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored weight and bias as a plain tensor (quantized ones as their integers).

    Quantized layers keep their weights outside ``parameters()``: torch.ao's expose them
    through ``weight()``/``bias()`` methods, and a plugin's packed layer may do the same
    through a ``_packed_params._weight_bias()`` pair.
    """
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            yield prefix + name, param.detach()
        if callable(getattr(type(module), "weight", None)):
            weight, bias = module.weight(), module.bias() if callable(getattr(module, "bias", None)) else None
        elif hasattr(getattr(module, "_packed_params", None), "_weight_bias"):
            weight, bias = module._packed_params._weight_bias()
        else:
            continue
        yield prefix + "weight", _plain(weight)
        if bias is not None:
            yield prefix + "bias", _plain(bias)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.int_repr() if tensor.is_quantized else tensor


def _nonzero(tensor: torch.Tensor) -> int:
    try:
        return int(torch.count_nonzero(tensor))
    except (NotImplementedError, RuntimeError):
        # tensor subclasses (torchao's) may not count; their dequantized values can
        return int(torch.count_nonzero(tensor.dequantize()))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total elements, nonzero elements) over every stored weight."""
    total = nonzero = 0
    for _, tensor in weight_tensors(model):
        total += tensor.numel()
        nonzero += _nonzero(tensor)
    return total, nonzero


def size_bytes(model: nn.Module) -> int:
    """Bytes of the serialized state dict, as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one sample through every Linear and Conv layer."""
    total = 0

    def linear_hook(module: nn.Module, _inputs, output) -> None:
        nonlocal total
        total += output.numel() // output.shape[0] * module.in_features

    def conv_hook(module: nn.Module, _inputs, output) -> None:
        nonlocal total
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        per_output = module.in_channels // module.groups * kernel
        total += output.numel() // output.shape[0] * per_output

    handles = []
    for module in model.modules():
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, nn.modules.conv._ConvNd) or (
            hasattr(module, "kernel_size") and hasattr(module, "in_channels")
        ):
            handles.append(module.register_forward_hook(conv_hook))
    try:
        with torch.inference_mode():
            model.eval()(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total


def latency_ms(model: nn.Module, example: torch.Tensor, *, threads: int, warmup: int,
               repeats: int) -> float:
    """Median milliseconds of one forward pass on ``example``, after ``warmup`` passes."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        timings = []
        with torch.inference_mode():
            for _ in range(warmup):
                model(example)
            for _ in range(repeats):
                start = time.perf_counter()
                model(example)
                timings.append(time.perf_counter() - start)
        return statistics.median(timings) * 1000.0
    finally:
        torch.set_num_threads(previous_threads)


def measure_model(model: nn.Module, example_b1: torch.Tensor, example_b64: torch.Tensor, *,
                  latency: bool = True, threads: int = 1, warmup: int = 5,
                  repeats: int = 30) -> dict[str, float]:
    """Every figure of DESIGN §4 that does not need the task: params, size, macs, latency."""
    total, nonzero = count_params(model)
    figures: dict[str, float] = {
        "params_total": total,
        "params_nonzero": nonzero,
        "sparsity": 1.0 - nonzero / total if total else 0.0,
        "size_bytes": size_bytes(model),
        "macs": count_macs(model, example_b1),
    }
    if latency:
        timing = dict(threads=threads, warmup=warmup, repeats=repeats)
        figures["latency_ms_b1"] = latency_ms(model, example_b1, **timing)
        figures["latency_ms_b64"] = latency_ms(
            model, example_b64, **{**timing, "repeats": max(3, repeats // 3)}
        )
    return figures


# ratio name -> the cost figure it divides: input figure / stage figure
RATIOS = {
    "size_ratio": "size_bytes",
    "params_nonzero_ratio": "params_nonzero",
    "macs_ratio": "macs",
    "latency_b1_speedup": "latency_ms_b1",
    "latency_b64_speedup": "latency_ms_b64",
}


def ratios_to_input(figures: dict[str, float], input_figures: dict[str, float]) -> dict[str, float]:
    """input / stage for every cost figure (above 1: smaller or faster than the input)."""
    out = {}
    for ratio, figure in RATIOS.items():
        if figures.get(figure) and input_figures.get(figure):
            out[ratio] = input_figures[figure] / figures[figure]
    return out
