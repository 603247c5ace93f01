"""quantize/kmeans: at most 2**bits shared nonzero values per layer, zeros kept where they were,
centroids fine-tuned with per-cluster gradients while the weights stay tied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressflow.engine import validate
from compressflow.errors import ConfigError
from compressflow.runner import PipelineRunner
from compressflow_quantize.kmeans import cluster, tie_gradient
from tests.conftest import write_pipeline

FAST = {"measure": {"latency": False}, "tracking": {"log_models": False}}


def _pruned_linear(seed: int, shape=(40, 30), keep=0.3) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < keep)
    return layer


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_cluster_shares_values_and_keeps_zeros(bits):
    layer = _pruned_linear(bits)
    before = layer.weight.detach().clone()
    clustering = cluster(layer.weight, bits, iterations=50)
    clustering.apply(layer.weight)
    after = layer.weight.detach()
    assert torch.equal(after == 0, before == 0)  # same zeros, at the same positions
    distinct = torch.unique(after[after != 0])
    assert 1 < len(distinct) <= 2 ** bits
    # every weight sits on the centroid nearest to its old value (what k-means converges to)
    nonzero = before != 0
    distance = (before[nonzero].unsqueeze(1) - distinct.unsqueeze(0)).abs()
    chosen = (before[nonzero] - after[nonzero]).abs()
    assert torch.all(chosen <= distance.min(dim=1).values + 1e-7)
    # and each centroid is the mean of its members (Lloyd's fixed point)
    for value in distinct:
        members = before[after == value]
        assert abs(float(members.double().mean()) - float(value)) < 1e-6


def test_conv_kernels_are_clustered_too():
    from compressflow_models.zoo import CNN
    from compressflow_quantize.kmeans import clusterable_layers

    torch.manual_seed(0)
    model = CNN(channels=[4, 8], hidden=16)
    layers = clusterable_layers(model, ["*"], ["classifier.3"])
    assert list(layers) == ["features.0", "features.3", "classifier.1"]
    last = model.classifier[3].weight.detach().clone()
    for module in layers.values():
        cluster(module.weight, 2, iterations=20).apply(module.weight)
        weight = module.weight.detach()
        assert weight.shape == module.weight.shape and len(torch.unique(weight)) <= 4
    assert torch.equal(model.classifier[3].weight, last)  # excluded: untouched


def test_lloyd_beats_linear_initialisation():
    layer = _pruned_linear(7)
    values = layer.weight.detach()[layer.weight.detach() != 0]
    linear = cluster(layer.weight, 3, iterations=0)
    lloyd = cluster(layer.weight, 3, iterations=50)

    def error(c):
        return float((values.double() - c.centroids[c.assign]).pow(2).mean())

    assert error(lloyd) < 0.8 * error(linear)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_gradient_hook_shares_each_clusters_gradient(reduce):
    layer = _pruned_linear(3)
    clustering = cluster(layer.weight, 2, iterations=20)
    clustering.apply(layer.weight)
    inputs = torch.randn(16, 30)
    raw = torch.autograd.grad(layer(inputs).pow(2).sum(), layer.weight)[0]
    handle = tie_gradient(layer.weight, clustering, reduce)
    layer(inputs).pow(2).sum().backward()
    handle.remove()
    grad, weight = layer.weight.grad, layer.weight.detach()
    assert torch.all(grad[weight == 0] == 0)
    for value in torch.unique(weight[weight != 0]):
        members = weight == value
        expected = raw[members].double().sum()
        if reduce == "mean":
            expected /= int(members.sum())
        assert torch.allclose(grad[members].double(), expected.expand(int(members.sum())), atol=1e-6)


def _digits_pipeline(tmp_path, stages):
    path = write_pipeline(tmp_path, stages, **FAST)
    return validate(path)


def test_pipeline_finetunes_centroids_and_keeps_them_tied(tmp_path, store):
    from mlflow.tracking import MlflowClient

    plan = _digits_pipeline(tmp_path, [
        {"name": "base", "train": {"epochs": 2, "lr": 0.003}},
        {"name": "cut", "prune": {"sparsity": 0.7}},
        {"name": "shared", "quantize": {"method": "kmeans", "bits": 2, "layer_bits": {"layers.2": 3}}},
        {"name": "tuned", "quantize": {"method": "kmeans", "bits": 2, "layer_bits": {"layers.2": 3},
                                       "finetune_epochs": 2, "lr": 0.003, "bias_fp16": True}},
    ])
    runner = PipelineRunner(plan, tracking_uri=store, keep_models=True)
    ctx = runner.run()
    cut, shared = runner.models["cut"], runner.models["shared"]
    tuned = runner.models["tuned"]
    for name in ("layers.0", "layers.2"):
        zeros = cut.get_submodule(name).weight == 0
        bits = 3 if name == "layers.2" else 2
        for model in (shared, tuned):
            weight = model.get_submodule(name).weight.detach()
            assert torch.equal(weight == 0, zeros), name
            assert len(torch.unique(weight[weight != 0])) <= 2 ** bits
        # tied: the fine-tuned layer partitions its weights exactly as the clustered one did
        # (tuned re-clusters shared's values, which are already shared: same clusters), but
        # the centroids moved
        a = shared.get_submodule(name).weight.detach()
        b = tuned.get_submodule(name).weight.detach()
        pairs = torch.unique(torch.stack([a[a != 0], b[b != 0]]), dim=1)
        assert len(torch.unique(pairs[0])) == len(torch.unique(pairs[1])) == pairs.shape[1]
        assert not torch.equal(a, b)
        bias = tuned.get_submodule(name).bias.detach()
        assert torch.equal(bias.half().float(), bias)  # fp16-representable

    # a plain module again: no gradient hook left behind, same state dict, picklable
    import pickle

    assert type(tuned) is type(cut) and set(tuned.state_dict()) == set(cut.state_dict())
    assert not any(p._backward_hooks for p in tuned.parameters())
    pickle.dumps(tuned)

    metrics = ctx.results["tuned"].metrics
    assert metrics["kmeans_layers"] == 2 and metrics["kmeans_clusters"] <= 4 + 8
    assert metrics["centroid_shift"] > 0
    assert "bias_fp16_accuracy_delta" in metrics and "clustered_accuracy" in metrics
    assert "export/packed" in " ".join(ctx.results["tuned"].notes)
    client = MlflowClient(store)
    run_id = runner.tracker.last_stage_id
    curve = client.get_metric_history(run_id, "val_accuracy")
    assert [m.step for m in curve] == [1, 2]
    assert {"kmeans_layers.md"} <= {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.parametrize("params, words", [
    ({"bits": 9}, ["bits", "less than or equal to 8"]),
    ({"bits": 3, "layer_bits": {"layers.0": 0}}, ["layer_bits", "greater than or equal to 1"]),
    ({"bits": 3, "finetune_epoch": 2}, ["unknown key 'finetune_epoch'"]),
])
def test_bad_params_rejected_before_anything_runs(tmp_path, params, words):
    path = write_pipeline(tmp_path, [{"quantize": {"method": "kmeans", **params}}])
    with pytest.raises(ConfigError) as error:
        validate(path)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_no_matching_layer_is_a_clear_error():
    from compressflow_quantize.kmeans import clusterable_layers

    with pytest.raises(ConfigError, match="match no float Linear or Conv layer") as error:
        clusterable_layers(nn.Sequential(nn.Linear(4, 2)), ["conv*"], [])
    assert "the model's layers: 0" in error.value.hint
