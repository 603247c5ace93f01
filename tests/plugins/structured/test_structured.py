"""structured_prune/depgraph: channels physically removed, coupled layers kept consistent,
the Hessian importance fed every sample, and the smaller model reloaded from MLflow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compressflow import ConfigError, DataSpec
from compressflow_data.loaders import load_digits_bundle
from compressflow_tasks import accuracy
from compressflow_models.zoo import CNN, MLP, ResNet
from compressflow_structured.depgraph import (
    channel_importance,
    squared_gradient_mean,
    structured_prune,
)
from tests.conftest import write_pipeline

CONVS = (nn.Conv2d,)


@pytest.fixture(scope="module")
def digits():
    """The digits as 1x8x8 images, split as a pipeline with seed 0 splits them."""
    return load_digits_bundle(DataSpec(dataset="digits", batch_size=64), 0, (1, 8, 8))


@pytest.fixture(scope="module")
def trained(digits):
    """A ResNet (width 8) trained 2 epochs: distinct BatchNorm parameters, real gradients."""
    torch.manual_seed(0)
    model = ResNet(width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        model.train()
        for inputs, targets in digits.train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return model.eval()


def random_bn_resnet(width: int = 16) -> ResNet:
    """An untrained ResNet whose BatchNorm parameters and statistics are all distinct."""
    torch.manual_seed(1)
    model = ResNet(width=width)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of ``before`` survive in ``after`` (matched exactly, in order)."""
    kept = []
    for row in after:
        hits = [i for i in range(len(before)) if torch.equal(before[i], row)]
        assert len(hits) == 1, "a pruned row must be an unchanged original row"
        kept.append(hits[0])
    assert kept == sorted(kept)
    return kept


# --- shapes, coupling, forward ------------------------------------------------------------


def test_resnet_shapes_are_coupled(digits):
    model = random_bn_resnet(16)
    report = structured_prune(model, digits.example_input(2), ratio=0.5)
    s, b0, b1 = model.stem, model.layers[0], model.layers[1]
    # every group halves: 16 -> 8 and 32 -> 16
    assert s[0].out_channels == s[1].num_features == 8
    assert b0.conv1.out_channels == b0.bn1.num_features == b0.conv2.in_channels == 8
    # identity shortcut: the stem and block 0's conv2 feed one add, so they lose alike
    assert b0.conv2.out_channels == b0.bn2.num_features == 8
    assert b0.conv1.in_channels == b1.conv1.in_channels == b1.shortcut[0].in_channels == 8
    assert b1.conv1.out_channels == b1.bn1.num_features == b1.conv2.in_channels == 16
    # projection shortcut: conv2 and the 1x1 conv feed one add, then the classifier
    assert b1.conv2.out_channels == b1.shortcut[0].out_channels == b1.bn2.num_features == 16
    assert b1.shortcut[1].num_features == model.fc.in_features == 16
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bn.running_mean.shape == bn.running_var.shape == bn.weight.shape
    assert model(digits.example_input(5)).shape == (5, 10)
    assert (report.channels_before, report.channels_after) == (16 * 3 + 32 * 3 + 10, 8 * 3 + 16 * 3 + 10)
    assert report.shapes_before["layers.1.conv2"] == (32, 32, 3, 3)
    assert report.shapes_after["layers.1.conv2"] == (16, 16, 3, 3)


def test_pruning_equals_switching_the_channels_off(digits):
    """The smaller model computes exactly what the original computes with the removed
    channels' BatchNorm outputs set to zero: the residual branches lost the same channels."""
    original = random_bn_resnet(16)
    pruned = copy.deepcopy(original)
    structured_prune(pruned, digits.example_input(2), ratio=0.4, importance="magnitude")
    masked = copy.deepcopy(original)
    removed = {}
    for name, bn in masked.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            small = pruned.get_submodule(name)
            keep = kept_rows(torch.stack([bn.weight, bn.bias, bn.running_mean], 1).detach(),
                             torch.stack([small.weight, small.bias, small.running_mean], 1).detach())
            removed[name] = sorted(set(range(bn.num_features)) - set(keep))
            with torch.no_grad():
                bn.weight[removed[name]] = 0
                bn.bias[removed[name]] = 0
    assert removed["stem.1"] == removed["layers.0.bn2"] and removed["stem.1"]
    assert removed["layers.1.bn2"] == removed["layers.1.shortcut.1"]
    inputs = digits.example_input(32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(inputs), masked(inputs), rtol=1e-4, atol=1e-5)


