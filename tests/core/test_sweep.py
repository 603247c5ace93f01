"""Sweeps: expansion, stage reuse (trainings counted), --jobs, dry run, summary run."""

from __future__ import annotations

import pytest

from compressflow.errors import ConfigError
from compressflow.plugins import load_plugins
from compressflow.sweep import expand, plan_variants, reuse_plan
from tests.conftest import write_pipeline


def test_product_and_zip_expansion():
    assert expand({"a": [1, 2], "b": ["x", "y"]}, "here") == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert expand({"a": [1, 2], "b": ["x", "y"], "mode": "zip"}, "here") == [
        {"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(ConfigError, match="one length"):
        expand({"a": [1, 2], "b": ["x"], "mode": "zip"}, "here")
    with pytest.raises(ConfigError, match="non-empty list"):
        expand({"a": 3}, "here")


def _sweep_pipeline(folder, sweep=None, **extra):
    stages = [{"name": "base", "train": {"epochs": 2, "lr": 0.01}},
              {"name": "cut", "prune": {"sparsity": 0.5}},
              {"name": "q", "quantize": {"method": "dynamic-int8"}}]
    sweep = sweep or {"stages.1.prune.sparsity": [0.3, 0.6, 0.9], "stages.2.quantize.exclude": [[], ["layers.2"]]}
    return write_pipeline(folder, stages, name="sw", sweep=sweep,
                          model={"source": "zoo:mlp", "args": {"hidden": [16]}},
                          measure={"latency": False}, **extra)


def _stage_runs(store, experiment="sw"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=500)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags], \
        [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def _finals(parents):
    return {tuple(sorted(p.data.params[k] for k in p.data.params if k.startswith("sweep."))):
            (round(p.data.metrics["accuracy"], 6), p.data.metrics["size_bytes"], p.data.metrics["sparsity"])
            for p in parents if p.data.tags.get("compressflow.kind") != "sweep-summary"}


def test_sweep_trains_shared_stages_once(tmp_path, cli, store):
    path = _sweep_pipeline(tmp_path)
    dry = cli("run", path, "--tracking-uri", store, "--dry-run")
    assert dry.exit_code == 0 and "6 variants (dry run)" in dry.stdout
    variants = plan_variants(path, [], load_plugins())
    fates = reuse_plan(variants, set())
    assert fates[0] == ["run"] * 4
    assert fates[1] == ["reuse: variant 0"] * 3 + ["run"]  # same sparsity as variant 0
    assert fates[2] == ["reuse: variant 0"] * 2 + ["run", "run"]
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output + result.stderr
    children, parents = _stage_runs(store)
    computed = [r for r in children if "compressflow.reused_from" not in r.data.tags]
    names = sorted(r.info.run_name for r in computed)
    assert names.count("base") == 1 and names.count("input") == 1
    assert names.count("cut") == 3 and names.count("q") == 6
    reused = [r for r in children if "compressflow.reused_from" in r.data.tags]
    assert len(reused) == 2 * 5 + 3  # input and base in 5 variants, cut in 3
    origin = {r.info.run_id: r for r in computed}
    for run in reused:
        assert origin[run.data.tags["compressflow.reused_from"]].data.metrics["accuracy"] == \
            run.data.metrics["accuracy"]
    summary = [p for p in parents if p.data.tags.get("compressflow.kind") == "sweep-summary"]
    assert len(summary) == 1 and len(parents) == 7
    variant_runs = [p for p in parents if p not in summary]
    assert {p.data.tags["compressflow.sweep_id"] for p in variant_runs} == {summary[0].data.tags["compressflow.sweep_id"]}
    assert all("[sparsity=" in p.info.run_name for p in variant_runs)
    # a second run of the same sweep reuses everything from the store
    from compressflow.cli.sweeping import _logged_keys

    assert all(fate == ["reuse: store"] * 4 for fate in reuse_plan(variants, _logged_keys(store, "sw")))


def test_jobs_2_gives_the_same_results(tmp_path, cli, store):
    path = _sweep_pipeline(tmp_path, {"stages.1.prune.sparsity": [0.3, 0.9],
                                      "stages.2.quantize.exclude": [[], ["layers.2"]]})
    other = f"sqlite:///{tmp_path / 'parallel.db'}"
    assert cli("run", path, "--tracking-uri", store, "--quiet").exit_code == 0
    result = cli("run", path, "--tracking-uri", other, "--quiet", "--jobs", "2")
    assert result.exit_code == 0, result.output + result.stderr
    serial_children, serial = _stage_runs(store)
    parallel_children, parallel = _stage_runs(other)
    assert _finals(serial) == _finals(parallel) and len(_finals(parallel)) == 4
    computed = [r.info.run_name for r in parallel_children if "compressflow.reused_from" not in r.data.tags]
    assert computed.count("base") == 1 and computed.count("cut") == 2
