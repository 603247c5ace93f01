"""``quantize/fake-quant``: N-bit (2..8) weight quantization stored as packed integers.

Every chosen Linear/Conv layer becomes a :class:`QuantLinear` or :class:`QuantConv` that
holds its weight as unsigned ``bits``-bit codes packed into bytes (two 4-bit codes a byte,
eight 1-bit codes a byte...), one ``scale`` and one ``zero_point`` per tensor or per output
channel, and its bias in fp32. ``forward`` dequantizes the weight and computes in fp32: the
saving is on disk (``size_bytes`` counts the packed bytes), not in time.

The arithmetic (seed 3.2, ``w_q = round(w * Q)`` with ``Q = 1 / scale``):

- symmetric: ``q = clamp(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1)``, zero is exact;
  stored as ``u = q + 2^(b-1)`` (``zero_point = 2^(b-1)``).
- asymmetric: the range ``[min(w, 0), max(w, 0)]`` is mapped onto ``[0, 2^b - 1]``:
  ``u = clamp(round(w / scale) + zero_point, 0, 2^b - 1)``; zero stays exactly zero.
- dequantized: ``w_hat = (u - zero_point) * scale``.
- scale by ``minmax`` (the whole range) or by ``mse``: the range is clipped by the factor
  ``alpha`` in a grid over (0, 1] (1 included, tried first) that minimises the squared error
  ``||w - w_hat||^2`` per tensor or per channel, so it is never worse than min-max.

These modules are plain ``nn.Module`` subclasses: a model holding them pickles, and reloads
from MLflow wherever ``compressflow_quantize`` is importable.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from compressflow import ConfigError
from compressflow_quantize.packing import pack, packed_length, unpack


@dataclass(frozen=True)
class QuantSpec:
    """How one layer's weight is quantized."""

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = True
    scale: str = "minmax"  # or "mse"
    grid: int = 100
    group_size: int | None = None  # per channel: one scale per `group_size` consecutive weights
    full_range: bool = False  # symmetric: levels -2^(b-1)..2^(b-1)-1 as compressed-tensors's

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be 1..8, got {self.bits}")
        if self.symmetric and self.bits < 2:
            raise ValueError("symmetric quantization needs at least 2 bits")
        if self.scale not in ("minmax", "mse"):
            raise ValueError(f"scale must be minmax or mse, got {self.scale}")
        if self.group_size is not None and (self.group_size < 1 or not self.per_channel):
            raise ValueError("group_size needs per-channel scales and a size of 1 or more")


def code_range(bits: int, symmetric: bool, full_range: bool = False) -> tuple[int, int]:
    """The unsigned codes used: symmetric leaves code 0 out so that +-q are both reachable,
    unless ``full_range`` (one more negative level, as compressed-tensors and llm-compressor)."""
    return (1 if symmetric and not full_range else 0), 2**bits - 1


