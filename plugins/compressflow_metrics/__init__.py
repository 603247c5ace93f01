"""Built-in task metrics: ``accuracy`` (higher is better) and ``loss`` (cross-entropy)."""

from __future__ import annotations

from compressflow import hookimpl


def accuracy(model, loader) -> float:
    """Share of samples whose argmax class is the label."""
    import torch

    correct = total = 0
    with torch.inference_mode():
        for inputs, targets in loader:
            correct += int((model(inputs).argmax(dim=1) == targets).sum())
            total += len(targets)
    return correct / max(total, 1)


def loss(model, loader) -> float:
    """Mean cross-entropy over samples."""
    import torch
    import torch.nn.functional as F

    summed = total = 0.0
    with torch.inference_mode():
        for inputs, targets in loader:
            summed += float(F.cross_entropy(model(inputs), targets, reduction="sum"))
            total += len(targets)
    return summed / max(total, 1)


@hookimpl
def register_metrics(registry) -> None:
    """accuracy and loss."""
    registry.add("accuracy", accuracy, higher_is_better=True)
    registry.add("loss", loss, higher_is_better=False)
