"""Plugins come from really installed distributions' entry points; a broken one is named."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from compressflow.plugins import load_plugins
from tests.conftest import REPO, write_pipeline


def test_builtins_come_from_the_compressflow_distribution():
    plugins = load_plugins()
    assert not plugins.broken
    for key in [("train", "supervised"), ("finetune", "supervised"), ("prune", "magnitude"),
                ("quantize", "dynamic-int8"), ("distill", "logits")]:
        provider = plugins.stages.providers[key]
        assert provider.distribution == "compressflow" and provider.version == "0.1.0"
    assert {"zoo", "import", "file", "mlflow"} <= set(plugins.model_sources.names())
    assert {"digits", "synthetic"} <= set(plugins.datasets.names())
    assert {"classification", "regression", "embedding", "causal-lm"} <= set(plugins.tasks.names())
    assert plugins.tasks.providers["classification"].distribution == "compressflow"


def install_plugin(tmp_path_factory, name: str, code: str, version: str = "9.9"):
    """Pip-install a real distribution ``compressflow-<name>`` whose entry point ``name`` is
    the module ``compressflow_<name>`` holding ``code``; returns the folder it went into."""
    module = f"compressflow_{name}"
    source = tmp_path_factory.mktemp(f"{name}-src")
    (source / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "compressflow-{name}"
        version = "{version}"
        [project.entry-points.compressflow]
        {name} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
        """))
    (source / module).mkdir()
    (source / module / "__init__.py").write_text(textwrap.dedent(code))
    site = tmp_path_factory.mktemp(f"{name}-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)], check=True)
    return site


def run_cli(*args, site, cwd=REPO):
    """``python -m compressflow ARGS`` in a fresh process that sees the plugins in ``site``."""
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "-m", "compressflow", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    """A real distribution, pip-installed into a folder, whose plugin fails to import."""
    return install_plugin(tmp_path_factory, "broken", "import a_module_nobody_has\n")


def test_broken_plugin_is_named_and_others_work(broken_site, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_site))
    plugins = load_plugins()
    assert [(b.entry_point, b.distribution) for b in plugins.broken] == [("broken", "compressflow-broken")]
    assert "a_module_nobody_has" in plugins.broken[0].error
    assert ("prune", "magnitude") in plugins.stages.stages


