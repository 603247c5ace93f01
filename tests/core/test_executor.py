"""Sweep executors: register_executors, the locks an executor hands its jobs, the CLI's
--executor/--address errors."""

from __future__ import annotations

import contextlib

import pytest

from compressflow import hookimpl
from compressflow.errors import PluginError
from compressflow.executor import ExecutorOptions, SweepExecutor, run_job
from compressflow.plugins import load_plugins
from compressflow.sweep import plan_variants, run_variants
from tests.conftest import write_pipeline


class InProcess(SweepExecutor):
    """Runs the jobs here, in reverse order, recording every stage key it locks."""

    name = "in-process"
    description = "a test's executor"

    def __init__(self) -> None:
        self.locked: list[str] = []

    @contextlib.contextmanager
    def lock(self, key: str):
        self.locked.append(key)
        yield

    def run(self, jobs, options):
        outcomes = [run_job(job.with_locks(self.lock)) for job in reversed(jobs)]
        return list(reversed(outcomes))


def _sweep(folder):
    stages = [{"name": "base", "train": {"epochs": 1}}, {"name": "cut", "prune": {"sparsity": 0.5}}]
    return write_pipeline(folder, stages, name="ex", measure={"latency": False},
                          sweep={"stages.1.prune.sparsity": [0.3, 0.6]})


def test_a_registered_executor_runs_the_sweep_with_its_own_locks(tmp_path, store):
    executor = InProcess()

    class Plugin:
        @hookimpl
        def register_executors(self, registry):
            registry.add(executor)

    plugins = load_plugins(extra=[("in-process", Plugin())])
    assert plugins.executors.get("in-process") is executor
    assert plugins.executors.providers["local"].distribution == "compressflow"
    path = _sweep(tmp_path)
    variants = plan_variants(path, [], plugins)
    _, outcomes = run_variants(variants, path, [], store, "ex", executor, ExecutorOptions())
    assert [(o.variant, o.status) for o in outcomes] == [(0, "FINISHED"), (1, "FINISHED")]
    # the last variant ran first, so the first one reused the baseline it computed
    assert outcomes[1].computed == ["input", "base", "cut"] and outcomes[0].reused == ["input", "base"]
    keys = [v.plan.input_key for v in variants] + [s.key for v in variants for s in v.plan.stages]
    assert set(executor.locked) == set(keys)

    with pytest.raises(PluginError, match="executor 'in-process' is registered twice"):
        load_plugins(extra=[("a", Plugin()), ("b", Plugin())])


def test_an_executor_must_be_a_named_sweep_executor():
    class Plugin:
        @hookimpl
        def register_executors(self, registry):
            registry.add(object())

    plugins = load_plugins(extra=[("odd", Plugin())], strict=False)
    assert "registered <object" in plugins.broken[0].error and "odd" in plugins.broken[0].entry_point


def test_the_cli_names_an_unknown_executor_and_refuses_one_without_a_sweep(tmp_path, cli):
    result = cli("run", _sweep(tmp_path), "--executor", "rey")
    assert result.exit_code == 2 and "unknown executor 'rey' (did you mean 'ray'?)" in result.stderr
    plain = write_pipeline(tmp_path, [{"train": {"epochs": 1}}])
    result = cli("run", plain, "--executor", "ray")
    assert result.exit_code == 2 and "has no sweep:" in result.stderr