def test_linear_neurons_and_conv_to_linear_flatten(digits):
    torch.manual_seed(0)
    mlp = MLP(64, [32, 16], 10)
    structured_prune(mlp, digits.example_input(2).flatten(1), ratio=0.5)
    first, second, last = mlp.layers[0], mlp.layers[2], mlp.layers[4]
    assert (first.out_features, second.in_features, second.out_features) == (16, 16, 8)
    assert (last.in_features, last.out_features) == (8, 10)
    assert mlp(digits.example_input(3).flatten(1)).shape == (3, 10)

    cnn = CNN([16, 32], 64)
    structured_prune(cnn, digits.example_input(2), ratio=0.5)
    conv1, conv2 = cnn.features[0], cnn.features[3]
    hidden, out = cnn.classifier[1], cnn.classifier[3]
    assert (conv1.out_channels, conv2.in_channels, conv2.out_channels) == (8, 8, 16)
    assert hidden.in_features == 16 * 4  # flatten: each removed channel takes its 2x2 pixels
    assert (hidden.out_features, out.in_features, out.out_features) == (32, 32, 10)
    assert cnn(digits.example_input(3)).shape == (3, 10)


def test_classifier_outputs_untouched_and_ignore(digits):
    model = random_bn_resnet(16)
    fc_before = model.fc.weight.detach().clone()
    report = structured_prune(model, digits.example_input(2), ratio=0.5,
                              ignore=["layers.0.conv1"])
    assert report.classifier == "fc" and model.fc.out_features == 10
    # the classifier keeps its rows; only the columns of removed input channels go
    kept = kept_rows(fc_before.T, model.fc.weight.detach().T)
    assert len(kept) == 16
    assert model.layers[0].conv1.out_channels == 16  # ignored
    assert "layers.0.conv1" in report.ignored

    opened = random_bn_resnet(16)
    structured_prune(opened, digits.example_input(2), ratio=0.5, prune_classifier=True)
    assert opened.fc.out_features < 10  # what prune_classifier means: the output width changes

    with pytest.raises(ConfigError, match="ignore pattern 'layer9.\\*' matches no layer"):
        structured_prune(random_bn_resnet(), digits.example_input(2), ratio=0.5, ignore=["layer9.*"])


def test_round_to_per_layer_and_iterative(digits):
    def widths(model):
        return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, CONVS)}

    plain = random_bn_resnet(16)
    structured_prune(plain, digits.example_input(2), ratio=0.3)
    assert any(w % 4 for w in widths(plain).values()), widths(plain)  # 16 * 0.7 -> 11

    rounded = random_bn_resnet(16)
    structured_prune(rounded, digits.example_input(2), ratio=0.3, round_to=4)
    assert all(w % 4 == 0 for w in widths(rounded).values()), widths(rounded)
    assert widths(rounded)["stem.0"] == 8 and widths(rounded)["layers.1.conv1"] == 20

    custom = random_bn_resnet(16)
    structured_prune(custom, digits.example_input(2), ratio=0.5, per_layer={"layers.1.conv1": 0.75})
    assert widths(custom)["layers.1.conv1"] == 8 and widths(custom)["layers.0.conv1"] == 8

    stepped = random_bn_resnet(16)
    structured_prune(stepped, digits.example_input(2), ratio=0.5, iterative_steps=3)
    one_shot = random_bn_resnet(16)
    structured_prune(one_shot, digits.example_input(2), ratio=0.5)
    assert widths(stepped) == widths(one_shot)


@pytest.mark.parametrize("importance", ["taylor", "lamp", "random"])
def test_other_criteria_run(digits, trained, importance):
    model = copy.deepcopy(trained)
    report = structured_prune(model, digits.example_input(2), importance=importance, ratio=0.5,
                              global_pruning=importance == "lamp",
                              calibration=digits.calibration, calibration_batches=1)
    assert report.channels_after < report.channels_before
    assert report.calibration_samples == (64 if importance == "taylor" else 0)
    assert model(digits.example_input(4)).shape == (4, 10)
    assert all(p.grad is None for p in model.parameters())


# --- the Hessian trap ------------------------------------------------------------------


def test_squared_gradients_are_per_sample(trained, digits):
    """E[g^2] is the mean of each sample's own squared gradient, not (E[g])^2 nor the last."""
    model = copy.deepcopy(trained)
    inputs, targets = next(iter(digits.calibration))
    inputs, targets = inputs[:12], targets[:12]
    fisher, seen = squared_gradient_mean(model, [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])])
    assert seen == 12
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for x, y in zip(inputs, targets):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        for total, p in zip(expected, params):
            total += p.grad ** 2 / 12
    for p, value in zip(params, expected):
        torch.testing.assert_close(fisher[p], value, rtol=1e-4, atol=1e-9)


