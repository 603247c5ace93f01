"""Honest figures about a model: counted, serialized and timed, never assumed.

- params: elements of every weight the model stores, including the packed weights of
  quantized layers (which are not nn.Parameters).
- sparsity: counted zeros over those elements (quantized weights: zeros of the integers).
- size_bytes: length of ``torch.save(model.state_dict())``: a sparse but dense-stored model
  is not smaller, and this says so.
- macs: multiply-accumulates of one sample through Linear and Conv layers (quantized too).

Latency is timed by :mod:`compressflow.timing` (interleaved with the model compared to) and
put together for a stage by :mod:`compressflow.measuring`; docs/architecture.md lists every
figure a stage run holds.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

if TYPE_CHECKING:
    from compressflow.task import Task


def weight_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored weight and bias as a plain tensor (quantized ones as their integers, or
    dequantized where an integer 0 is not the value 0).

    Quantized layers keep their weights outside ``parameters()``: torch.ao's expose them
    through ``weight()``/``bias()`` methods, and a plugin's packed layer may do the same
    through a ``_packed_params._weight_bias()`` pair. A module that runs its weights outside
    torch (an ONNX graph) lists them itself: ``stored_weights()`` yields ``(name, tensor)``.
    """
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if callable(getattr(module, "stored_weights", None)):  # a graph run elsewhere (ONNX)
            yield from ((prefix + name, tensor) for name, tensor in module.stored_weights())
            continue
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
    if not tensor.is_quantized:
        return tensor
    # an integer 0 is a zero weight only where the zero point is 0 (symmetric int8); a
    # quantized Embedding's rows have float zero points, where 0 is the row's minimum
    if tensor.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        zero_at_zero = tensor.q_zero_point() == 0
    else:
        zero_at_zero = not bool(tensor.q_per_channel_zero_points().any())
    return tensor.int_repr() if zero_at_zero else tensor.dequantize()


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


def count_macs(model: nn.Module, example: Any, task: Task | None = None) -> int:
    """Multiply-accumulates of one sample through every Linear and Conv layer.

    ``example`` is a batch of inputs in any form the task feeds (its first sample is used);
    for token inputs a sample is one sequence of the example's length. A model without such
    layers that knows its own count (an ONNX graph) says it: ``model.count_macs(sample)``.
    """
    from compressflow.task import call, take

    if callable(getattr(model, "count_macs", None)):  # a graph without Linear modules (ONNX)
        return int(model.count_macs(take(example, 0, 1)))
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
    feed = task.feed if task is not None else call
    try:
        with torch.inference_mode():
            feed(model.eval(), take(example, 0, 1))
    finally:
        for handle in handles:
            handle.remove()
    return total


def static_figures(model: nn.Module, example_b1: Any, task: Task | None = None) -> dict[str, float]:
    """Params, nonzeros, sparsity, size on disk and MACs: every figure that is not timed."""
    total, nonzero = count_params(model)
    return {
        "params_total": total,
        "params_nonzero": nonzero,
        "sparsity": 1.0 - nonzero / total if total else 0.0,
        "size_bytes": size_bytes(model),
        "macs": count_macs(model, example_b1, task),
    }


# ratio name -> the cost figure it divides: input figure / stage figure (latency speedups
# are not here: they are per-round ratios from one interleaved window, see measuring.py)
RATIOS = {
    "size_ratio": "size_bytes",
    "params_nonzero_ratio": "params_nonzero",
    "macs_ratio": "macs",
}


def ratios_to_input(figures: dict[str, float], input_figures: dict[str, float]) -> dict[str, float]:
    """input / stage for every cost figure (above 1: smaller or faster than the input)."""
    out = {}
    for ratio, figure in RATIOS.items():
        if figures.get(figure) and input_figures.get(figure):
            out[ratio] = input_figures[figure] / figures[figure]
    return out
