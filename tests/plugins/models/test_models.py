"""compressflow_models: the zoo, and the file:, import: and mlflow: sources, through real pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compressflow import DataSpec, SourceContext
from compressflow_data import digits
from compressflow_tasks import accuracy
from compressflow_models import ZooSource, zoo
from tests.conftest import write_pipeline

MLP_ARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}
MLP_SPEC = {"source": "zoo:mlp", "args": MLP_ARGS}
QUIET = {"tracking": {"log_models": False}, "measure": {"latency": False}}
NO_OP = [{"name": "noop", "finetune": {"epochs": 0}}]


@pytest.fixture(scope="module")
def models_store(tmp_path_factory) -> str:
    """One sqlite store for this module's pipelines (each runs under its own experiment)."""
    return f"sqlite:///{tmp_path_factory.mktemp('models-store') / 'mlflow.db'}"


def run(path: Path, uri: str):
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    return PipelineRunner(validate(path), tracking_uri=uri).run()


def line_of(path: Path, text: str) -> int:
    """1-based line of the first line of ``path`` containing ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def trained_mlp() -> nn.Module:
    """A 64-32-10 MLP trained by hand (plain torch) on digits: far better than chance."""
    torch.manual_seed(0)
    model = zoo.MLP(**MLP_ARGS)
    bundle = digits(DataSpec(dataset="digits"), 0, model.input_shape)
    inputs, targets = bundle.train.dataset.tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    model.eval()
    assert accuracy(model, bundle.val) > 0.9
    return model


# --- the zoo ------------------------------------------------------------------------------

ZOO = [
    ("mlp", {"in_features": 64, "hidden": [32, 16], "num_classes": 10}, (64,)),
    ("cnn", {"channels": [4, 8], "hidden": 16, "num_classes": 10}, (1, 8, 8)),
    ("resnet", {"width": 4, "blocks": [1, 1], "num_classes": 10}, (1, 8, 8)),
    ("mlp", {"num_classes": 3}, (64,)),
    ("cnn", {"num_classes": 3}, (1, 8, 8)),
    ("resnet", {"num_classes": 3}, (1, 8, 8)),
]


@pytest.mark.parametrize(("name", "args", "shape"), ZOO)
def test_zoo_model_builds_and_classifies_digits(tmp_path, name, args, shape):
    source = ZooSource()
    context = SourceContext(base_dir=tmp_path, place="test")
    source.check(name, args, context)
    model = source.load(name, args, context).eval()
    assert model.input_shape == shape
    bundle = digits(DataSpec(dataset="digits", batch_size=32), 0, model.input_shape)
    inputs, _ = next(iter(bundle.val))
    assert tuple(inputs.shape[1:]) == shape
    with torch.no_grad():
        outputs = model(inputs)
    assert outputs.shape == (len(inputs), args["num_classes"])
    assert torch.isfinite(outputs).all()


def test_zoo_args_shape_the_layers():
    mlp = zoo.MLP(64, [32, 16], 10)
    assert [tuple(m.weight.shape) for m in mlp.modules() if isinstance(m, nn.Linear)] == \
        [(32, 64), (16, 32), (10, 16)]
    cnn = zoo.CNN([4, 8], 16, 10)
    assert [m.out_channels for m in cnn.modules() if isinstance(m, nn.Conv2d)] == [4, 8]
    assert [tuple(m.weight.shape) for m in cnn.modules() if isinstance(m, nn.Linear)] == \
        [(16, 8 * 4), (10, 16)]
    resnet = zoo.ResNet(width=4, blocks=[2, 1], num_classes=10)
    assert len(resnet.layers) == 3
    assert resnet.fc.in_features == 8  # the width doubles at the second stage


def _validate_error(cli, path: Path):
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr


def test_unknown_zoo_name_is_refused_at_validate(tmp_path, cli):
    path = write_pipeline(tmp_path, NO_OP, model={"source": "zoo:mlpp", "args": {}})
    error = _validate_error(cli, path)
    assert f"{path}:{line_of(path, 'zoo:mlpp')}" in error
    assert "unknown zoo model 'mlpp'" in error
    assert "cnn, lenet5, mlp, resnet" in error


def test_unknown_zoo_arg_is_refused_at_validate(tmp_path, cli):
    path = write_pipeline(tmp_path, NO_OP, model={"source": "zoo:mlp", "args": {"in_features": 64, "hiden": [32]}})
    error = _validate_error(cli, path)
    assert f"{path}:{line_of(path, 'zoo:mlp')}" in error
    assert "hiden" in error and "in_features" in error  # the wrong arg, and the ones it takes


def test_unknown_zoo_arg_in_a_stage_model_is_refused_at_validate(tmp_path, cli):
    student = {"source": "zoo:cnn", "args": {"chanels": [4, 8]}}
    path = write_pipeline(tmp_path, [{"name": "small", "distill": {"teacher": "input", "student": student}}])
    error = _validate_error(cli, path)
    assert f"{path}:{line_of(path, 'zoo:cnn')}" in error
    assert "chanels" in error


# --- file: --------------------------------------------------------------------------------


def test_state_dict_file_loads_into_its_architecture(tmp_path, models_store, trained_mlp):
    # a path relative to the pipeline's folder, which is not the working folder (tmp_path)
    folder = tmp_path / "pipelines"
    folder.mkdir()
    torch.save(trained_mlp.state_dict(), folder / "weights.pt")
    model = {"source": "file:weights.pt", "args": {"architecture": MLP_SPEC}}
    path = write_pipeline(folder, NO_OP, name="statedict", model=model, **QUIET)
    assert Path.cwd() != folder and not (Path.cwd() / "weights.pt").exists()
    ctx = run(path, models_store)
    loaded = ctx.results["input"].model
    assert isinstance(loaded, zoo.MLP)
    for name, tensor in trained_mlp.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    bundle = digits(DataSpec(dataset="digits"), 0, trained_mlp.input_shape)
    assert ctx.results["input"].metrics["accuracy"] == pytest.approx(accuracy(trained_mlp, bundle.val))
    assert ctx.results["input"].metrics["accuracy"] > 0.9


def test_state_dict_without_architecture_fails_with_exit_2(tmp_path, store, cli, trained_mlp):
    torch.save(trained_mlp.state_dict(), tmp_path / "weights.pt")
    path = write_pipeline(tmp_path, NO_OP, model={"source": "file:weights.pt"})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 2, result.output
    assert "architecture" in result.stderr


def test_state_dict_of_another_shape_fails_with_exit_2(tmp_path, store, cli, trained_mlp):
    torch.save(trained_mlp.state_dict(), tmp_path / "weights.pt")
    wrong = {"source": "zoo:mlp", "args": {**MLP_ARGS, "hidden": [16]}}
    path = write_pipeline(tmp_path, NO_OP, model={"source": "file:weights.pt", "args": {"architecture": wrong}})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 2, result.output
    assert "does not fit its architecture" in result.stderr


def test_pickled_model_is_refused_without_allow_pickle(tmp_path, store, cli, trained_mlp):
    torch.save(trained_mlp, tmp_path / "whole.pt")
    path = write_pipeline(tmp_path, NO_OP, model={"source": f"file:{tmp_path / 'whole.pt'}"})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 2, result.output
    assert "allow_pickle" in result.stderr
    assert "Traceback" not in result.output


def test_pickled_model_loads_with_allow_pickle(tmp_path, models_store, trained_mlp):
    torch.save(trained_mlp, tmp_path / "whole.pt")
    model = {"source": f"file:{tmp_path / 'whole.pt'}", "allow_pickle": True}
    path = write_pipeline(tmp_path, NO_OP, name="pickled", model=model, **QUIET)
    ctx = run(path, models_store)
    bundle = digits(DataSpec(dataset="digits"), 0, trained_mlp.input_shape)
    assert ctx.results["input"].metrics["accuracy"] == pytest.approx(accuracy(trained_mlp, bundle.val))


def test_missing_model_file_is_refused_at_validate(tmp_path, cli):
    path = write_pipeline(tmp_path, NO_OP, model={"source": "file:nowhere.pt", "args": {"architecture": MLP_SPEC}})
    error = _validate_error(cli, path)
    assert f"{path}:{line_of(path, 'file:nowhere.pt')}" in error
    assert "nowhere.pt" in error and "does not exist" in error


# --- import: ------------------------------------------------------------------------------


def test_import_source_calls_the_factory_with_its_args(tmp_path, models_store):
    model = {"source": "import:compressflow_models.zoo:MLP", "args": {"in_features": 64, "hidden": [24], "num_classes": 10}}
    path = write_pipeline(tmp_path, [{"name": "fit", "train": {"epochs": 3, "lr": 0.003}}],
                          name="imported", model=model, **QUIET)
    ctx = run(path, models_store)
    built = ctx.results["input"].model
    assert isinstance(built, zoo.MLP)
    assert [tuple(m.weight.shape) for m in built.modules() if isinstance(m, nn.Linear)] == \
        [(24, 64), (10, 24)]
    assert ctx.results["fit"].metrics["accuracy"] > 0.6


def test_import_source_with_a_missing_module_is_refused_at_validate(tmp_path, cli):
    path = write_pipeline(tmp_path, NO_OP, model={"source": "import:no_such_package_xyz.models:Net"})
    error = _validate_error(cli, path)
    assert "no_such_package_xyz" in error


# --- mlflow: ------------------------------------------------------------------------------


def test_mlflow_source_continues_from_a_stage_of_an_earlier_run(tmp_path, models_store):
    from mlflow.tracking import MlflowClient

    from compressflow_models import MlflowSource

    first = write_pipeline(tmp_path, [{"name": "base", "train": {"epochs": 4, "lr": 0.003}}],
                           name="earlier", measure={"latency": False})
    earlier = run(first, models_store)
    client = MlflowClient(models_store)
    experiment = client.get_experiment_by_name("earlier")
    (stage_run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'base'")
    logged = stage_run.data.metrics["accuracy"]
    assert logged == pytest.approx(earlier.results["base"].metrics["accuracy"])

    model_uri = f"runs:/{stage_run.info.run_id}/model"
    second = write_pipeline(tmp_path, NO_OP, name="later", model={"source": f"mlflow:{model_uri}"}, **QUIET)
    later = run(second, models_store)
    assert later.results["input"].metrics["accuracy"] == pytest.approx(logged)
    for name, tensor in earlier.results["base"].model.state_dict().items():
        assert torch.equal(later.results["input"].model.state_dict()[name], tensor), name

    # the address compressflow tags the stage run with loads the same model
    tagged = stage_run.data.tags["compressflow.model_uri"]
    context = SourceContext(base_dir=tmp_path, place="test", tracking_uri=models_store)
    MlflowSource().check(tagged, {}, context)
    again = MlflowSource().load(tagged, {}, context)
    for name, tensor in earlier.results["base"].model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_mlflow_source_with_an_unknown_run_fails_with_exit_2(tmp_path, models_store, cli):
    path = write_pipeline(tmp_path, NO_OP, model={"source": "mlflow:runs:/0123456789abcdef0123456789abcdef/model"})
    result = cli("run", path, "--tracking-uri", models_store, "--quiet")
    assert result.exit_code == 2, result.output
    assert "0123456789abcdef0123456789abcdef" in result.stderr


# --- lenet5 -------------------------------------------------------------------------------


def test_lenet5_is_the_papers_caffe_lenet5(tmp_path):
    source = ZooSource()
    context = SourceContext(base_dir=tmp_path, place="test")
    source.check("lenet5", {"num_classes": 10}, context)
    model = source.load("lenet5", {"num_classes": 10}, context).eval()
    assert model.input_shape == (1, 28, 28)
    assert sum(p.numel() for p in model.parameters()) == 431_080
    assert [type(m).__name__ for m in model.modules() if not list(m.children())] == [
        "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    assert [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))] == \
        [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        outputs = model(images)
        assert outputs.shape == (3, 10)
        assert torch.equal(model(images.flatten(1)), outputs)  # flat 784-feature inputs work too
    assert zoo.LeNet5(num_classes=3)(images).shape == (3, 3)


# --- COMPRESSFLOW_TRUSTED_ONLY ------------------------------------------------------------


@pytest.fixture
def trusted_only(monkeypatch):
    """The switch on for one test."""
    monkeypatch.setenv("COMPRESSFLOW_TRUSTED_ONLY", "1")


def _refused(cli, path: Path, text: str, what: str) -> None:
    error = _validate_error(cli, path)
    assert f"{path}:{line_of(path, text)}: {what}" in error, error
    assert "COMPRESSFLOW_TRUSTED_ONLY" in error and "--trusted-only" in error


def test_trusted_only_refuses_an_import_source(tmp_path, cli, trusted_only):
    model = {"source": "import:subprocess:call", "args": {"args": ["touch", str(tmp_path / "ran")]}}
    path = write_pipeline(tmp_path, NO_OP, model=model)
    _refused(cli, path, "import:subprocess", "import: runs code named in the pipeline")
    assert not (tmp_path / "ran").exists()


def test_trusted_only_refuses_the_mlflow_source(tmp_path, cli, trusted_only):
    path = write_pipeline(tmp_path, NO_OP, model={"source": "mlflow:models:/champion/1"})
    _refused(cli, path, "mlflow:", "mlflow: loads a pickled model")


def test_trusted_only_refuses_a_pickled_file_and_a_student_from_import(tmp_path, cli, trusted_only,
                                                                      trained_mlp):
    torch.save(trained_mlp, tmp_path / "whole.pt")
    path = write_pipeline(tmp_path, NO_OP, model={"source": "file:whole.pt", "allow_pickle": True})
    _refused(cli, path, "file:whole.pt", "file: with allow_pickle")
    student = {"source": "import:compressflow_models.zoo:MLP", "args": {"hidden": [8]}}
    path = write_pipeline(tmp_path, [{"distill": {"teacher": "input", "student": student}}], name="student")
    _refused(cli, path, "import:compressflow_models", "import: runs code named in the pipeline")


def test_trusted_only_refuses_an_import_architecture_of_a_state_dict(tmp_path, trusted_only, trained_mlp):
    from compressflow import ConfigError
    from compressflow_models import FileSource

    torch.save(trained_mlp.state_dict(), tmp_path / "weights.pt")
    architecture = {"source": "import:compressflow_models.zoo:MLP", "args": MLP_ARGS}
    with pytest.raises(ConfigError, match="p.yaml:3: import: runs code named in the pipeline"):
        FileSource().check("weights.pt", {"architecture": architecture},
                           SourceContext(base_dir=tmp_path, place="p.yaml:3"))


def test_trusted_only_keeps_the_zoo_and_plain_state_dicts(tmp_path, models_store, trusted_only, trained_mlp):
    torch.save(trained_mlp.state_dict(), tmp_path / "weights.pt")
    model = {"source": "file:weights.pt", "args": {"architecture": MLP_SPEC}}
    path = write_pipeline(tmp_path, NO_OP, name="trusted", model=model, **QUIET)
    ctx = run(path, models_store)
    assert ctx.results["input"].metrics["accuracy"] > 0.9
