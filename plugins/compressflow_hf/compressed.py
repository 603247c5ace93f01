"""``export/compressed-tensors``: a Hugging Face model whose layers hold integer weights
(quantize/gptq's, quantize/rtn's group-wise int4) written as llm-compressor writes it, in the
compressed-tensors format transformers and vLLM load: ``pack-quantized`` int4 (eight codes in
an int32), one scale (and zero point, when asymmetric) per group or channel, and the
``quantization_config`` in ``config.json``.

The codes are not quantized again: each integer layer becomes a plain Linear holding its
dequantized weight, compressed-tensors is told the layer's own scales and zero points, and
its compressor packs ``round(w / scale)``, which gives the same codes back. The folder is
then loaded with transformers (``from_pretrained``, which decompresses it) and compared with
the model on a validation batch; with ``evaluate`` the reloaded model is scored on the
evaluation split too, its figures logged as ``reloaded_<metric>`` beside the model's. The
model passes on unchanged; ``folder_bytes`` is the folder on disk.

Sparsity is not encoded: compressed-tensors 0.19 (what llm-compressor 0.14 needs) has no
sparse compressor left (its ``sparse-bitmask`` and ``sparse-24-bitmask`` formats are read as
"legacy" and were removed after 0.14), so a pruned model's zeros are stored as codes like any
other; the stage's notes say so with the model's counted zeros.

    - quantize: {method: gptq, bits: 4, group_size: 64, full_range: true}
    - export: {method: compressed-tensors}

compressed-tensors comes with the ``llm`` extra; it is imported only when the stage runs.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field

from compressflow import ConfigError, Stage, StageResult
from compressflow_hf.export import HFExportParams, checked_reload, folder_bytes, inside

WHERE = "export/compressed-tensors"


class CompressedTensorsParams(HFExportParams):
    """Where the folder goes and how the reloaded folder is checked."""

    evaluate: bool = Field(
        True, description="score the reloaded folder on the evaluation split too, logged as "
        "reloaded_<metric> (perplexity, say) beside the model's own figures")


def integer_layers(model) -> dict[str, Any]:
    """The layers holding integer weights, by name: modules with ``int_weight()`` (signed
    codes), ``scale``, ``zero_point``, ``bits``, ``symmetric``, ``per_channel`` and
    ``group_size`` (compressflow_quantize's QuantLinear and QuantConv)."""
    return {name: module for name, module in model.named_modules()
            if callable(getattr(module, "int_weight", None)) and hasattr(module, "scale")}


def quantization_args(layer) -> Any:
    """compressed-tensors' description of ``layer``'s grid: int, its bits and symmetry, one
    scale per group, channel or tensor."""
    from compressed_tensors.quantization import QuantizationArgs

    if layer.group_size:
        where = {"strategy": "group", "group_size": int(layer.group_size)}
    else:
        where = {"strategy": "channel" if layer.per_channel else "tensor"}
    return QuantizationArgs(num_bits=int(layer.bits), type="int",
                            symmetric=bool(layer.symmetric), **where)


def plain_copy(model, layers: dict[str, Any]):
    """A copy of the transformers ``model`` whose integer layers are Linear layers holding
    the dequantized weights; a ConfigError names a layer that is not a Linear one."""
    import torch

    plain = copy.deepcopy(model)
    for name, layer in layers.items():
        if not hasattr(layer, "in_features"):
            raise ConfigError(f"{WHERE}: layer '{name}' is a quantized {type(layer).__name__}; "
                              "compressed-tensors packs Linear layers only",
                              "quantize only the Linear layers (include: ['*.layers.*'])")
        linear = torch.nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        plain.set_submodule(name, linear)
    return plain


def write(model, folder: Path) -> str:
    """Write the HF ``model`` (an HFModel) into ``folder`` as compressed-tensors; returns the
    format compressed-tensors chose (``pack-quantized``, or ``dense`` with no integer layer)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)

    from compressflow_hf.model import quiet

    layers = integer_layers(model.model)
    plain = plain_copy(model.model, layers)
    groups: dict[str, list[str]] = {}
    args = {}
    for name, layer in layers.items():
        described = quantization_args(layer)
        key = described.model_dump_json()
        groups.setdefault(key, []).append(name)
        args[key] = described
    config = QuantizationConfig(
        config_groups={f"group_{i}": QuantizationScheme(targets=names, weights=args[key])
                       for i, (key, names) in enumerate(groups.items())},
        quantization_status=QuantizationStatus.INITIALIZED) if layers else None
    with quiet(), _no_bars():
        if config is not None:
            apply_quantization_config(plain, config, show_progress=False)
            with torch.no_grad():
                for name, layer in layers.items():
                    _set_grid(plain.get_submodule(name), layer)
        compressor = ModelCompressor.from_pretrained_model(plain)
        if config is not None:
            compressor.compress_model(plain)
        plain.save_pretrained(folder)
        compressor.update_config(str(folder))
        model.tokenizer.save_pretrained(folder)
    found = compressor.quantization_config
    return str(getattr(found.format, "value", found.format)) if found is not None else "dense"


def _set_grid(target, layer) -> None:
    """The layer's own scales (and zero points, shifted to compressed-tensors' signed codes)
    on the module compressed-tensors prepared."""
    target.weight_scale.copy_(layer.scale.reshape(target.weight_scale.shape))
    if not layer.symmetric:
        signed = layer.zero_point.to(target.weight_zero_point.dtype) - 2 ** (int(layer.bits) - 1)
        target.weight_zero_point.copy_(signed.reshape(target.weight_zero_point.shape))


@contextlib.contextmanager
def _no_bars() -> Iterator[None]:
    """compressed-tensors' per-module progress bars off (tqdm reads TQDM_DISABLE)."""
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


