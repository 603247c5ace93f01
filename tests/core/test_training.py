"""The shared loop: it learns, logs a curve, follows the schedule, and can freeze zeros."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressflow.stage import DataSpec, StageContext
from compressflow.training import TrainParams, fit
from compressflow_data import digits
from compressflow_tasks import accuracy
from compressflow_models.zoo import MLP


def _ctx(bundle, logged):
    return StageContext(
        name="t", seed=0, workdir=Path("."), metric="accuracy", data=lambda: bundle,
        evaluate=lambda model, loader=None: {"accuracy": accuracy(model.eval(), bundle.val)},
        model_at=None, build_model=None,
        log_metric=lambda name, value, step: logged.append((name, step)),
        progress=lambda step, total, figures: None)


def test_learns_and_logs_per_epoch():
    bundle = digits(DataSpec(dataset="digits"), 0, None)
    model, logged = MLP(hidden=[32]), []
    history = fit(model, bundle, TrainParams(epochs=3, lr=0.01, schedule="cosine"), _ctx(bundle, logged))
    assert len(history) == 3 and history[-1]["val_accuracy"] > 0.85
    assert ("train_loss", 3) in logged and ("val_accuracy", 1) in logged


def test_freeze_zeros_keeps_exact_zeros_under_weight_decay():
    bundle = digits(DataSpec(dataset="digits"), 0, None)
    model = MLP(hidden=[32])
    with torch.no_grad():
        model.layers[0].weight[:, ::2] = 0
    zeros = model.layers[0].weight == 0
    params = TrainParams(epochs=2, optimizer="sgd", weight_decay=0.01, lr=0.05)
    fit(model, bundle, params, _ctx(bundle, []), freeze_zeros=True)
    assert torch.equal(model.layers[0].weight == 0, zeros)


def test_custom_loss_is_used():
    bundle = digits(DataSpec(dataset="digits"), 0, None)
    model = MLP(hidden=[32])
    before = [p.clone() for p in model.parameters()]
    # a loss that ignores the labels and is zero everywhere moves nothing
    fit(model, bundle, TrainParams(epochs=1), _ctx(bundle, []),
        loss_fn=lambda outputs, targets, inputs: (outputs * 0).sum())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_detached_context_trains_outside_a_pipeline():
    bundle = digits(DataSpec(dataset="digits"), 0, None)
    ctx = StageContext.detached(bundle, lambda model, loader=None: {"accuracy": accuracy(model.eval(), bundle.val)})
    assert ctx.data is bundle and ctx.workdir.is_dir()
    history = fit(MLP(hidden=[32]), bundle, TrainParams(epochs=2, lr=0.01), ctx)
    assert history[-1]["val_accuracy"] > 0.8
    with pytest.raises(LookupError, match="no model 'previous'"):
        ctx.model_at("previous")


def test_a_non_finite_loss_stops_training_naming_the_epoch():
    from compressflow.training import Diverged

    bundle = digits(DataSpec(dataset="digits"), 0, None)
    with pytest.raises(Diverged, match="loss is nan at epoch 1, batch 1") as caught:
        fit(MLP(hidden=[32]), bundle, TrainParams(epochs=2), _ctx(bundle, []),
            loss_fn=lambda outputs, targets, inputs: outputs.sum() * float("nan"))
    assert caught.value.exit_code == 1 and "lower lr" in caught.value.hint


def test_a_diverging_stage_exits_1_instead_of_logging_success(tmp_path, cli, store):
    from tests.conftest import write_pipeline

    # a finite but absurd learning rate: the loss overflows within the first epoch
    path = write_pipeline(tmp_path, [{"train": {"epochs": 3, "lr": 1e30, "optimizer": "sgd"}}])
    result = cli("run", path, "--tracking-uri", store, "-q")
    assert result.exit_code == 1, result.output
    assert "training diverged" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("dropout", [True, False])
def test_dropout_false_trains_without_dropping_and_restores_p(dropout):
    bundle = digits(DataSpec(dataset="digits"), 0, None)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), MLP(hidden=[32]))
    seen = []

    # the loss sees what the model computed in training mode, next to its eval-mode output
    def loss(outputs, targets, inputs):
        with torch.no_grad():
            model.eval()
            seen.append(torch.equal(outputs, model(inputs)))
            model.train()
        return torch.nn.functional.cross_entropy(outputs, targets)

    fit(model, bundle, TrainParams(epochs=1, dropout=dropout), _ctx(bundle, []), loss_fn=loss)
    assert seen and all(same is not dropout for same in seen)  # dropped: never the eval output
    assert model[0].p == 0.5