def test_hessian_ranking_uses_every_sample(trained, digits):
    import torch_pruning as tp

    model = copy.deepcopy(trained)
    example = digits.example_input(2)
    inputs, targets = next(iter(digits.calibration))
    n = 64
    layer = "layers.1.conv1"  # 16 channels

    def ranking(batches):
        return torch.argsort(channel_importance(model, example, layer, "hessian", batches)).tolist()

    many = ranking([(inputs[:n], targets[:n])])
    first = ranking([(inputs[:1], targets[:1])])
    last = ranking([(inputs[n - 1:n], targets[n - 1:n])])
    assert many != first, "more samples must change the ranking"
    assert many != last, "the ranking must not be the last sample's (torch-pruning's trap)"

    # The trap itself, in torch-pruning 1.6.x: its accumulate_grad, fed n samples, scores the
    # channels by the last sample only. If this fails, upstream fixed it: our workaround
    # (squared_gradient_mean) stays correct either way.
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    module = model.get_submodule(layer)
    group = graph.get_pruning_group(module, tp.prune_conv_out_channels, list(range(16)))
    scorer = tp.importance.GroupHessianImportance()
    losses = nn.functional.cross_entropy(model(inputs[:n]), targets[:n], reduction="none")
    for index, loss in enumerate(losses):
        model.zero_grad()
        loss.backward(retain_graph=index < n - 1)
        scorer.accumulate_grad(model)
    upstream = torch.argsort(scorer(group)).tolist()
    model.zero_grad(set_to_none=True)
    assert upstream == last


# --- through a pipeline, into MLflow and back ---------------------------------------------


def test_pipeline_logs_a_smaller_model_that_reloads(tmp_path, store, digits):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    path = write_pipeline(
        tmp_path,
        [{"name": "baseline", "train": {"epochs": 2, "lr": 0.003}},
         {"name": "slim", "structured_prune": {"importance": "hessian", "ratio": 0.5,
                                               "calibration_batches": 1}},
         {"name": "tuned", "finetune": {"epochs": 1}}],
        model={"source": "zoo:resnet", "args": {"width": 8}},
    )
    ctx = PipelineRunner(validate(path), tracking_uri=store).run()
    assert ctx.results["tuned"].model.fc.in_features == 8  # the finetune trained the small model

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    slim, baseline = by_name["slim"], by_name["baseline"]
    assert slim.info.status == "FINISHED"
    assert slim.data.tags["compressflow.kind"] == "structured_prune"
    assert slim.data.params["importance"] == "hessian"
    figures, before = slim.data.metrics, baseline.data.metrics
    assert figures["params_total"] < before["params_total"] / 2
    assert figures["macs"] < before["macs"] / 2
    assert figures["size_bytes"] < before["size_bytes"]
    assert figures["channels_after"] < figures["channels_before"]
    assert figures["calibration_samples"] == 64

    mlflow.set_tracking_uri(store)
    model = mlflow.pytorch.load_model(slim.data.tags["compressflow.model_uri"])
    assert isinstance(model, ResNet) and model.layers[1].conv2.out_channels == 8
    assert accuracy(model.eval(), digits.val) == pytest.approx(figures["accuracy"], abs=1e-9)

    artifacts = {a.path for a in client.list_artifacts(slim.info.run_id)}
    assert {"structured_layers.md", "notes.txt"} <= artifacts
    table = open(client.download_artifacts(slim.info.run_id, "structured_layers.md", str(tmp_path))).read()
    assert "| layers.1.conv2 | 16 x 16 x 3 x 3 | 8 x 8 x 3 x 3 |" in table
    assert "| fc (classifier) | 10 x 16 | 10 x 8 |" in table


@pytest.mark.parametrize("params, words", [
    ({"ratio": 1.0}, ["ratio", "less than 1"]),
    ({"ratio": 0.5, "importance": "l1"}, ["importance", "magnitude", "hessian"]),
    ({"ratio": 0.5, "per_layer": {"fc": 1.5}}, ["per_layer", "less than 1"]),
    ({"ratio": 0.5, "round_to": 0}, ["round_to"]),
    ({"ratio": 0.5, "bogus": 1}, ["unknown key 'bogus'"]),
])
def test_bad_params_named_before_anything_runs(tmp_path, params, words):
    from compressflow.engine import validate

    path = write_pipeline(tmp_path, [{"structured_prune": params}],
                          model={"source": "zoo:resnet", "args": {"width": 8}})
    with pytest.raises(ConfigError) as error:
        validate(path)
    text = str(error.value)
    assert "stage '0-structured_prune' (structured_prune/depgraph)" in text, text
    for word in words:
        assert word in text, text