class CompressedTensorsExport(Stage):
    """Write the model as llm-compressor does (compressed-tensors, packed int4), load it back
    with transformers and compare; the folder is the ``model`` artifact, the model passes on
    unchanged."""

    kind = "export"
    method = "compressed-tensors"
    Params = CompressedTensorsParams

    def run(self, model, ctx):
        """Write, reload, compare and score the reloaded folder."""
        import importlib.util

        from compressflow.measure import count_params
        from compressflow_hf.model import HFModel

        if not isinstance(model, HFModel):
            raise ConfigError(f"{WHERE}: the model is a {type(model).__name__}, not a Hugging "
                              "Face model of the hf: source", "load the model with source: hf:...")
        if importlib.util.find_spec("compressed_tensors") is None:
            raise ConfigError(f"{WHERE}: compressed-tensors is not installed",
                              "pip install 'compressflow[llm]'")
        p = self.params
        folder = inside(ctx.workdir, p.folder)
        found = write(model, folder)
        size = folder_bytes(folder)
        metrics = {"folder_bytes": float(size), "integer_layers": float(len(integer_layers(model)))}
        total, nonzero = count_params(model)
        notes = [f"compressed-tensors folder, format {found}: {size:,} bytes",
                 f"{1 - nonzero / max(total, 1):.1%} of the weights are zeros, stored as codes like any "
                 "other: compressed-tensors 0.19 has no sparse format"]
        if p.tolerance is not None:
            self._check(model, folder, ctx, metrics)
        return StageResult(model, metrics=metrics, artifacts={"model": folder}, notes=notes)

    def _check(self, model, folder: Path, ctx, metrics: dict[str, float]) -> None:
        """Reload with transformers: the outputs on a validation batch, then (``evaluate``)
        the reloaded model's figures; StageFailed where the outputs differ."""
        metrics["reload_max_abs_diff"], reloaded = checked_reload(
            model, folder, ctx, self.params.tolerance, WHERE)
        if self.params.evaluate:
            metrics.update({f"reloaded_{k}": v for k, v in ctx.evaluate(reloaded).items()})
