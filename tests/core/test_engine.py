"""Validation before anything runs, every bad input named; a failing stage leaves the rest."""

from __future__ import annotations

import pytest

from compressflow.engine import validate
from compressflow.errors import ConfigError
from compressflow.hookspecs import hookimpl
from compressflow.plugins import load_plugins
from compressflow.runner import PipelineRunner
from tests.conftest import write_pipeline


@pytest.mark.parametrize("stages, extra, words", [
    ([{"prun": {"sparsity": 0.5}}], {}, ["unknown stage kind 'prun'", "did you mean 'prune'", "known kinds"]),
    ([{"prune": {"method": "magnitud", "sparsity": 0.5}}], {}, ["unknown prune method 'magnitud'", "did you mean 'magnitude'"]),
    ([{"prune": {"sparsity": "lots"}}], {}, ["stage '0-prune'", "sparsity", "valid number"]),
    ([{"prune": {"sparsity": 1.5}}], {}, ["stage '0-prune'", "sparsity", "less than 1"]),
    ([{"prune": {"sparsity": 0.5, "bogus": 1}}], {}, ["stage '0-prune'", "unknown key 'bogus'"]),
    ([{"train": {"epochs": 1}}], {"model": {"source": "hub:bert"}}, ["unknown model source scheme 'hub'"]),
    ([{"train": {"epochs": 1}}], {"model": {"source": "file:nowhere.pt"}}, ["does not exist"]),
    ([{"train": {"epochs": 1}}], {"data": {"dataset": "mnist"}}, ["unknown dataset 'mnist'", "digits"]),
    ([{"name": "base", "train": {"epochs": 1}}, {"distill": {"teacher": "bse"}}], {},
     ["teacher 'bse' names no earlier stage", "did you mean 'base'"]),
    ([{"distill": {"teacher": "later"}}, {"name": "later", "train": {}}], {}, ["names no earlier stage"]),
    ([{"train": {"epochs": 1}, "data": {"batch_size": 0}}], {}, ["stage '0-train'", "batch_size"]),
    ([{"distill": {"student": {"source": "zoo:transformer"}}}], {}, ["unknown zoo model 'transformer'"]),
    ([{"train": {"epochs": 1}}], {"task": "translation"}, ["unknown task 'translation'", "known: causal-lm"]),
    ([{"train": {"epochs": 1}}], {"task": "embedding", "evaluation": {"metric": "accuracy"}},
     ["metric 'accuracy' for task 'embedding'", "cosine_mean"]),
    ([{"train": {"epochs": 1}}], {"task": "causal-lm", "data": {"dataset": "csv", "args": {"path": "x.csv", "label": "y"}}},
     ["dataset 'csv' serves task(s) classification, regression, not 'causal-lm'"]),
    ([{"structured_prune": {"ratio": 0.5}}], {"task": {"name": "embedding"}},
     ["structured_prune/depgraph serves task(s) classification, not 'embedding'"]),
    ([{"train": {"epochs": 1}}], {"task": {"name": "classification", "window": 5}}, ["task 'classification'", "unknown key 'window'"]),
])
def test_bad_input_named_before_anything_runs(tmp_path, stages, extra, words):
    path = write_pipeline(tmp_path, stages, **extra)
    with pytest.raises(ConfigError) as error:
        validate(path)
    text = str(error.value)
    assert str(path) in text, text
    for word in words:
        assert word in text, text


def test_cli_bad_input_exit_2_without_traceback(tmp_path, cli, store):
    path = write_pipeline(tmp_path, [{"prune": {"sparsity": 2}}])
    result = cli("run", path, "--tracking-uri", store)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}:")
    assert "hint:" in result.stderr and "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran, nothing was logged


def test_set_path_that_does_not_exist(tmp_path, cli):
    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}])
    result = cli("validate", path, "--set", "stages.3.train.epochs=2")
    assert result.exit_code == 2 and "--set stages.3.train.epochs" in result.stderr