def test_broken_plugin_through_the_cli(broken_site, tmp_path):
    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}, {"wanda": {"sparsity": 0.5}}])
    env = {"PYTHONPATH": str(broken_site), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "compressflow", "validate", str(path)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 2
    assert "warning: plugin 'broken' = 'compressflow_broken' from compressflow-broken failed" in done.stderr
    assert "unknown stage kind 'wanda'" in done.stderr and "some plugins failed to load" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_task_registered_by_a_plugin_feeds_a_whole_pipeline(tmp_path, store):
    """register_tasks: a third party's task (here: accuracy counted over the top 2 logits)."""
    import torch

    from compressflow import Task, TaskMetric, hookimpl
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner
    from tests.conftest import write_pipeline

    class TopTwo(Task):
        name, default_metric = "top-two", "top2"
        metrics = {"top2": TaskMetric(True, description="label among the two highest logits")}

        def loss(self, outputs, targets, reference=None):
            return torch.nn.functional.cross_entropy(outputs, targets)

        def score(self, outputs, targets, reference):
            return {"top2": (outputs.topk(2, dim=1).indices == targets[:, None]).any(1).double()}

    class Plugin:
        @hookimpl
        def register_tasks(self, registry):
            registry.add(TopTwo)

    plugins = load_plugins(extra=[("top-two", Plugin())])
    path = write_pipeline(tmp_path, [{"train": {"epochs": 3}}], task="top-two")
    ctx = PipelineRunner(validate(path, plugins=plugins), tracking_uri=store).run()
    figures = ctx.results["0-train"].metrics
    assert figures["top2"] > 0.8 and "accuracy" not in figures  # the task's metrics, no others
    from compressflow.errors import PluginError

    with pytest.raises(PluginError, match="task 'top-two' is registered twice"):
        load_plugins(extra=[("a", Plugin()), ("b", Plugin())])


# --- a misspelt hook ----------------------------------------------------------------------

WANDA = """\
    from compressflow import Stage, StageParams, StageResult, hookimpl


    class Wanda(Stage):
        kind, method = "wanda", "activation"
        Params = StageParams

        def run(self, model, ctx):
            return StageResult(model)


    @hookimpl
    def register_stage(registry):  # misspelt: the hook is register_stages
        registry.add(Wanda)
    """


@pytest.fixture(scope="module")
def typo_site(tmp_path_factory):
    """A real distribution whose only hook is misspelt."""
    return install_plugin(tmp_path_factory, "typo", WANDA)


def test_a_misspelt_hook_is_a_broken_plugin_with_the_nearest_name(typo_site, monkeypatch):
    monkeypatch.syspath_prepend(str(typo_site))
    plugins = load_plugins()
    (broken,) = plugins.broken
    assert (broken.entry_point, broken.value, broken.distribution) == \
        ("typo", "compressflow_typo", "compressflow-typo")
    assert "unknown hook 'register_stage'" in broken.error
    assert "did you mean 'register_stages'" in broken.error
    assert "typo" not in plugins.providers and ("prune", "magnitude") in plugins.stages.stages


def test_a_misspelt_hook_through_the_cli(typo_site, tmp_path):
    listed = run_cli("plugins", site=typo_site)
    assert listed.returncode == 0, listed.stderr
    assert "broken" in listed.stdout and "register_stage" in listed.stdout
    assert "prune/magnitude" in listed.stdout  # every other plugin still listed

    path = write_pipeline(tmp_path, [{"wanda": {}}])
    done = run_cli("validate", path, site=typo_site)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "warning: plugin 'typo' = 'compressflow_typo' from compressflow-typo" in done.stderr
    assert "unknown stage kind 'wanda'" in done.stderr
    assert "some plugins failed to load" in done.stderr
    assert "did you mean 'register_stages'" in done.stderr


def test_an_unknown_hook_of_an_in_process_observer_is_refused():
    from compressflow import hookimpl
    from compressflow.errors import PluginError

    class Observer:
        @hookimpl
        def stage_ended(self, stage):
            pass

    plugins = load_plugins()
    with pytest.raises(PluginError, match="unknown hook 'stage_ended'.*did you mean 'stage_end'"):
        plugins.add_observer(Observer(), "observer")
    assert plugins.pm.get_plugin("observer") is None


def test_a_misspelt_hook_of_a_dataset_plugin_is_named_when_its_dataset_is_missing(monkeypatch):
    from compressflow import hookimpl
    from compressflow.errors import ConfigError

    class Plugin:
        @hookimpl
        def register_dataset(self, registry):
            raise AssertionError("never called: the hook does not exist")

    plugins = load_plugins(extra=[("mydata", Plugin())])
    assert [b.entry_point for b in plugins.broken] == ["mydata"]
    with pytest.raises(ConfigError) as error:
        plugins.datasets.get("mine", "p.yaml:3")
    assert "unknown hook 'register_dataset'" in error.value.hint


# --- observers cannot break a run ---------------------------------------------------------

OBSERVER = """\
    from compressflow import hookimpl


    @hookimpl
    def stage_end(stage, result):
        raise ZeroDivisionError("the notifier divided by zero")


    @hookimpl
    def stage_progress(stage, step):
        raise KeyError("no such epoch")
    """


def test_an_observer_that_raises_is_a_warning_and_the_run_goes_on(tmp_path_factory, tmp_path):
    site = install_plugin(tmp_path_factory, "notifier", OBSERVER)
    path = write_pipeline(tmp_path, [{"train": {"epochs": 2}}, {"prune": {"sparsity": 0.5}}],
                          measure={"latency": False}, tracking={"log_models": False})
    done = run_cli("run", path, "--quiet", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                   site=site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "1-prune" in done.stdout
    assert "warning: plugin 'notifier' (compressflow-notifier 9.9) failed in stage_end: " \
        "ZeroDivisionError: the notifier divided by zero" in done.stderr
    assert "failed in stage_progress: KeyError" in done.stderr
    # the same failure of the same hook is told once, not once an epoch
    assert done.stderr.count("failed in stage_progress") == 1
    assert done.stderr.count("failed in stage_end") == 1


def test_every_observer_is_called_even_when_one_raises(capsys):
    from compressflow import hookimpl

    seen = []

    class Failing:
        @hookimpl
        def pipeline_end(self, status):
            raise RuntimeError("boom")

    class Recording:
        @hookimpl
        def pipeline_end(self, status):
            seen.append(status)

    plugins = load_plugins(extra=[("recording", Recording()), ("failing", Failing())])
    plugins.pipeline_end(ctx=None, status="FINISHED")
    assert seen == ["FINISHED"]
    err = capsys.readouterr().err
    assert "plugin 'failing'" in err and "pipeline_end" in err and "RuntimeError: boom" in err


def test_registration_hooks_still_fail_loudly():
    """Only observers are shielded: a registrar that raises is a broken plugin, named."""
    from compressflow import hookimpl

    class Plugin:
        @hookimpl
        def register_stages(self, registry):
            raise RuntimeError("cannot register")

    plugins = load_plugins(extra=[("bad", Plugin())])
    assert [(b.entry_point, b.error) for b in plugins.broken] == \
        [("bad", "RuntimeError: cannot register")]


def test_an_interrupt_in_an_observer_is_not_swallowed():
    from compressflow import hookimpl

    class Plugin:
        @hookimpl
        def stage_error(self, error):
            raise KeyboardInterrupt

    plugins = load_plugins(extra=[("ctrl-c", Plugin())])
    with pytest.raises(KeyboardInterrupt):
        plugins.stage_error(stage=None, error=RuntimeError(), ctx=None)


# --- a duplicate registration -------------------------------------------------------------

DUPLICATE = """\
    from compressflow import Stage, StageParams, StageResult, hookimpl


    class Magnitude(Stage):
        kind, method = "prune", "magnitude"
        Params = StageParams


    class Lowest(Stage):
        kind, method = "prune", "lowest"
        Params = StageParams


    @hookimpl
    def register_stages(registry):
        registry.add(Magnitude)
        registry.add(Lowest)
    """


@pytest.fixture(scope="module")
def duplicate_site(tmp_path_factory):
    """A real distribution that registers prune/magnitude again."""
    return install_plugin(tmp_path_factory, "dupe", DUPLICATE)


def test_plugins_lists_a_duplicate_and_everything_else(duplicate_site):
    done = run_cli("plugins", site=duplicate_site)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "stage 'prune/magnitude' is registered twice" in text
    assert "plugin 'dupe' (compressflow-dupe 9.9)" in text and "plugin 'prune' (compressflow" in text
    for stage in ("distill/logits", "quantize/kmeans", "train/supervised", "prune/taylor"):
        assert stage in done.stdout, stage
    listing = json.loads(run_cli("plugins", "--json", site=duplicate_site).stdout)
    (conflict,) = listing["conflicts"]
    assert "dupe" in conflict["message"] and "'prune'" in conflict["message"]
    assert "uninstall one" in conflict["hint"]


def test_run_and_validate_refuse_a_duplicate_naming_both(duplicate_site, tmp_path):
    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}])
    for command in (("validate", path), ("run", path, "--dry-run")):
        done = run_cli(*command, site=duplicate_site)
        assert done.returncode == 2, done.stderr
        assert "stage 'prune/magnitude' is registered twice" in done.stderr
        assert "plugin 'dupe'" in done.stderr and "plugin 'prune'" in done.stderr
        assert "compressflow plugins" in done.stderr and "Traceback" not in done.stderr


def test_load_plugins_collects_conflicts_when_asked():
    from compressflow import hookimpl
    from compressflow.registry import Conflict

    class Plugin:
        @hookimpl
        def register_metrics(self, registry):
            registry.add("top9", lambda model, loader: 0.0)

    plugins = load_plugins(extra=[("a", Plugin()), ("b", Plugin())], strict=False)
    (conflict,) = plugins.conflicts
    assert isinstance(conflict, Conflict) and "metric 'top9' is registered twice" in conflict.message
    assert "top9" in plugins.metrics.names() and not plugins.broken
