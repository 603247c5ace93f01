"""torch.ao dynamic int8 quantization, with its deprecation noise kept out of the user's way."""

from __future__ import annotations

import warnings
from fnmatch import fnmatch

import torch
from torch import nn

from compressflow import ConfigError


def quantize_dynamic_int8(model: nn.Module, exclude: list[str]) -> tuple[nn.Module, list[str]]:
    """The model with int8 dynamic Linear layers, and the names of the layers quantized."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and not any(fnmatch(n, p) for p in exclude)]
    if not names:
        raise ConfigError("quantize/dynamic-int8: the model has no Linear layer to quantize",
                          "dynamic int8 covers nn.Linear only; check `exclude`")
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in engines else "qnnpack"
    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao.quantization deprecated; its kernels still run and are measured
        warnings.simplefilter("ignore")
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        quantized = quantize_dynamic(model.eval(), {n: default_dynamic_qconfig for n in names},
                                     dtype=torch.qint8)
    return quantized, names
