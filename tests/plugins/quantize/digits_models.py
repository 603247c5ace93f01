"""Trained digits models and a real StageContext for the quantization tests (no mocks).

The models are trained once per test process (a few seconds) and handed out as fresh copies.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from compressflow import DataBundle, DataSpec, StageContext
from compressflow_data.loaders import load_digits_bundle
from compressflow_tasks import accuracy, loss
from compressflow_models.zoo import CNN, MLP

ARCHS = {
    "mlp": (MLP, {"in_features": 64, "hidden": [128, 64], "num_classes": 10}, 8),
    "cnn": (CNN, {"channels": [8, 16], "hidden": 32, "num_classes": 10}, 20),
}


@functools.cache
def digits(image: bool) -> DataBundle:
    """The digits as a pipeline with seed 0 and batch size 64 splits them."""
    return load_digits_bundle(DataSpec(dataset="digits", batch_size=64), 0,
                              (1, 8, 8) if image else (64,))


def data_for(model: nn.Module) -> DataBundle:
    """The bundle shaped for ``model``."""
    return digits(len(getattr(model, "input_shape", (64,))) == 3)


@functools.cache
def _trained_state(arch: str) -> dict[str, torch.Tensor]:
    cls, args, epochs = ARCHS[arch]
    torch.manual_seed(0)
    model = cls(**args)
    data = data_for(model)
    # the bundle is cached and shared: without this, the batches (and so these weights)
    # depend on which tests iterated its loader before
    data.reseed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for inputs, targets in data.train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return copy.deepcopy(model.state_dict())


def trained(arch: str) -> nn.Module:
    """A fresh copy of the trained ``arch`` (mlp or cnn), in eval mode."""
    cls, args, _ = ARCHS[arch]
    model = cls(**args)
    model.load_state_dict(_trained_state(arch))
    return model.eval()


def save_trained(folder: Path, arch: str) -> dict:
    """Write the trained weights next to a pipeline; returns the pipeline's ``model`` entry."""
    _, args, _ = ARCHS[arch]
    torch.save(_trained_state(arch), folder / f"{arch}.pt")
    return {"source": f"file:{arch}.pt", "args": {"architecture": {"source": f"zoo:{arch}", "args": args}}}


def evaluate(model: nn.Module, loader) -> dict[str, float]:
    """What the runner's evaluate gives: accuracy and loss, eval mode."""
    model.eval()
    return {"accuracy": accuracy(model, loader), "loss": loss(model, loader)}


def stage_context(workdir: Path, bundle: DataBundle, logged: dict | None = None) -> StageContext:
    """A real StageContext over ``bundle``: metrics land in ``logged`` ({name: [(step, value)]})."""
    logged = {} if logged is None else logged

    def log_metric(name, value, step=None):
        logged.setdefault(name, []).append((step, float(value)))

    return StageContext(
        name="q", seed=1, workdir=workdir, metric="accuracy", data=lambda: bundle,
        evaluate=lambda model, loader=None: evaluate(model, loader if loader is not None else bundle.val),
        model_at=lambda ref: (_ for _ in ()).throw(KeyError(ref)),
        build_model=lambda spec: (_ for _ in ()).throw(NotImplementedError()),
        log_metric=log_metric, progress=lambda step, total, figures: None)
