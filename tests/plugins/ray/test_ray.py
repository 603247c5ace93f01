"""Sweeps on a real local Ray cluster (2 CPUs, started by ``ray start``): the figures of
``--jobs 1``, the shared baseline trained once, failures per variant, Ctrl-C -> KILLED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_pipeline
from tests.core.test_sweep import _stage_runs

pytest.importorskip("ray")

COMPRESSFLOW = str(Path(sys.executable).parent / "compressflow")


@pytest.fixture(scope="module")
def cluster():
    from tests.servers import ray_cluster

    with ray_cluster(num_cpus=2) as address:
        yield address


def _sweep(folder: Path, epochs: int = 2, **sweep) -> Path:
    stages = [{"name": "base", "train": {"epochs": epochs, "lr": 0.01}},
              {"name": "cut", "prune": {"sparsity": 0.5}},
              {"name": "q", "quantize": {"method": "dynamic-int8"}}]
    return write_pipeline(folder, stages, name="sw", model={"source": "zoo:mlp", "args": {"hidden": [16]}},
                          measure={"latency": False},
                          sweep=sweep or {"stages.1.prune.sparsity": [0.3, 0.6, 0.9]})


def _on_ray(path: Path, store: str, address: str, *extra: str, **popen) -> subprocess.Popen:
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    return subprocess.Popen([COMPRESSFLOW, "run", str(path), "--tracking-uri", store, "--quiet",
                             "--executor", "ray", "--address", address, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment, cwd=path.parent, **popen)


def test_a_ray_sweep_gives_the_figures_of_jobs_1_trains_its_baseline_once_and_fails_per_variant(
        tmp_path, cli, store, cluster):
    # the third variant is valid, but its prune finds no layer to prune when it runs
    path = _sweep(tmp_path, **{"stages.1.prune.sparsity": [0.3, 0.6, 0.6],
                               "stages.1.prune.include": [["*"], ["*"], ["no_such_layer*"]], "mode": "zip"})
    assert cli("run", path, "--tracking-uri", store, "--quiet").exit_code == 1
    on_ray = f"sqlite:///{tmp_path / 'ray.db'}"
    process = _on_ray(path, on_ray, cluster)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 1 and "variant 2: " in err and "match no" in err, out + err
    serial_children, serial = _stage_runs(store)
    ray_children, ray_parents = _stage_runs(on_ray)
    assert _outcomes(serial) == _outcomes(ray_parents)
    assert [status for status, _ in _outcomes(ray_parents).values()] == ["FINISHED", "FINISHED", "FAILED"]
    computed = [r.info.run_name for r in ray_children if "compressflow.reused_from" not in r.data.tags]
    assert computed.count("base") == 1 and computed.count("q") == 2


def _outcomes(parents) -> dict:
    """variant -> (status, final figures) of a sweep's variant runs."""
    return {p.data.tags["compressflow.variant"]: (p.info.status, (
        round(p.data.metrics["accuracy"], 6), p.data.metrics["size_bytes"], p.data.metrics["sparsity"])
        if p.info.status == "FINISHED" else None)
        for p in sorted(parents, key=lambda p: p.data.tags.get("compressflow.variant", ""))
        if "compressflow.variant" in p.data.tags}


def test_a_cluster_that_does_not_answer_is_one_clear_message(tmp_path, store):
    from tests.servers import free_port

    path = _sweep(tmp_path)
    process = _on_ray(path, store, f"127.0.0.1:{free_port()}")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2 and "no Ray cluster answers" in err, out + err
    assert "Traceback" not in err


def test_ctrl_c_cancels_the_tasks_and_marks_their_runs_killed(tmp_path, store, cluster):
    from mlflow.tracking import MlflowClient

    path = _sweep(tmp_path, epochs=400, **{"stages.1.prune.sparsity": [0.3, 0.6]})
    # Ctrl-C as a terminal sends it, even where this test runs as a background job (whose
    # SIGINT the shell ignores, and every child with it)
    process = _on_ray(path, store, cluster, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    client = None
    while time.monotonic() < deadline:  # until the baseline trains in a Ray worker
        time.sleep(1)
        assert process.poll() is None, process.communicate()
        if Path(store.removeprefix("sqlite:///")).exists():
            client = client or MlflowClient(store)
            experiment = client.get_experiment_by_name("sw")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if any(r.info.run_name == "base" and r.info.status == "RUNNING" for r in runs):
                break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, out + err
    runs = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert "KILLED" in {r.info.status for r in runs if r.info.run_name == "base"}
