"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023): N-bit weights chosen to keep each
layer's output on its calibration inputs.

For one layer with weight W [rows, columns] and H = X X^T / samples of its inputs, columns
are quantized one at a time (left to right, or by decreasing H_jj with act-order), and each
column's rounding error, divided by the damped inverse Hessian's Cholesky diagonal, is spread
over the columns not yet quantized (at once inside a block of ``block_size`` columns, once
per block beyond it: the lazy batch updates). The scales are *static groups* (AutoGPTQ's
``static_groups``, llm-compressor's ``actorder: weight``): one scale and zero point per
``group_size`` consecutive weights of a row, computed from the weights before any update, so
act-order changes only the order of processing, never the stored layout, which stays that
of plain group-wise quantization (no ``g_idx``).

Codes follow :mod:`compressflow_quantize.fakequant` (symmetric: levels -(2^(b-1)-1)..
2^(b-1)-1 around zero point 2^(b-1), or with ``full_range`` -2^(b-1)..2^(b-1)-1 and scale
|w|max / ((2^b - 1) / 2) as compressed-tensors writes int4; asymmetric: 0..2^b-1), so the
result is stored in a
:class:`~compressflow_quantize.fakequant.QuantLinear` like any fake-quant layer, and the
round-to-nearest baseline is ``quantize/fake-quant`` with the same ``group_size``.

Weights already exactly zero (a pruned model) stay zero with ``keep_zeros``: their code is
the zero point, and no update reaches them.
"""

from __future__ import annotations

import torch

from compressflow import calibration
from compressflow_quantize.fakequant import (Quantized, QuantSpec, code_range, dequantize_rows,
                                             quantize_weight)

BLOCK_SIZE = 128


def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, act_order: bool = True,
         keep_zeros: bool = True, block_size: int = BLOCK_SIZE, damp: float = calibration.DAMP,
         grid: Quantized | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point)`` of ``weight`` [rows, columns]: unsigned codes (float,
    integral) in the weight's column order, scale and zero point [rows, groups]. ``grid``:
    the round-to-nearest :func:`quantize_weight` of ``weight`` by ``spec``, whose scales GPTQ
    keeps (the static groups), where already computed."""
    rows, columns = weight.shape
    group = spec.group_size or columns
    grid = grid or quantize_weight(weight, spec)
    scale, zero_point = grid.scale.view(rows, -1), grid.zero_point.view(rows, -1)
    low, high = code_range(spec.bits, spec.symmetric, spec.full_range)
    order = (torch.argsort(torch.diag(hessian), descending=True, stable=True) if act_order
             else torch.arange(columns))
    Hinv, dead = calibration.inverse_factor(hessian.double()[order][:, order], damp)
    W = weight.detach().float()[:, order].clone()
    W[:, dead] = 0  # inputs that are always zero: their weights do nothing
    keep = (W != 0) if keep_zeros and bool((weight == 0).any()) else None
    Hinv = Hinv.float()
    S, Z = scale.float(), zero_point.float()
    group_of = order // group
    codes = torch.empty_like(W)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            s, z = S[:, g], Z[:, g]
            code = torch.clamp(torch.round(W1[:, i] / s) + z, low, high)
            if keep is not None:
                code = torch.where(keep[:, i1 + i], code, z)
            codes[:, i1 + i] = code
            err = (W1[:, i] - (code - z) * s) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            if keep is not None:
                W1[:, i:].mul_(keep[:, i1 + i:i2])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if keep is not None:
            W[:, i2:].mul_(keep[:, i2:])
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored, scale, zero_point


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(codes - zero_point) * scale`` with each group's parameters, [rows, columns]."""
    group = codes.shape[1] // scale.shape[1]
    return dequantize_rows(codes.reshape(-1, group).float(), scale.reshape(-1).float(),
                           zero_point.reshape(-1).float()).view(codes.shape)


def output_error(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2 from H = X X^T (:func:`compressflow.calibration.output_errors`)."""
    return calibration.output_errors(weight, [new], hessian)[0]


def gptq_quantize(model, layers: dict, spec_for, batches, feed, *, act_order: bool,
                  keep_zeros: bool, block_size: int, damp: float) -> list[dict]:
    """Quantize ``layers`` of ``model`` with :func:`gptq`, each on its true calibration inputs
    (:func:`compressflow.calibration.layer_hessians`: block by block in a transformer), and
    put a :class:`QuantLinear` holding the codes in each one's place. Returns one record a
    layer: name, shape, bits, ``output_error`` and round-to-nearest's ``rtn_error`` (the same
    groups, the same inputs)."""
    from compressflow_quantize.fakequant import QuantLinear, check_groups

    records = []
    for hessians in calibration.layer_hessians(model, layers, batches, feed):
        for name, hessian in hessians.items():
            layer = layers[name]
            if not isinstance(layer, torch.nn.Linear):
                raise ValueError(f"quantize/gptq handles Linear layers, not {name} "
                                 f"({type(layer).__name__}): exclude it")
            spec = spec_for(name)
            check_groups(name, layer, spec.group_size)
            weight = layer.weight.detach()
            rtn = quantize_weight(weight, spec)  # GPTQ's grid, and the baseline it is judged by
            codes, scale, zero_point = gptq(weight, hessian, spec, act_order=act_order,
                                            keep_zeros=keep_zeros, block_size=block_size, damp=damp,
                                            grid=rtn)
            rtn_weight = dequantize_rows(rtn.codes, rtn.scale, rtn.zero_point).view(weight.shape)
            module = QuantLinear(layer.in_features, layer.out_features, layer.bias is not None,
                                 bits=spec.bits, symmetric=spec.symmetric, per_channel=True,
                                 group_size=spec.group_size)
            module.set_codes(codes, scale, zero_point)
            if layer.bias is not None:
                with torch.no_grad():
                    module.bias.copy_(layer.bias)
            module.train(layer.training)
            error, rtn_error = calibration.output_errors(
                weight, [module.dequantized_weight(), rtn_weight], hessian)
            records.append({"name": name, "shape": tuple(weight.shape), "bits": spec.bits,
                            "output_error": error, "rtn_error": rtn_error})
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return records


def layer_table(records: list[dict]) -> str:
    """A Markdown table of :func:`gptq_quantize`'s records, one row a layer."""
    rows = ["| layer | shape | bits | output error | round-to-nearest's | ratio |", "|---|---|---|---|---|---|"]
    for r in records:
        ratio = f"{r['output_error'] / r['rtn_error']:.3f}" if r["rtn_error"] else ""
        rows.append(f"| {r['name']} | {r['shape']} | {r['bits']} | {r['output_error']:.4g} | "
                    f"{r['rtn_error']:.4g} | {ratio} |")
    return "\n".join(rows) + "\n"
