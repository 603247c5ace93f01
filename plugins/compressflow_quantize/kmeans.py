"""``quantize/kmeans``: Deep Compression weight sharing (Han et al. 2016, section 3).

Per chosen Linear/Conv layer, the nonzero weights are clustered into a codebook of at most
``2**bits`` centroids (linear initialisation over [min, max], then Lloyd iterations); every
weight becomes its centroid and zeros stay exactly zero, at the same positions. The
centroids are then fine-tuned for ``finetune_epochs`` with the shared training loop: a
gradient hook gives every weight of a cluster the cluster's gradient (mean or sum of its
members'), and after every optimizer step the weights are re-tied to their cluster's
centroid, so a layer never holds more than ``2**bits`` distinct nonzero values.

The result is a plain module with dense float tensors: ``size_bytes`` does not drop. The
saving is realised by ``export/packed``, which stores each layer as codebook indices.

``bias_fp16`` rounds the chosen layers' biases to fp16-representable values at the end (the
packed format then stores them in fp16, losslessly); the stage logs what that costs
(``bias_fp16_<metric>_delta``).

This module imports torch only inside functions: the plugin registers its stage without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from compressflow import ConfigError, Stage, StageParams, StageResult

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compressflow.training import TrainParams

Bits = Annotated[int, Field(ge=1, le=8)]


class KMeansParams(StageParams):
    """Codebook size, which layers, and the centroid fine-tuning."""

    bits: Bits = Field(5, description="codebook of 2**bits centroids per layer (1..8)")
    layer_bits: dict[str, Bits] = Field(
        default_factory=dict,
        description="bits per layer-name pattern (fnmatch), first match wins: {'layers.4': 6}")
    include: list[str] = Field(default_factory=lambda: ["*"], description="layer-name patterns (fnmatch)")
    exclude: list[str] = Field(default_factory=list, description="layer-name patterns left as they are")
    iterations: int = Field(30, ge=0, description="Lloyd iterations after the linear initialisation")
    finetune_epochs: int = Field(0, ge=0, description="epochs of centroid fine-tuning (0: none)")
    lr: float = Field(1e-3, gt=0, description="fine-tuning learning rate")
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["constant", "cosine"] = Field("constant", description="lr over epochs")
    centroid_grad: Literal["mean", "sum"] = Field(
        "mean", description="a centroid's gradient: the mean (scale of one weight) or the sum "
        "(Deep Compression) of its members' gradients")
    bias_fp16: bool = Field(
        False, description="round the chosen layers' biases to fp16-representable values")

    def train_params(self) -> TrainParams:
        """The training loop's settings for the fine-tuning."""
        from compressflow.training import TrainParams

        return TrainParams(epochs=self.finetune_epochs, lr=self.lr, optimizer=self.optimizer,
                           momentum=self.momentum, schedule=self.schedule)

    def bits_for(self, layer: str) -> int:
        """The codebook bits of ``layer``: its first matching ``layer_bits`` pattern, or ``bits``."""
        for pattern, bits in self.layer_bits.items():
            if fnmatch(layer, pattern):
                return bits
        return self.bits


@dataclass
class Clustering:
    """One layer's weight sharing: which flat positions are nonzero and their cluster."""

    positions: torch.Tensor
    assign: torch.Tensor
    centroids: torch.Tensor
    counts: torch.Tensor
    bits: int

    def apply(self, weight: torch.Tensor) -> None:
        """Write every clustered weight as its centroid (in place; zeros untouched)."""
        flat = weight.detach().reshape(-1).clone()
        flat[self.positions] = self.centroids[self.assign].to(flat.dtype)
        weight.detach().copy_(flat.view_as(weight))


