"""compressflow_prune's criteria: taylor and obd see which weights the loss needs; least-squares
(SparseGPT) reconstructs each layer's output better than magnitude pruning at equal sparsity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressflow_prune import LeastSquaresPrune, MagnitudePrune, OBDPrune, TaylorPrune
from compressflow.calibration import calibration_batches
from compressflow_prune.criteria import obd_scores, taylor_scores
from compressflow_prune.masks import prunable_layers
from compressflow.calibration import input_hessians, layer_columns
from compressflow_prune.obs import relative_error, sparsegpt
from tests.conftest import write_pipeline
from tests.plugins.prune.helpers import linear_weights, run_stage, sparsity, trained_mlp

DEAD_PIXEL = 0  # the top-left pixel of every digit is blank: after standardization always 0
CENTRE_PIXEL = 36


def mean_loss(model: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in batches) / sum(
            len(y) for _, y in batches)


def test_taylor_and_obd_rank_a_weight_the_loss_needs_above_one_it_does_not():
    model, bundle = trained_mlp()
    batches = calibration_batches(bundle, 8, seed=0)
    first = model.layers[0]
    assert bool((torch.cat([x for x, _ in batches])[:, DEAD_PIXEL] == 0).all())
    # needed: the largest weight from the centre pixel; unneeded: a weight from the blank
    # pixel, made twice as large, so that magnitude ranks the two the wrong way round
    unit = int(first.weight[:, CENTRE_PIXEL].abs().argmax())
    needed, unneeded = (unit, CENTRE_PIXEL), (unit, DEAD_PIXEL)
    with torch.no_grad():
        first.weight[unneeded] = 2 * first.weight[needed].abs()
    base = mean_loss(model, batches)
    cost = {}
    for which in (needed, unneeded):
        saved = float(first.weight[which].detach())
        with torch.no_grad():
            first.weight[which] = 0
        cost[which] = mean_loss(model, batches) - base
        with torch.no_grad():
            first.weight[which] = saved
    assert cost[needed] > 1e-4 and cost[unneeded] == 0  # the case is what it claims to be
    layers = prunable_layers(model, ["*"], [])
    assert first.weight[unneeded].abs() > first.weight[needed].abs()
    for scores in (taylor_scores(model, layers, batches), obd_scores(model, layers, batches)):
        assert scores["layers.0"][needed] > 0
        assert scores["layers.0"][unneeded] == 0
    # and the model is left as it was, gradients included
    assert all(p.grad is None for p in model.parameters())


def test_obd_is_half_w_squared_times_the_mean_squared_per_sample_gradient():
    model, bundle = trained_mlp()
    batches = calibration_batches(bundle, 2, seed=0)
    layers = prunable_layers(model, ["layers.4"], [])
    weight = model.layers[4].weight
    fisher = torch.zeros_like(weight, dtype=torch.float64)
    samples = [(x, y) for xs, ys in batches for x, y in zip(xs, ys)]
    for x, y in samples:  # one backward pass a sample, by hand
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x[None]), y[None]), [weight])
        fisher += grad.double() ** 2
    expected = 0.5 * weight.detach().double() ** 2 * fisher / len(samples)
    assert torch.allclose(obd_scores(model, layers, batches)["layers.4"], expected, rtol=1e-4)


@pytest.mark.parametrize("target", [0.5, 0.7, "2:4"])
def test_least_squares_reconstructs_below_magnitude_on_the_same_layer_and_sparsity(target):
    model, bundle = trained_mlp()
    batches = calibration_batches(bundle, 16, seed=0)
    layers = prunable_layers(model, ["*"], [])
    hessians = input_hessians(model, layers, batches)
    ratios = []
    for name, module in layers.items():
        weight = module.weight.detach()
        if target == "2:4":
            new, keep = sparsegpt(weight, hessians[name], n_m=(2, 4))
            groups = weight.abs().reshape(len(weight), -1, 4)
            magnitude = torch.zeros_like(groups, dtype=torch.bool).scatter_(
                2, groups.topk(2, dim=2).indices, True).view_as(weight)
        else:
            count = round(target * weight.numel())
            new, keep = sparsegpt(weight, hessians[name], count=count)
            assert int((~keep).sum()) == count and sparsity(new) == count / weight.numel()
            magnitude = torch.ones(weight.numel(), dtype=torch.bool)
            magnitude[weight.abs().flatten().topk(count, largest=False).indices] = False
            magnitude = magnitude.view_as(weight)
        assert torch.equal(new == 0, ~keep)
        error = relative_error(weight, new, hessians[name])
        baseline = relative_error(weight, weight * magnitude, hessians[name])
        # the update matters, not just the mask: the same mask without it does worse
        mask_only = relative_error(weight, weight * keep, hessians[name])
        assert error < 0.95 * baseline, (name, error, baseline)
        assert error < mask_only, (name, error, mask_only)
        ratios.append(error / baseline)
    # the pixels reaching the first layer are nearly uncorrelated, the hidden features are not:
    # the update wins less there (0.5-0.9 of magnitude's error), much more deeper in (0.1-0.4)
    assert sum(ratios) / len(ratios) < 0.6, ratios


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(3, 4, (2, 3), stride=2, dilation=(1, 2)),
    nn.Conv2d(3, 4, 4, padding="same"),
    nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"),
    nn.Conv1d(3, 4, 3, stride=2, padding=1),
])
def test_layer_columns_reproduce_the_conv(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 11)
    with torch.no_grad():
        out = conv(x) - conv.bias.view(1, -1, *[1] * (x.dim() - 2))
        columns = layer_columns(conv, x)
        mine = conv.weight.flatten(1) @ columns  # [out, batch * positions]
    assert torch.allclose(mine, out.transpose(0, 1).reshape(len(conv.weight), -1), atol=1e-5)


def test_least_squares_prunes_a_cnn_layer_by_layer_below_magnitudes_error():
    from compressflow_data.loaders import load_digits_bundle
    from compressflow import DataSpec
    from compressflow_models.zoo import CNN

    torch.manual_seed(0)
    bundle = load_digits_bundle(DataSpec(dataset="digits", batch_size=64), 0, (1, 8, 8))
    result, _ = run_stage(LeastSquaresPrune, CNN([8, 16], 32), bundle, sparsity=0.6,
                          scope="layer", calibration_batches=4)
    rows = Path(result.artifacts["prune_layers"]).read_text().splitlines()
    assert rows[0] == ("| layer | shape | sparsity | reconstruction error | magnitude's error "
                       "| error / magnitude's |")
    assert len(rows) == 2 + 4
    for row in rows[2:]:
        name, shape, reached, error, baseline, ratio = [c.strip() for c in row.strip("|").split("|")]
        size = math.prod(int(v) for v in shape.strip("()").split(","))
        assert float(reached) == pytest.approx(round(0.6 * size) / size, abs=1e-4), row
        assert float(error) < float(baseline), row
    assert result.metrics["reconstruction_error"] < result.metrics["reconstruction_error_magnitude"]


@pytest.mark.parametrize("errors", [True, False])
def test_wanda_tells_the_errors_only_when_asked_and_prunes_the_same(errors):
    from compressflow import DataSpec
    from compressflow_data.loaders import load_digits_bundle
    from compressflow_models.zoo import CNN
    from compressflow_prune import WandaPrune

    torch.manual_seed(0)
    model = CNN([8, 16], 32)
    bundle = load_digits_bundle(DataSpec(dataset="digits", batch_size=64), 0, (1, 8, 8))
    result, _ = run_stage(WandaPrune, model, bundle, sparsity=0.6, scope="layer",
                          calibration_batches=4, errors=errors)
    header = Path(result.artifacts["prune_layers"]).read_text().splitlines()[0]
    assert ("reconstruction error" in header) is errors
    assert ("reconstruction_error" in result.metrics) is errors
    for weight in linear_weights(result.model).values():
        assert sparsity(weight) == pytest.approx(0.6, abs=0.05)  # whole weights per row


def test_every_criterion_prunes_the_same_count_and_least_squares_keeps_accuracy():
    from compressflow_tasks import accuracy

    model, bundle = trained_mlp()
    dense = accuracy(model, bundle.val)
    accuracies = {}
    for stage_class in (MagnitudePrune, TaylorPrune, OBDPrune, LeastSquaresPrune):
        result, _ = run_stage(stage_class, trained_mlp()[0], bundle, sparsity=0.8, scope="layer")
        for name, weight in linear_weights(result.model).items():
            assert sparsity(weight) == pytest.approx(0.8, abs=0.5 / weight.numel()), (stage_class, name)
        accuracies[stage_class.method] = accuracy(result.model, bundle.val)
        assert result.metrics["target_sparsity"] == pytest.approx(0.8)
        if stage_class.needs_data:
            assert result.metrics["calibration_samples"] == 16 * 64
    # one shot, no finetune: the update of least-squares keeps most of what magnitude loses
    assert accuracies["least-squares"] > accuracies["magnitude"] + 0.5 * (dense - accuracies["magnitude"])


def test_least_squares_pipeline_logs_the_layer_table_and_its_errors(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    stages = [{"name": "base", "train": {"epochs": 6, "lr": 0.003}},
              {"name": "ls", "prune": {"method": "least-squares", "sparsity": 0.7, "scope": "layer",
                                       "calibration_batches": 8}}]
    path = write_pipeline(tmp_path, stages, name="one-shot", measure={"latency": False},
                          tracking={"log_models": False})
    ctx = PipelineRunner(validate(path), tracking_uri=store).run()
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("one-shot").experiment_id],
                                "attributes.run_name = 'ls'")
    assert run.info.status == "FINISHED"
    assert run.data.params["pattern"] == "unstructured" and run.data.params["schedule"] == "oneshot"
    metrics = run.data.metrics
    assert metrics["target_sparsity"] == pytest.approx(0.7)
    assert metrics["calibration_samples"] == 8 * 64
    assert 0 < metrics["reconstruction_error"] < metrics["reconstruction_error_magnitude"]
    assert metrics["accuracy"] > ctx.results["base"].metrics["accuracy"] - 0.1
    table = Path(client.download_artifacts(run.info.run_id, "prune_layers.md", str(tmp_path))).read_text()
    # each layer at 70% of its weights, to the weight (0.7 * 2048 = 1433.6: 1434 go)
    assert "| layers.0 | (32, 64) | 0.7002 |" in table and "| layers.2 | (10, 32) | 0.7000 |" in table
