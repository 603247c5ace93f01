"""Plugins come from really installed distributions' entry points; a broken one is named."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    """A real distribution, pip-installed into a folder, whose plugin fails to import."""
    source = tmp_path_factory.mktemp("broken-src")
    (source / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "compressflow-broken"
        version = "9.9"
        [project.entry-points.compressflow]
        broken = "compressflow_broken"
        [tool.setuptools]
        packages = ["compressflow_broken"]
        """))
    (source / "compressflow_broken").mkdir()
    (source / "compressflow_broken" / "__init__.py").write_text("import a_module_nobody_has\n")
    site = tmp_path_factory.mktemp("broken-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)], check=True)
    return site


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