def clusterable_layers(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Module]:
    """Linear and Conv layers whose names match ``include`` and not ``exclude``."""
    from torch import nn

    every = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
             and isinstance(getattr(m, "weight", None), nn.Parameter)}
    chosen = {n: m for n, m in every.items()
              if any(fnmatch(n, p) for p in include) and not any(fnmatch(n, p) for p in exclude)}
    if not chosen:
        raise ConfigError(
            f"quantize/kmeans: include {include} / exclude {exclude} match no float Linear or "
            "Conv layer", f"the model's layers: {', '.join(every) or 'none'}")
    return chosen


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for every value."""
    import torch

    return torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)


def cluster(weight: torch.Tensor, bits: int, iterations: int) -> Clustering:
    """k-means of a weight's nonzero values into at most ``2**bits`` centroids (1-D, exact).

    Linear initialisation over [min, max] (Deep Compression's best), then Lloyd iterations
    until no centroid moves; empty clusters are dropped. A layer with no more distinct values
    than centroids keeps them as they are. Computed in float64.
    """
    import torch

    flat = weight.detach().reshape(-1)
    positions = torch.nonzero(flat).flatten()
    values = flat[positions].double()
    k = 2 ** bits
    distinct = torch.unique(values)
    if len(distinct) <= k:
        centroids = distinct
    else:
        centroids = torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
        for _ in range(iterations):
            assign = _nearest(values, centroids)
            counts = torch.bincount(assign, minlength=len(centroids))
            sums = torch.zeros_like(centroids).index_add_(0, assign, values)
            moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
            moved, _ = torch.sort(moved)
            if torch.equal(moved, centroids):
                break
            centroids = moved
        assign = _nearest(values, centroids)
        used = torch.bincount(assign, minlength=len(centroids)) > 0
        centroids = centroids[used]
    # a centroid of exactly 0 would turn its weights into pruned ones: keep it just off zero
    centroids = torch.where(centroids == 0, torch.finfo(weight.dtype).tiny, centroids)
    centroids = centroids.to(weight.dtype).double()  # what the weights will hold, exactly
    assign = _nearest(values, centroids)
    counts = torch.bincount(assign, minlength=len(centroids))
    return Clustering(positions, assign, centroids, counts, bits)


def tie_gradient(param: torch.Tensor, clustering: Clustering, reduce: str):
    """A hook giving each clustered weight its cluster's gradient (zeros get none)."""
    import torch

    def hook(grad: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(-1)
        shared = torch.zeros(len(clustering.centroids), dtype=torch.float64)
        shared.index_add_(0, clustering.assign, flat[clustering.positions].double())
        if reduce == "mean":
            shared /= clustering.counts.clamp(min=1)
        out = torch.zeros_like(flat)
        out[clustering.positions] = shared[clustering.assign].to(flat.dtype)
        return out.view_as(grad)

    return param.register_hook(hook)


def retie(weight: torch.Tensor, clustering: Clustering) -> None:
    """Set every centroid to its members' mean (float64: exact for equal members), re-tie."""
    import torch

    with torch.no_grad():
        values = weight.detach().reshape(-1)[clustering.positions].double()
        sums = torch.zeros_like(clustering.centroids).index_add_(0, clustering.assign, values)
        means = (sums / clustering.counts.clamp(min=1)).to(weight.dtype).double()
        clustering.centroids = torch.where(means == 0, clustering.centroids, means)
        clustering.apply(weight)


def round_biases_fp16(layers: dict[str, nn.Module]) -> float:
    """Round every chosen layer's bias to the nearest fp16 value; returns the largest change."""
    import torch

    largest = 0.0
    with torch.no_grad():
        for module in layers.values():
            bias = getattr(module, "bias", None)
            if bias is None:
                continue
            rounded = bias.half().to(bias.dtype)
            largest = max(largest, float((rounded - bias).abs().max()))
            bias.copy_(rounded)
    return largest


def layer_table(layers: dict[str, nn.Module], clusterings: dict[str, Clustering],
                errors: dict[str, float], path: Path) -> Path:
    """A Markdown table: layer, shape, bits, clusters used, nonzero weights, clustering MSE."""
    rows = ["| layer | shape | bits | clusters | nonzero | mse |", "|---|---|---|---|---|---|"]
    for name, module in layers.items():
        c = clusterings[name]
        rows.append(f"| {name} | {tuple(module.weight.shape)} | {c.bits} | {len(c.centroids)} | "
                    f"{len(c.positions)} | {errors[name]:.3g} |")
    path.write_text("\n".join(rows) + "\n")
    return path


class KMeansQuantize(Stage):
    """Deep Compression weight sharing: a k-means codebook per layer, centroids fine-tuned."""

    kind = "quantize"
    method = "kmeans"
    Params = KMeansParams

    def run(self, model, ctx):
        from compressflow.training import fit

        p: KMeansParams = self.params
        layers = clusterable_layers(model, p.include, p.exclude)
        clusterings, errors = {}, {}
        for name, module in layers.items():
            before = module.weight.detach().clone()
            clusterings[name] = cluster(module.weight, p.bits_for(name), p.iterations)
            clusterings[name].apply(module.weight)
            errors[name] = float((module.weight.detach() - before).double().pow(2).mean())
        metric = ctx.metric
        metrics = {
            "kmeans_layers": len(layers),
            "kmeans_clusters": sum(len(c.centroids) for c in clusterings.values()),
            "kmeans_mse": sum(errors.values()) / len(errors),
        }
        if p.finetune_epochs:
            metrics[f"clustered_{metric}"] = ctx.evaluate(model)[metric]
            start = {n: c.centroids.clone() for n, c in clusterings.items()}
            handles = [tie_gradient(layers[n].weight, c, p.centroid_grad)
                       for n, c in clusterings.items()]

            def after_step(_model) -> None:
                for n, c in clusterings.items():
                    retie(layers[n].weight, c)

            try:
                fit(model, ctx.data, p.train_params(), ctx, freeze_zeros=True, after_step=after_step)
            finally:
                for handle in handles:
                    handle.remove()
            metrics["centroid_shift"] = max(
                (float((c.centroids - start[n]).abs().max()) for n, c in clusterings.items()
                 if len(c.centroids)), default=0.0)
        notes = [f"{len(layers)} layers share at most 2^bits values each "
                 f"({metrics['kmeans_clusters']} centroids in all), but are stored as dense "
                 "floats: size_bytes does not drop; export/packed stores them as codebook "
                 "indices."]
        if p.bias_fp16:
            before = ctx.evaluate(model)[metric]
            metrics["bias_fp16_max_change"] = round_biases_fp16(layers)
            metrics[f"bias_fp16_{metric}_delta"] = ctx.evaluate(model)[metric] - before
            notes.append(f"Biases rounded to fp16 values ({metric} "
                         f"{metrics[f'bias_fp16_{metric}_delta']:+.4f}).")
        table = layer_table(layers, clusterings, errors, ctx.workdir / "kmeans_layers.md")
        return StageResult(model, metrics=metrics, artifacts={"kmeans_layers": table}, notes=notes)
