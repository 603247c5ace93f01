"""pipelines/deep-compression-mnist-lenet300.yaml written as a plain PyTorch script: the
work ``benchmarks/overhead.py`` compares compressflow's run of that pipeline with.

The same work, stage by stage: LeNet-300-100 trained 20 epochs (SGD, cosine); pruned by
magnitude to 93/92/74% per layer in 6 gradual steps of 2 fine-tuning epochs; fine-tuned 15
epochs; weights shared by 5-bit k-means per layer, centroids fine-tuned 3 epochs, biases
rounded to fp16; written as the packed Deep Compression file. Every epoch is evaluated on
the 10,000 test images, as the pipeline's curves are. What a user would borrow from a
library is borrowed from compressflow's plugins (the k-means codebook and its gradient
tying, the packed writer, the MNIST reader); the loops, masks and schedule are written out.
No MLflow, no measuring: what is left over in compressflow's run is its overhead.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

MNIST = Path(__file__).resolve().parent.parent / "data" / "mnist"
PER_LAYER = {0: 0.93, 1: 0.92, 2: 0.74}  # layers.0, layers.2, layers.4 of the zoo MLP
STEPS = 6


def plain_work() -> dict[str, float]:
    """Run the whole pipeline's work; the test accuracy after each stage."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from compressflow_data.idx import load_idx_split
    from compressflow_export.packed import PackOptions, save_packed
    from compressflow_quantize.kmeans import cluster, retie, tie_gradient

    x_train, y_train, x_test, y_test = load_idx_split(MNIST)
    scaled = x_train.astype(np.float64) / 255.0
    mean, std = float(scaled.mean()), float(scaled.std())

    def tensors(x, y):
        values = torch.from_numpy(x).to(torch.float32).div_(255.0).sub_(mean).div_(std)
        return TensorDataset(values.reshape(len(x), -1), torch.from_numpy(y))

    train, (x_val, y_val) = tensors(x_train, y_train), tensors(x_test, y_test).tensors
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    masks: dict[nn.Parameter, torch.Tensor] = {}

    def accuracy() -> float:
        with torch.inference_mode():
            return float((model.eval()(x_val).argmax(1) == y_val).float().mean())

    def fit(epochs: int, lr: float, cosine: bool, after=None, adam: bool = False) -> None:
        optimizer = (torch.optim.Adam(model.parameters(), lr=lr) if adam else
                     torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005))
        total = epochs * len(loader)
        scheduler = (torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))) if cosine else None)
        for _ in range(epochs):
            model.train()
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                with torch.no_grad():
                    for weight, mask in masks.items():
                        weight.mul_(mask)
                if after is not None:
                    after()
            accuracy()  # the epoch's curve point

    figures = {}
    fit(20, 0.05, cosine=True)
    figures["trained"] = accuracy()
    for step in range(1, STEPS + 1):  # Zhu & Gupta's cubic schedule towards each layer's target
        for index, target in PER_LAYER.items():
            weight = linears[index].weight
            sparsity = target * (1 - (1 - step / STEPS) ** 3)
            k = int(round(sparsity * weight.numel()))
            threshold = weight.detach().abs().flatten().kthvalue(max(k, 1)).values
            masks[weight] = (weight.detach().abs() > threshold).float() if k else torch.ones_like(weight)
            with torch.no_grad():
                weight.mul_(masks[weight])
        fit(2, 0.01, cosine=False)
    figures["pruned"] = accuracy()
    fit(15, 0.01, cosine=True)
    figures["finetuned"] = accuracy()
    clusterings = {}
    for layer in linears:
        clusterings[layer] = cluster(layer.weight, 5, 30)
        clusterings[layer].apply(layer.weight)
    handles = [tie_gradient(layer.weight, c, "mean") for layer, c in clusterings.items()]
    fit(3, 0.0001, cosine=True, adam=True,
        after=lambda: [retie(layer.weight, c) for layer, c in clusterings.items()])
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        for layer in linears:
            layer.bias.copy_(layer.bias.half().float())
    figures["shared"] = accuracy()
    with tempfile.TemporaryDirectory() as folder:
        save_packed(model, Path(folder) / "model.cfpk", PackOptions())
    figures["packed"] = accuracy()
    return figures
