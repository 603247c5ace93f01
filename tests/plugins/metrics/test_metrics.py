"""compressflow_metrics: accuracy and loss give the exact numbers, averaged over samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressflow_metrics import accuracy, loss

# The model returns its input, so each row below IS the logits of one sample.
LOGITS = [
    [2.0, 0.0, 0.0],   # target 0: right
    [0.0, 1.0, 0.0],   # target 1: right
    [0.0, 0.0, 3.0],   # target 2: right
    [1.0, 2.0, 0.0],   # target 0: wrong
    [0.0, 0.0, 1.0],   # target 1: wrong
]
TARGETS = [0, 1, 2, 0, 1]


def _loader(batch_size: int) -> DataLoader:
    data = TensorDataset(torch.tensor(LOGITS), torch.tensor(TARGETS))
    return DataLoader(data, batch_size=batch_size)


def _cross_entropy(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_accuracy_is_the_share_of_right_samples(batch_size):
    # batches of 2 are right 2/2, 1/2, 0/1: a mean over batches would say 0.5, not 3/5
    assert accuracy(nn.Identity(), _loader(batch_size)) == pytest.approx(3 / 5, abs=1e-12)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_loss_is_the_mean_cross_entropy_over_samples(batch_size):
    expected = sum(_cross_entropy(r, t) for r, t in zip(LOGITS, TARGETS)) / len(TARGETS)
    assert loss(nn.Identity(), _loader(batch_size)) == pytest.approx(expected, rel=1e-6)


def test_metrics_of_a_linear_model():
    # a real layer with hand-set weights: logits = x @ W.T + b
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        layer.bias.copy_(torch.tensor([0.0, 0.5]))
    inputs = torch.tensor([[1.0, 0.0], [1.0, 0.8], [0.0, 0.0], [0.2, 0.0]])
    targets = torch.tensor([0, 0, 1, 0])
    # logits: [1, .5] -> 0 right; [1, 1.3] -> 1 wrong; [0, .5] -> 1 right; [.2, .5] -> 1 wrong
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    assert accuracy(layer, loader) == pytest.approx(0.5, abs=1e-12)
    rows = [[1.0, 0.5], [1.0, 1.3], [0.0, 0.5], [0.2, 0.5]]
    expected = sum(_cross_entropy(r, int(t)) for r, t in zip(rows, targets)) / 4
    assert loss(layer, loader) == pytest.approx(expected, rel=1e-6)


def test_registered_with_their_direction():
    from compressflow.plugins import load_plugins

    metrics = load_plugins().metrics
    assert metrics.get("accuracy").fn is accuracy and metrics.get("accuracy").higher_is_better
    assert metrics.get("loss").fn is loss and not metrics.get("loss").higher_is_better
