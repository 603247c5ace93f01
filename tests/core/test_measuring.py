"""A stage's figures: evaluated through the task, timed interleaved with the input model."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressflow.config import MeasureSpec
from compressflow.data import DataBundle
from compressflow.measuring import Measurer, compare_to_input, honesty_notes
from compressflow.task import default_task


def _bundle() -> DataBundle:
    data = TensorDataset(torch.randn(128, 64), torch.randint(0, 10, (128,)))
    loader = DataLoader(data, batch_size=32)
    return DataBundle(train=loader, val=loader, calibration=loader, num_classes=10, sample_shape=(64,))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def test_an_unchanged_model_is_one_x_within_the_spread():
    # the engine's own path: the stage's model timed round by round against the input model
    measurer = Measurer(default_task(), MeasureSpec(repeats=100, warmup=3, batch_sizes=[1, 64]), _bundle())
    model = _mlp()
    figures = measurer.figures(copy.deepcopy(model), model)
    for batch in (1, 64):
        q1, q3 = figures[f"latency_b{batch}_speedup_q1"], figures[f"latency_b{batch}_speedup_q3"]
        # the copy lives elsewhere in memory, which alone can move a 50 µs call a percent or
        # two for the whole window (seen: IQR 0.975-0.993): the spread must come within 5% of 1
        assert q1 <= 1.05 and q3 >= 0.95, (batch, q1, figures[f"latency_b{batch}_speedup"], q3)
        assert figures[f"latency_ms_b{batch}"] > 0 and figures[f"latency_ms_b{batch}_iqr"] >= 0
    notes = honesty_notes(figures, figures, [1, 64], [None])
    assert not any("slower" in n for n in notes)  # a spread within 5% of 1 is not slower


def test_batch_sizes_are_the_users_and_the_input_model_is_timed_against_its_copy():
    measurer = Measurer(default_task(), MeasureSpec(repeats=3, warmup=0, batch_sizes=[2, 8]), _bundle())
    figures = measurer.figures(_mlp())  # the input model: its row shows the noise floor
    assert {"latency_ms_b2", "latency_ms_b8", "latency_b2_speedup", "latency_b8_speedup_q3"} <= set(figures)
    assert "latency_ms_b1" not in figures
    assert measurer.example(8).shape == (8, 64)


def test_notes_say_when_sparsity_saved_no_bytes_and_no_time():
    before = {"sparsity": 0.0, "size_bytes": 100, "macs": 10}
    figures = {"sparsity": 0.8, "size_bytes": 100, "macs": 10,
               "latency_b1_speedup": 1.01, "latency_b1_speedup_q1": 0.95, "latency_b1_speedup_q3": 1.07,
               "latency_b64_speedup": 0.5, "latency_b64_speedup_q1": 0.45, "latency_b64_speedup_q3": 0.55}
    notes = " ".join(honesty_notes(figures, before, [1, 64], [None]))
    assert "not smaller on disk" in notes
    assert "latency at batch 1: no measurable speedup" in notes and "batch 64: slower" in notes
    # within the noise of a copy (NOISE below 1x): not faster, and not called slower either
    figures.update({"latency_b64_speedup": 0.98, "latency_b64_speedup_q1": 0.97,
                    "latency_b64_speedup_q3": 0.99})
    notes = " ".join(honesty_notes(figures, before, [1, 64], [None]))
    assert "batch 64: no measurable speedup" in notes and "slower" not in notes
    figures.update({"latency_b64_speedup_q1": 1.02, "latency_b64_speedup_q3": 1.05})
    assert "batch 64" not in " ".join(honesty_notes(figures, before, [1, 64], [None]))


def test_packed_bytes_stand_against_the_input_state_dict():
    start = {"size_bytes": 1000, "macs": 10, "accuracy": 0.9}
    out = compare_to_input({"size_bytes": 1000, "macs": 5, "accuracy": 0.8}, start, "accuracy", 25)
    assert out["compressed_bytes"] == 25 and out["compressed_ratio"] == 40
    assert out["macs_ratio"] == 2 and abs(out["accuracy_delta"] + 0.1) < 1e-12
