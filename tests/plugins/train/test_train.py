"""compressflow_train: ``train`` starts from a fresh initialisation and learns; ``finetune``
continues and keeps every pruned zero exactly where it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressflow.training import zero_masks
from compressflow_models import zoo
from tests.conftest import write_pipeline

ARCH = {"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [64], "num_classes": 10}}
OTHER = {"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [16, 16], "num_classes": 10}}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """zero weights -> train -> prune 90% -> finetune -> finetune without keep_zeros -> train another model."""
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    folder = tmp_path_factory.mktemp("train")
    zeros = zoo.MLP(64, [64], 10)
    with torch.no_grad():
        for param in zeros.parameters():
            param.zero_()
    torch.save(zeros.state_dict(), folder / "zeros.pt")
    stages = [
        {"name": "trained", "train": {"epochs": 10, "lr": 0.003}},
        {"name": "pruned", "prune": {"sparsity": 0.9}},
        {"name": "tuned", "finetune": {"epochs": 5, "lr": 0.001}},
        {"name": "loose", "finetune": {"epochs": 1, "lr": 0.001, "keep_zeros": False}},
        {"name": "other", "train": {"epochs": 5, "lr": 0.003, "model": OTHER}},
    ]
    path = write_pipeline(folder, stages, name="train",
                          model={"source": "file:zeros.pt", "args": {"architecture": ARCH}},
                          measure={"latency": False}, tracking={"log_models": False})
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return uri, PipelineRunner(validate(path), tracking_uri=uri, keep_models=True).run()


def accuracy_of(ctx, stage: str) -> float:
    return ctx.results[stage].metrics["accuracy"]


def test_train_reinitializes_and_learns(pipeline):
    _, ctx = pipeline
    # an all-zero MLP cannot learn by gradient descent (its hidden layer gets no gradient):
    # only a fresh initialisation gets it far above chance
    assert accuracy_of(ctx, "input") < 0.15
    assert accuracy_of(ctx, "trained") > 0.9
    trained = ctx.results["trained"].model
    assert all(bool(m.weight.abs().sum() > 0) for m in trained.modules() if isinstance(m, nn.Linear))
    # the input model itself is left as it was
    assert all(bool((p == 0).all()) for p in ctx.results["input"].model.parameters())


def test_train_logs_its_curve_and_final_figures(pipeline):
    from mlflow.tracking import MlflowClient

    uri, ctx = pipeline
    metrics = ctx.results["trained"].metrics
    assert metrics["final_val_accuracy"] == pytest.approx(metrics["accuracy"])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("train")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'trained'")
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, 11))
    by_step = sorted(losses, key=lambda m: m.step)
    assert by_step[-1].value < by_step[0].value / 2


def test_train_with_a_model_spec_trains_that_architecture_from_scratch(pipeline):
    _, ctx = pipeline
    other = ctx.results["other"].model
    shapes = [tuple(m.weight.shape) for m in other.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(16, 64), (16, 16), (10, 16)]
    assert accuracy_of(ctx, "other") > 0.8
    assert ctx.results["other"].metrics["sparsity"] < 0.05  # nothing of the pruned model carried over


def test_finetune_keeps_exactly_the_pruned_zeros_and_recovers(pipeline):
    _, ctx = pipeline
    pruned, tuned = ctx.results["pruned"].model, ctx.results["tuned"].model
    before, after = zero_masks(pruned), zero_masks(tuned)
    assert set(before) == set(after) == {"layers.0.weight", "layers.2.weight"}
    for name in before:
        assert torch.equal(before[name], after[name]), name
    zeros = sum(int((~mask).sum()) for mask in before.values())
    total = sum(mask.numel() for mask in before.values())
    assert zeros == round(0.9 * total)
    # the surviving weights did train
    assert any(not torch.equal(a, b) for a, b in zip(pruned.parameters(), tuned.parameters()))
    assert accuracy_of(ctx, "pruned") < accuracy_of(ctx, "trained") - 0.05
    assert accuracy_of(ctx, "tuned") > accuracy_of(ctx, "pruned") + 0.05


def test_finetune_without_keep_zeros_lets_pruned_weights_move(pipeline):
    _, ctx = pipeline
    tuned, loose = zero_masks(ctx.results["tuned"].model), zero_masks(ctx.results["loose"].model)
    revived = sum(int((loose[n] & ~tuned[n]).sum()) for n in tuned)
    assert revived > 0.5 * sum(int((~m).sum()) for m in tuned.values())

