"""Figures are counted and serialized, never assumed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from compressflow.measure import count_macs, count_params, ratios_to_input, size_bytes, static_figures


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10))


def test_counts_and_sparsity_are_counted_zeros():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[:, :32] = 0
    total, nonzero = count_params(model)
    assert total == 64 * 300 + 300 + 300 * 10 + 10
    assert nonzero == total - 300 * 32
    figures = static_figures(model, torch.randn(1, 64))
    assert figures["sparsity"] == pytest.approx(300 * 32 / total)
    assert figures["params_nonzero"] == nonzero and figures["size_bytes"] == size_bytes(model)


def test_pruned_dense_model_is_not_smaller():
    model = _mlp()
    before = size_bytes(model)
    with torch.no_grad():
        model[0].weight.zero_()
    assert size_bytes(model) == before


def test_quantized_weights_counted_and_smaller():
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert count_params(quantized)[0] == count_params(model)[0]
    assert size_bytes(quantized) < size_bytes(model) / 3
    assert count_macs(quantized, torch.randn(1, 64)) == count_macs(model, torch.randn(1, 64))


def test_macs_of_linear_and_conv():
    assert count_macs(_mlp(), torch.randn(5, 64)) == 64 * 300 + 300 * 10
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2))
    assert count_macs(conv, torch.randn(2, 1, 8, 8)) == 4 * 64 * 9 + 8 * 16 * 2 * 9


class _DictModel(nn.Module):
    """Takes a tokenizer-style dict: embeds input_ids, masks, projects."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.embed(input_ids) * attention_mask.unsqueeze(-1))


def test_macs_of_a_model_fed_a_dict_count_one_sequence():
    inputs = {"input_ids": torch.randint(0, 50, (3, 7)), "attention_mask": torch.ones(3, 7)}
    assert count_macs(_DictModel(), inputs) == 7 * 16 * 8  # one sample: 7 positions


def test_ratios_divide_input_by_stage():
    ratios = ratios_to_input({"size_bytes": 50, "macs": 10}, {"size_bytes": 200, "macs": 10})
    assert ratios == {"size_ratio": 4.0, "macs_ratio": 1.0}