class Recorder:
    """An observer plugin, registered in-process, recording the lifecycle hooks it sees."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def pipeline_start(self, ctx):
        self.calls.append(("pipeline_start", ctx.run_id))

    @hookimpl
    def stage_start(self, stage):
        self.calls.append(("stage_start", stage.name))

    @hookimpl
    def stage_progress(self, stage, step, total, metrics):
        self.calls.append(("stage_progress", stage.name, step, total, sorted(metrics)))

    @hookimpl
    def stage_end(self, stage, result):
        self.calls.append(("stage_end", stage.name, "accuracy" in result.metrics))

    @hookimpl
    def stage_error(self, stage, error):
        self.calls.append(("stage_error", stage.name, type(error).__name__))

    @hookimpl
    def pipeline_end(self, ctx, status):
        self.calls.append(("pipeline_end", status, sorted(ctx.results)))


def _run(path, store, recorder):
    plan = validate(path, plugins=load_plugins(extra=[("recorder", recorder)]))
    return PipelineRunner(plan, tracking_uri=store).run()


def test_lifecycle_hooks_in_order(tmp_path, store):
    recorder = Recorder()
    path = write_pipeline(tmp_path, [{"name": "base", "train": {"epochs": 2}},
                                     {"name": "cut", "prune": {"sparsity": 0.5}}])
    ctx = _run(path, store, recorder)
    assert recorder.calls == [
        ("pipeline_start", ctx.run_id),
        ("stage_start", "base"),
        ("stage_progress", "base", 1, 2, ["train_loss", "val_accuracy", "val_loss"]),
        ("stage_progress", "base", 2, 2, ["train_loss", "val_accuracy", "val_loss"]),
        ("stage_end", "base", True),
        ("stage_start", "cut"),
        ("stage_end", "cut", True),
        ("pipeline_end", "FINISHED", ["base", "cut", "input"]),
    ]


def test_failing_stage_keeps_what_was_logged(tmp_path, store, cli):
    from mlflow.tracking import MlflowClient

    # a quantized model has no trainable parameters: finetuning it fails at run time
    path = write_pipeline(tmp_path, [{"name": "base", "train": {"epochs": 2}},
                                     {"name": "q", "quantize": {}},
                                     {"name": "broken", "finetune": {"epochs": 1}},
                                     {"name": "never", "prune": {"sparsity": 0.5}}])
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 1
    assert "stage 'broken' (finetune/supervised" in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {"test": "FAILED", "input": "FINISHED", "base": "FINISHED", "q": "FINISHED",
                      "broken": "FAILED"}
    by_name = {r.info.run_name: r for r in runs}
    error_text = client.download_artifacts(by_name["broken"].info.run_id, "error.txt", str(tmp_path))
    assert "Traceback" in open(error_text).read()
    import mlflow.pytorch

    mlflow.set_tracking_uri(store)
    assert mlflow.pytorch.load_model(by_name["q"].data.tags["compressflow.model_uri"]) is not None


def test_stage_error_hook(tmp_path, store):
    recorder = Recorder()
    path = write_pipeline(tmp_path, [{"quantize": {}}, {"name": "broken", "finetune": {"epochs": 1}}])
    with pytest.raises(Exception):
        _run(path, store, recorder)
    assert ("stage_error", "broken", "ValueError") in recorder.calls
    assert recorder.calls[-1][:2] == ("pipeline_end", "FAILED")


def test_a_metric_registered_for_other_tasks_does_not_fit(tmp_path):
    class Extra:
        @hookimpl
        def register_metrics(self, registry):
            registry.add("bleu", lambda model, loader: 0.0, tasks=("translation",))

    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}], evaluation={"extra": ["bleu"]})
    with pytest.raises(ConfigError, match=r"test.yaml:\d+: metric 'bleu' does not fit task 'classification'"):
        validate(path, plugins=load_plugins(extra=[("extra", Extra())]))


def test_a_stage_serving_other_tasks_is_refused(tmp_path):
    from compressflow import Stage, StageResult

    class OnlyRegression(Stage):
        kind, method, tasks = "shrink", "regression-only", ("regression",)

        def run(self, model, ctx):
            return StageResult(model)

    class Plugin:
        @hookimpl
        def register_stages(self, registry):
            registry.add(OnlyRegression)

    path = write_pipeline(tmp_path, [{"shrink": {}}])
    with pytest.raises(ConfigError, match="shrink/regression-only serves task.s. regression, not 'classification'"):
        validate(path, plugins=load_plugins(extra=[("only", Plugin())]))


class LegacyPlugin:
    """Written against the API before tasks: a factory dataset, a stage, a stage_end observer."""

    def __init__(self):
        self.ended = []

    @hookimpl
    def register_datasets(self, registry):
        def tiny(spec, seed, input_shape):
            from compressflow_data.loaders import make_bundle
            from sklearn.datasets import load_digits

            x, y = load_digits(return_X_y=True)
            return make_bundle(x[:400], y[:400], spec, seed, (64,))

        registry.add("tiny-digits", tiny)

    @hookimpl
    def stage_end(self, stage, result):
        self.ended.append((stage.name, result.metrics["accuracy"]))


def test_plugins_written_before_tasks_keep_working(tmp_path, store):
    legacy = LegacyPlugin()
    path = write_pipeline(tmp_path, [{"train": {"epochs": 5, "lr": 0.01}}],
                          data={"dataset": "tiny-digits", "batch_size": 32, "args": {"anything": 1}})
    plan = validate(path, plugins=load_plugins(extra=[("legacy", legacy)]))
    ctx = PipelineRunner(plan, tracking_uri=store).run()
    assert legacy.ended == [("0-train", ctx.results["0-train"].metrics["accuracy"])]
    assert ctx.results["0-train"].metrics["accuracy"] > 0.5


def test_a_stage_metric_that_collides_with_a_measured_figure_fails_the_stage(tmp_path, store):
    from compressflow import Stage, StageResult
    from compressflow.errors import StageFailed

    class Liar(Stage):
        kind, method = "boast", "size"

        def run(self, model, ctx):
            return StageResult(model, metrics={"size_bytes": 1.0})

    class Plugin:
        @hookimpl
        def register_stages(self, registry):
            registry.add(Liar)

    path = write_pipeline(tmp_path, [{"boast": {}}])
    plan = validate(path, plugins=load_plugins(extra=[("liar", Plugin())]))
    with pytest.raises(StageFailed, match="size_bytes collide with figures the engine measures"):
        PipelineRunner(plan, tracking_uri=store).run()


def test_a_model_that_cannot_take_the_data_is_bad_input_before_any_run(tmp_path, cli, store):
    # a 784-feature model on the 64-feature digits: found before a run is opened, exit 2
    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}],
                          model={"source": "zoo:mlp", "args": {"in_features": 784, "hidden": [8]}})
    result = cli("run", path, "--tracking-uri", store)
    assert result.exit_code == 2, result.output
    assert "the input model cannot run on the data under task 'classification'" in result.stderr
    assert f"{path}:" in result.stderr and "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "mlflow.db").exists()


# --- numbers that train to NaN, and models that cannot be ---------------------------------


@pytest.mark.parametrize("stage, words", [
    ({"train": {"lr": float("inf")}}, ["lr", "finite number"]),
    ({"train": {"lr": float("nan")}}, ["lr", "finite number"]),
    ({"finetune": {"weight_decay": float("inf")}}, ["weight_decay", "finite number"]),
    ({"train": {"epochs": True}}, ["epochs", "not true/false"]),
    ({"distill": {"temperature": 1e-300}}, ["temperature", "greater than or equal to 0.05"]),
    ({"distill": {"temperature": 1e6}}, ["temperature", "less than or equal to 100"]),
    ({"distill": {"method": "features", "layers": {"layers.0": "layers.0"}, "temperature": 1e-300}},
     ["temperature", "greater than or equal to 0.05"]),
    ({"finetune": {"teacher": "input", "temperature": 1e-300}}, ["temperature", "0.05"]),
    ({"prune": {"sparsity": float("nan")}}, ["sparsity"]),
    ({"quantize": {"method": "qat", "lr": float("inf")}}, ["lr", "finite number"]),
])
def test_stage_numbers_are_finite_and_sane(tmp_path, stage, words):
    path = write_pipeline(tmp_path, [stage])
    with pytest.raises(ConfigError) as error:
        validate(path)
    assert f"{path}:" in str(error.value)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_every_stage_params_inherit_the_finite_number_rule():
    from compressflow.stage import StageParams

    for (kind, method), stage_class in load_plugins().stages.stages.items():
        params = stage_class.Params
        assert issubclass(params, StageParams), (kind, method)
        assert params.model_config.get("allow_inf_nan") is False, (kind, method)


@pytest.mark.parametrize("args, words", [
    ({"num_classes": 0}, ["zoo:mlp arg num_classes", "greater than or equal to 1"]),
    ({"in_features": -3}, ["in_features"]),
    ({"hidden": 5}, ["hidden", "valid list"]),
    ({"hidden": [8, True]}, ["hidden"]),
])
def test_zoo_args_that_cannot_build_a_model_are_refused_in_validate(tmp_path, args, words):
    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}], model={"source": "zoo:mlp", "args": args})
    with pytest.raises(ConfigError) as error:
        validate(path)
    assert f"{path}:" in str(error.value)
    for word in words:
        assert word in str(error.value), str(error.value)


def five():
    """A factory that builds no model: what a wrong ``import:`` reference may name."""
    return 5


@pytest.mark.parametrize("source, what", [("import:builtins:dict", "builtins.dict"),
                                          ("import:tests.core.test_engine:five", "builtins.int")])
def test_an_import_factory_that_returns_no_module_is_bad_input(tmp_path, cli, store, source, what):
    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}], model={"source": source})
    result = cli("run", path, "--tracking-uri", store)
    assert result.exit_code == 2, result.output
    assert f"{path}:" in result.stderr and f"returned a {what}, not a torch nn.Module" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args", [{"in_features": 7, "hidden": [8], "num_classes": 10},
                                  {"in_features": 64, "hidden": [8], "num_classes": 0}])
def test_a_model_that_does_not_fit_the_digits_is_exit_2_before_any_run(tmp_path, cli, store, args):
    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}], model={"source": "zoo:mlp", "args": args})
    result = cli("run", path, "--tracking-uri", store)
    assert result.exit_code == 2, result.output
    assert f"{path}:" in result.stderr and "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "mlflow.db").exists()