def _rows(weight: torch.Tensor, per_channel: bool, group_size: int | None = None) -> torch.Tensor:
    """The weight as [channels, elements] (one row when per tensor; one row a group of
    ``group_size`` consecutive weights of a channel with groups), in float64."""
    w = weight.detach().double()
    if group_size:
        return w.reshape(-1, group_size)
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def groups_fit(weight_shape: tuple[int, ...], group_size: int | None) -> bool:
    """Whether a channel's weights split into whole groups (always, without groups)."""
    row = 1
    for size in weight_shape[1:]:
        row *= size
    return not group_size or row % group_size == 0


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
            full_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) per row for the float range [lo, hi] (lo <= 0 <= hi). Symmetric:
    the largest magnitude maps to level 2^(b-1)-1, or with ``full_range`` to half the
    levels' span, (2^b - 1) / 2, as compressed-tensors computes it (4 bits: |w|max / 7.5)."""
    if symmetric:
        qmax = (2**bits - 1) / 2 if full_range else 2 ** (bits - 1) - 1
        scale = torch.maximum(-lo, hi) / qmax
        zero_point = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (hi - lo) / (2**bits - 1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(torch.round(-lo / safe), 0, 2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale
    # what the module stores (fp32 scales), so that quantizing here and dequantizing there agree
    return scale.float().double(), zero_point


def quantize_rows(rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                  symmetric: bool, full_range: bool = False) -> torch.Tensor:
    """Unsigned codes ``clamp(round(w / scale) + zero_point)`` (float64, integral)."""
    low, high = code_range(bits, symmetric, full_range)
    return torch.clamp(torch.round(rows / scale[:, None]) + zero_point[:, None], low, high)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(u - zero_point) * scale`` per row."""
    return (codes - zero_point[:, None]) * scale[:, None]


@dataclass
class Quantized:
    """A quantized weight: codes [rows, elements], scale and zero_point per row, the error."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    alpha: torch.Tensor
    squared_error: torch.Tensor  # per row

    @property
    def mse(self) -> float:
        """Mean squared error over every element."""
        return float(self.squared_error.sum() / self.codes.numel())


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize ``weight`` by ``spec``: min-max, or the clipping of least squared error."""
    rows = _rows(weight, spec.per_channel, spec.group_size)
    lo = rows.min(dim=1).values.clamp(max=0)
    hi = rows.max(dim=1).values.clamp(min=0)
    alphas = [1.0]
    if spec.scale == "mse":
        alphas = torch.linspace(1.0, 1.0 / spec.grid, spec.grid, dtype=torch.float64).tolist()
    best: Quantized | None = None
    for alpha in alphas:
        scale, zero_point = qparams(lo * alpha, hi * alpha, spec.bits, spec.symmetric, spec.full_range)
        codes = quantize_rows(rows, scale, zero_point, spec.bits, spec.symmetric, spec.full_range)
        error = (dequantize_rows(codes, scale, zero_point) - rows).pow(2).sum(dim=1)
        if best is None:
            best = Quantized(codes, scale, zero_point, torch.full_like(scale, alpha), error)
            continue
        better = error < best.squared_error  # ties keep the wider (min-max) range
        if bool(better.any()):
            best.codes = torch.where(better[:, None], codes, best.codes)
            best.scale = torch.where(better, scale, best.scale)
            best.zero_point = torch.where(better, zero_point, best.zero_point)
            best.alpha = torch.where(better, torch.full_like(scale, alpha), best.alpha)
            best.squared_error = torch.where(better, error, best.squared_error)
    return best


# --- the modules --------------------------------------------------------------------------


class _IntegerWeights:
    """What :func:`compressflow.measure.weight_tensors` reads from a quantized layer: its
    integer weight (the bias is an nn.Parameter, counted already)."""

    def __init__(self, module: _QuantWeight) -> None:
        self.module = module

    def _weight_bias(self) -> tuple[torch.Tensor, None]:
        return self.module.int_weight(), None


class _QuantWeight(nn.Module):
    """Packed integer weight, scale and zero point per tensor, output channel or group of a
    channel's consecutive weights, fp32 bias."""

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, bits: int, symmetric: bool,
                 per_channel: bool, group_size: int | None = None) -> None:
        super().__init__()
        QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel, group_size=group_size)
        self.weight_shape = tuple(int(s) for s in weight_shape)
        if not groups_fit(self.weight_shape, group_size):
            raise ValueError(f"group_size {group_size} does not divide the {self.numel // self.weight_shape[0]} "
                             f"weights of a channel of a {self.weight_shape} weight")
        self.bits, self.symmetric, self.per_channel = bits, symmetric, per_channel
        self.group_size = group_size
        count = self.numel
        channels = (count // group_size if group_size else
                    self.weight_shape[0] if per_channel else 1)
        self.register_buffer("qweight", torch.zeros(packed_length(count, bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(channels, dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0])) if bias else None

    @property
    def numel(self) -> int:
        """Elements of the (unpacked) weight."""
        count = 1
        for size in self.weight_shape:
            count *= size
        return count

    def set_weight(self, weight: torch.Tensor, spec: QuantSpec) -> Quantized:
        """Quantize a float weight into this module's buffers; returns the quantization."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != {self.weight_shape}")
        done = quantize_weight(weight, spec)
        with torch.no_grad():
            self.qweight.copy_(pack(done.codes.to(torch.uint8), self.bits))
            self.scale.copy_(done.scale.float())
            self.zero_point.copy_(done.zero_point.to(torch.uint8))
        return done

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store codes computed elsewhere (GPTQ's): unsigned ``codes`` of the weight's shape
        (or [channels, elements]), one ``scale`` and ``zero_point`` per channel or group."""
        with torch.no_grad():
            self.qweight.copy_(pack(codes.reshape(-1).to(torch.uint8), self.bits))
            self.scale.copy_(scale.reshape(-1).float())
            self.zero_point.copy_(zero_point.reshape(-1).to(torch.uint8))

    def codes(self) -> torch.Tensor:
        """The unsigned codes as [rows, elements] (uint8)."""
        rows = self.scale.numel()
        return unpack(self.qweight, self.bits, self.numel).view(rows, -1)

    def int_weight(self) -> torch.Tensor:
        """The signed integers ``q = u - zero_point`` (``round(w / scale)``), weight-shaped."""
        q = self.codes().to(torch.int16) - self.zero_point.to(torch.int16)[:, None]
        return q.view(self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """``(u - zero_point) * scale``, in fp32, weight-shaped."""
        codes = self.codes().to(torch.float32)
        weight = (codes - self.zero_point.to(torch.float32)[:, None]) * self.scale[:, None]
        return weight.view(self.weight_shape)

    @property
    def _packed_params(self) -> _IntegerWeights:
        return _IntegerWeights(self)

    def _config(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        where = "per-channel" if self.per_channel else "per-tensor"
        if getattr(self, "group_size", None):
            where = f"group {self.group_size}"
        return f"bits={self.bits}, {kind}, {where}"


class QuantLinear(_QuantWeight):
    """A Linear layer whose weight is stored as packed integers and dequantized to compute."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 symmetric: bool = True, per_channel: bool = True, group_size: int | None = None) -> None:
        super().__init__((out_features, in_features), bias, bits, symmetric, per_channel, group_size)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec) -> tuple[QuantLinear, Quantized]:
        """The quantized copy of ``linear`` and how its weight was quantized."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     bits=spec.bits, symmetric=spec.symmetric, per_channel=spec.per_channel,
                     group_size=spec.group_size)
        done = module.set_weight(linear.weight, spec)
        if linear.bias is not None:
            with torch.no_grad():
                module.bias.copy_(linear.bias)
        return module, done

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._config()}"


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class QuantConv(_QuantWeight):
    """A Conv1d/2d/3d (zero padding) whose weight is packed integers, dequantized to compute."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 stride: tuple[int, ...], padding, dilation: tuple[int, ...], groups: int = 1,
                 bias: bool = True, *, bits: int = 8, symmetric: bool = True,
                 per_channel: bool = True, group_size: int | None = None) -> None:
        kernel_size = tuple(kernel_size)
        super().__init__((out_channels, in_channels // groups, *kernel_size), bias, bits,
                         symmetric, per_channel, group_size)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = kernel_size, tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dims = len(kernel_size)

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvNd, spec: QuantSpec) -> tuple[QuantConv, Quantized]:
        """The quantized copy of ``conv`` and how its weight was quantized."""
        if conv.transposed or conv.padding_mode != "zeros":
            raise ValueError("only plain convolutions with zero padding are supported")
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                     bits=spec.bits, symmetric=spec.symmetric, per_channel=spec.per_channel,
                     group_size=spec.group_size)
        done = module.set_weight(conv.weight, spec)
        if conv.bias is not None:
            with torch.no_grad():
                module.bias.copy_(conv.bias)
        return module, done

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CONV[self.dims](x, self.dequantized_weight(), self.bias, self.stride,
                                self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self._config()}")


# --- the stage's work ---------------------------------------------------------------------


def quantizable_layers(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Module]:
    """Float Linear and plain Conv1d/2d/3d layers matching ``include`` and not ``exclude``."""
    every = {n: m for n, m in model.named_modules()
             if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
             and (isinstance(m, nn.Linear) or m.padding_mode == "zeros")}
    chosen = {n: m for n, m in every.items()
              if any(fnmatch(n, p) for p in include) and not any(fnmatch(n, p) for p in exclude)}
    if not chosen:
        raise ConfigError(
            f"quantize/fake-quant: include {include} / exclude {exclude} match no float Linear "
            "or Conv layer", f"the model's layers: {', '.join(every) or 'none'}")
    return chosen


def check_groups(name: str, layer: nn.Module, group_size: int | None) -> None:
    """A ConfigError naming ``layer`` unless its channels split into whole groups."""
    if not groups_fit(tuple(layer.weight.shape), group_size):
        row = layer.weight[0].numel()
        fits = [g for g in (32, 64, 96, 128, 192, 256) if row % g == 0]
        raise ConfigError(
            f"quantize: group_size {group_size} does not divide the {row} weights of a channel "
            f"of {name}", f"take a group size that divides {row} ({', '.join(map(str, fits)) or 'none of 32..256'}), "
            "or exclude the layer")


@dataclass
class LayerReport:
    """One quantized layer, for the stage's table."""

    name: str
    shape: tuple[int, ...]
    bits: int
    mse: float
    alpha_mean: float
    float_bytes: int
    packed_bytes: int


def fake_quantize(model: nn.Module, layers: dict[str, nn.Module],
                  spec_for) -> list[LayerReport]:
    """Replace every layer of ``layers`` (names in ``model``) by its quantized module."""
    reports = []
    for name, layer in layers.items():
        spec: QuantSpec = spec_for(name)
        check_groups(name, layer, spec.group_size)
        if isinstance(layer, nn.Linear):
            quantized, done = QuantLinear.from_float(layer, spec)
        else:
            quantized, done = QuantConv.from_float(layer, spec)
        quantized.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized)
        reports.append(LayerReport(
            name, tuple(layer.weight.shape), spec.bits, done.mse, float(done.alpha.mean()),
            layer.weight.numel() * layer.weight.element_size(),
            quantized.qweight.numel() + quantized.scale.numel() * 4 + quantized.zero_point.numel()))
    return reports


def layer_table(reports: list[LayerReport]) -> str:
    """A Markdown table, one row a layer."""
    rows = ["| layer | shape | bits | weight mse | mean clip alpha | float bytes | packed bytes |",
            "|---|---|---|---|---|---|---|"]
    for r in reports:
        rows.append(f"| {r.name} | {r.shape} | {r.bits} | {r.mse:.3g} | {r.alpha_mean:.3f} | "
                    f"{r.float_bytes} | {r.packed_bytes} |")
    return "\n".join(rows) + "\n"
