"""The example third-party plugin, really pip-installed: found through its entry point, run in
a pipeline into MLflow, and its SVD arithmetic checked on matrices with known spectra."""

from __future__ import annotations

import importlib
import importlib.metadata
import pickle
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_pipeline

PACKAGE = REPO / "examples" / "compressflow-lowrank"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example (no deps, no network) into a target folder put on sys.path.

    It is installed from a copy, so that setuptools' build/ and egg-info never land in the
    checkout. Afterwards the folder leaves sys.path and the package leaves sys.modules.
    """
    source = tmp_path_factory.mktemp("lowrank-src") / "compressflow-lowrank"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("lowrank-site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
         "--disable-pip-version-check", "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    _forget_package()  # an editable install in the venv may have been imported already
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        _forget_package()
        importlib.invalidate_caches()


def _forget_package() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] == "compressflow_lowrank"]:
        del sys.modules[name]


# --- (a) discovery ------------------------------------------------------------------------


def test_entry_point_found_with_its_distribution(installed):
    from compressflow.plugins import load_plugins

    dist = importlib.metadata.distribution("compressflow-lowrank")
    assert dist.version == "0.1.0"
    assert str(installed) in str(dist.locate_file(""))  # the pip-installed copy, not the source

    plugins = load_plugins()
    assert not plugins.broken, [b.describe() for b in plugins.broken]
    assert ("factorize", "svd") in plugins.stages.stages
    provider = plugins.stages.providers[("factorize", "svd")]
    assert (provider.plugin, provider.distribution, provider.version) == \
        ("lowrank", "compressflow-lowrank", "0.1.0")
    assert plugins.stages.default_method("factorize") == "svd"
    stage_class = plugins.stages.stages[("factorize", "svd")]
    assert stage_class.__module__ == "compressflow_lowrank"
    assert sys.modules["compressflow_lowrank"].__file__.startswith(str(installed))


def test_listed_by_compressflow_plugins(installed, cli):
    import json

    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    stages = {(s["kind"], s["method"]): s for s in json.loads(result.stdout)["stages"]}
    entry = stages[("factorize", "svd")]
    assert entry["distribution"] == "compressflow-lowrank" and entry["version"] == "0.1.0"
    assert entry["default"] is True
    assert set(entry["params"]) == {"rank", "energy", "exclude"}


# --- (b) a real pipeline into MLflow ------------------------------------------------------


def test_pipeline_makes_the_model_smaller(installed, cli, store, tmp_path):
    from mlflow.tracking import MlflowClient

    stages = [{"name": "base", "train": {"epochs": 8, "lr": 0.003}},
              {"factorize": {"method": "svd", "rank": 8}}]
    model = {"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [128], "num_classes": 10}}
    path = write_pipeline(tmp_path, stages, name="lowrank", model=model,
                          data={"dataset": "digits", "batch_size": 128})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output + (result.stderr or "")

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("lowrank")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"input", "base", "1-factorize"} <= set(runs)
    base, factorized = runs["base"], runs["1-factorize"]
    assert base.info.status == "FINISHED" and factorized.info.status == "FINISHED"
    before, after = base.data.metrics, factorized.data.metrics
    print(f"\nsize_bytes base={before['size_bytes']:.0f} factorize={after['size_bytes']:.0f}; "
          f"params_total base={before['params_total']:.0f} factorize={after['params_total']:.0f}; "
          f"accuracy base={before['accuracy']:.4f} factorize={after['accuracy']:.4f}")
    assert after["size_bytes"] < before["size_bytes"]
    assert after["params_total"] < before["params_total"]
    # 64->128 at rank 8: 8*(64+128)+128 params; 128->10 at rank 8: 8*(128+10)+10
    assert after["params_total"] == 8 * 192 + 128 + 8 * 138 + 10
    assert after["factorized_layers"] == 2 and after["kept_layers"] == 0
    assert after["accuracy"] > 0.5  # rank 8 of a trained 64-128-10 MLP still classifies digits
    assert factorized.data.params["rank"] == "8"
    assert factorized.data.tags["compressflow.plugin"].startswith("plugin 'lowrank' (compressflow-lowrank 0.1.0")
    artifacts = {a.path for a in client.list_artifacts(factorized.info.run_id)}
    assert "factorize_layers.md" in artifacts
    table = client.download_artifacts(factorized.info.run_id, "factorize_layers.md", str(tmp_path))
    text = open(table).read()
    assert "| layers.0 | 128x64 | 8 |" in text and "| layers.2 | 10x128 | 8 |" in text


# --- (c) energy picks the smallest sufficient rank ------------------------------------------


def _matrix_with_spectrum(values, rows, cols, seed=0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=generator, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("energy, rank", [
    (0.5, 1),        # 16/30 = 0.533 already
    (0.6, 2),        # 25/30 = 0.833
    (25 / 30, 2),    # exactly on the boundary: rank 2 is enough
    (0.84, 3),       # 29/30 = 0.967
    (0.97, 4),
    (1.0, 4),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_energy_picks_smallest_rank(installed, energy, rank, dtype):
    import torch
    from torch import nn

    from compressflow_lowrank.svd import factorize_model, rank_for_energy

    # singular values 4, 3, 2, 1: squares 16, 9, 4, 1 of 30
    weight = _matrix_with_spectrum([4.0, 3.0, 2.0, 1.0], 40, 30)
    spectrum = torch.linalg.svdvals(weight)
    assert torch.allclose(spectrum[:4], torch.tensor([4.0, 3, 2, 1], dtype=torch.float64))
    assert spectrum[4:].abs().max() < 1e-12
    assert rank_for_energy(torch.linalg.svdvals(weight), energy) == rank

    layer = nn.Linear(30, 40).to(getattr(torch, dtype))
    with torch.no_grad():
        layer.weight.copy_(weight)
    model = nn.Sequential(layer)
    x = torch.randn(7, 30, dtype=layer.weight.dtype)
    expected = model(x)
    model, (report,) = factorize_model(model, energy=energy)
    assert report.factorized and report.rank == rank
    assert report.kept_energy == pytest.approx([16 / 30, 25 / 30, 29 / 30, 1.0][rank - 1])
    first, second = model[0]
    assert (first.in_features, first.out_features, first.bias) == (30, rank, None)
    assert (second.in_features, second.out_features) == (rank, 40)
    # the product is the best rank-r approximation: its error is the dropped singular values
    assert first.weight.dtype == second.weight.dtype == layer.weight.dtype
    product = (second.weight @ first.weight).double()
    dropped = torch.tensor([4.0, 3, 2, 1][rank:], dtype=torch.float64)
    assert torch.linalg.matrix_norm(weight - product).item() == pytest.approx(
        dropped.pow(2).sum().sqrt().item(), abs=1e-4)
    assert torch.allclose(second.bias, layer.bias)
    if rank == 4:  # nothing dropped: the same function
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_factorized_model_pickles_without_the_plugin(installed):
    import torch
    from torch import nn

    from compressflow_lowrank.svd import factorize_model

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model, _ = factorize_model(model, rank=4)
    blob = pickle.dumps(model)
    assert b"compressflow_lowrank" not in blob
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in pickle.loads(blob).modules())
    assert isinstance(model[0], nn.Sequential) and isinstance(model[2], nn.Sequential)
    assert model(torch.randn(2, 64)).shape == (2, 10)


# --- (d) layers that would not get smaller are kept ------------------------------------------


def test_layer_not_made_smaller_is_kept(installed, tmp_path):
    import torch
    from torch import nn

    from compressflow import StageContext
    from compressflow_lowrank import FactorizeSVD
    from compressflow_lowrank.svd import factorize_model

    torch.manual_seed(0)
    # rank 5: 64->128 needs 5*192 = 960 < 8192 weights, factorized; 128->10: 690 < 1280,
    # factorized; 10->3: rank clipped to 3, 3*13 = 39 >= 30, kept
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10), nn.ReLU(),
                          nn.Linear(10, 3))
    original_tail = model[4]
    stage = FactorizeSVD("f", FactorizeSVD.Params(rank=5))
    ctx = StageContext(name="f", seed=0, workdir=tmp_path, metric="accuracy",
                       data=None, evaluate=None, model_at=None, build_model=None,
                       log_metric=None, progress=None)
    result = stage.run(model, ctx)
    out = result.model
    assert type(out[4]) is nn.Linear and out[4] is original_tail
    assert isinstance(out[0], nn.Sequential) and isinstance(out[2], nn.Sequential)
    assert result.metrics["factorized_layers"] == 2 and result.metrics["kept_layers"] == 1
    assert any("4 (3x10 at rank 3)" in note for note in result.notes), result.notes
    table = result.artifacts["factorize_layers"].read_text()
    assert "| 4 | 3x10 | full | 1.0000 | 33 | 33 | kept" in table

    # exactly at the break-even point a layer is kept too: r*(in+out) == in*out
    square = nn.Sequential(nn.Linear(8, 8))  # rank 4: 4*16 = 64 = 8*8
    square, (report,) = factorize_model(square, rank=4)
    assert type(square[0]) is nn.Linear and not report.factorized
    square, (report,) = factorize_model(square, rank=3)
    assert isinstance(square[0], nn.Sequential) and report.factorized


def test_excluded_layers_and_linear_subclasses_are_left_alone(installed):
    import torch
    from torch import nn

    from compressflow_lowrank.svd import factorize_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(32, 4, batch_first=True)  # out_proj: a subclass
            self.head = nn.Linear(32, 64)
            self.tail = nn.Linear(64, 64)

        def forward(self, x):
            return self.tail(self.head(self.attention(x, x, x)[0]))

    net = Net()
    net, reports = factorize_model(net, rank=2, exclude=["tail"])
    assert [r.name for r in reports] == ["head"]
    assert isinstance(net.head, nn.Sequential)
    assert type(net.tail) is nn.Linear
    assert isinstance(net.attention.out_proj, nn.Linear)
    assert net(torch.randn(2, 5, 32)).shape == (2, 5, 64)


# --- (e) params: exactly one of rank and energy -------------------------------------------


def test_params_validation(installed):
    from pydantic import ValidationError

    from compressflow_lowrank import FactorizeParams

    assert FactorizeParams().energy == 0.9 and FactorizeParams().rank is None
    assert FactorizeParams(rank=8).energy is None
    with pytest.raises(ValidationError, match="rank or energy, not both"):
        FactorizeParams(rank=8, energy=0.9)
    for bad in ({"rank": 0}, {"energy": 0}, {"energy": 1.5}, {"ranks": 3}):
        with pytest.raises(ValidationError):
            FactorizeParams(**bad)
    # what the engine logs and the resolved pipeline holds validates again to the same
    resolved = FactorizeParams(energy=0.5).model_dump(mode="json")
    assert FactorizeParams.model_validate(resolved) == FactorizeParams(energy=0.5)


def test_validate_rejects_rank_and_energy(installed, cli, tmp_path):
    good = write_pipeline(tmp_path, [{"factorize": {"energy": 0.8}}], name="good")
    result = cli("validate", good)
    assert result.exit_code == 0, result.output
    assert "factorize/svd" in result.stdout

    bad = write_pipeline(tmp_path, [{"factorize": {"method": "svd", "rank": 4, "energy": 0.8}}],
                         name="bad")
    result = cli("validate", bad)
    assert result.exit_code == 2, result.output
    assert "rank or energy, not both" in result.stderr
    assert f"{bad}:" in result.stderr  # names the file and line
    assert "Traceback" not in result.output
