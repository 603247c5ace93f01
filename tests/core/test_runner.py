"""The runner: equal seeds give equal figures whether stages ran, were reused or resumed;
Ctrl-C and SIGTERM mark the runs KILLED; the parent's status is always the outcome."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, write_pipeline

STAGES = [
    {"name": "base", "train": {"epochs": 3, "lr": 0.01}},
    {"name": "tuned", "finetune": {"epochs": 2, "lr": 0.005}},
    {"name": "cut", "prune": {"method": "magnitude", "sparsity": 0.5, "schedule": "gradual",
                              "steps": 2, "finetune_epochs": 1}},
]
TIMED = ("latency", "speedup", "samples_per_s")  # wall-clock figures: measured again, never equal


def _runs(store: str) -> tuple[list, list]:
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _figures(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if not any(t in k for t in TIMED)}


def _final(store: str) -> dict[str, float]:
    parents, _ = _runs(store)
    latest = max(parents, key=lambda r: r.info.start_time)
    return _figures(latest)


def _stage_figures(store: str) -> dict[str, dict[str, float]]:
    _, children = _runs(store)
    return {r.info.run_name: _figures(r) for r in children if r.info.status == "FINISHED"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The pipeline run once, start to end, into a store of its own."""
    folder = tmp_path_factory.mktemp("whole")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    path = write_pipeline(folder, STAGES, name="p")
    from typer.testing import CliRunner

    from compressflow.cli import app

    result = CliRunner().invoke(app, ["run", str(path), "--tracking-uri", store, "-q"])
    assert result.exit_code == 0, result.output
    return store


def test_a_rerun_with_the_same_seed_gives_identical_figures(tmp_path, cli, uninterrupted):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_pipeline(tmp_path, STAGES, name="p")
    assert cli("run", path, "--tracking-uri", store, "-q").exit_code == 0
    assert _stage_figures(store) == _stage_figures(uninterrupted)
    assert _final(store) == _final(uninterrupted)


def test_a_reused_stage_leaves_later_stages_as_a_fresh_run_computes_them(tmp_path, cli, uninterrupted):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = write_pipeline(tmp_path, STAGES[:1], name="p")
    assert cli("run", first, "--tracking-uri", store, "-q").exit_code == 0
    whole = write_pipeline(tmp_path, STAGES, name="p")
    result = cli("run", whole, "--tracking-uri", store, "-q", "--reuse")
    assert result.exit_code == 0, result.output
    # the stages after the reused one drew the same batches as in the uninterrupted run
    assert _final(store) == _final(uninterrupted)


def test_a_resumed_run_ends_with_the_figures_of_an_uninterrupted_one(tmp_path, cli, uninterrupted,
                                                                     monkeypatch):
    from compressflow_train import Finetune

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_pipeline(tmp_path, STAGES, name="p")

    def interrupted(self, model, ctx):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Finetune, "run", interrupted)
        result = cli("run", path, "--tracking-uri", store, "-q")
    assert result.exit_code == 130 and "Traceback" not in result.output
    (parent,), children = _runs(store)
    assert parent.info.status == "KILLED"
    assert {r.info.run_name: r.info.status for r in children} == {
        "input": "FINISHED", "base": "FINISHED", "tuned": "KILLED"}
    result = cli("run", path, "--tracking-uri", store, "-q", "--resume")
    assert result.exit_code == 0, result.output
    (resumed,), children = _runs(store)
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    computed = [r.info.run_name for r in children if r.info.status == "FINISHED"]
    assert sorted(computed) == ["base", "cut", "input", "tuned"]  # base and input kept, once
    assert _final(store) == _final(uninterrupted)
    assert _stage_figures(store) == _stage_figures(uninterrupted)


def test_resume_without_an_unfinished_run_starts_one(tmp_path, cli, store):
    path = write_pipeline(tmp_path, STAGES[:1], name="p")
    result = cli("run", path, "--tracking-uri", store, "-q", "--resume")
    assert result.exit_code == 0 and "no unfinished run" in result.stderr


def _finished_runs(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as connection:
            return connection.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:  # the store is being created
        return 0


def test_sigterm_marks_the_runs_killed_and_resume_completes_them(tmp_path, uninterrupted):
    db = tmp_path / "mlflow.db"
    store = f"sqlite:///{db}"
    path = write_pipeline(tmp_path, STAGES, name="p")
    command = [sys.executable, "-m", "compressflow", "run", str(path), "--tracking-uri", store, "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _finished_runs(db) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # input and base are logged: the run is inside a later stage
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    (parent,), children = _runs(store)
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in children}
    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _final(store) == _final(uninterrupted)


def _failing_summary(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_summary_that_cannot_be_logged_leaves_the_parent_finished(tmp_path, cli, store, monkeypatch):
    monkeypatch.setattr("compressflow.runner.log_summary", _failing_summary)
    path = write_pipeline(tmp_path, STAGES[:1], name="p")
    result = cli("run", path, "--tracking-uri", store, "-q")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "ended FINISHED, but logging the summary: OSError" in result.stderr
    (parent,), children = _runs(store)
    assert parent.info.status == "FINISHED"
    assert {r.info.status for r in children} == {"FINISHED"}
    assert children[0].data.metrics["accuracy"] > 0  # what was logged before stays


def test_a_summary_failure_does_not_replace_a_stage_failure(tmp_path, cli, store, monkeypatch):
    from compressflow_train import Finetune

    monkeypatch.setattr("compressflow.runner.log_summary", _failing_summary)
    monkeypatch.setattr(Finetune, "run", lambda self, model, ctx: 1 / 0)
    path = write_pipeline(tmp_path, STAGES[:2], name="p")
    result = cli("run", path, "--tracking-uri", store, "-q")
    assert result.exit_code == 1
    assert "stage 'tuned' (finetune/supervised" in result.stderr and "ZeroDivisionError" in result.stderr
    assert "warning: pipeline 'p' ended FAILED, but logging the summary" in result.stderr
    (parent,), children = _runs(store)
    assert parent.info.status == "FAILED"
    assert {r.info.run_name: r.info.status for r in children}["tuned"] == "FAILED"


def test_resume_stops_again_where_a_gate_stopped_the_pipeline(tmp_path, cli, store):
    stages = [STAGES[0], {**STAGES[2], "gate": {"min_size_ratio": 1000}}, STAGES[1]]
    path = write_pipeline(tmp_path, stages, name="p")
    assert cli("run", path, "--tracking-uri", store, "-q").exit_code == 3
    result = cli("run", path, "--tracking-uri", store, "-q", "--resume")
    assert result.exit_code == 3 and "kept from the earlier attempt" in result.stderr
    _, children = _runs(store)
    assert "tuned" not in {r.info.run_name for r in children}  # nothing ran past the gate


def test_models_no_later_stage_names_are_dropped_and_named_ones_kept(tmp_path, store):
    from compressflow.engine import validate
    from compressflow.errors import StageFailed
    from compressflow.runner import PipelineRunner
    from tests.conftest import write_pipeline

    stages = [{"name": "teacher", "train": {"epochs": 1}},
              {"name": "pruned", "prune": {"sparsity": 0.5}},
              {"name": "cut", "prune": {"sparsity": 0.7}},
              {"name": "tuned", "finetune": {"epochs": 1, "teacher": "teacher"}},
              {"name": "last", "prune": {"sparsity": 0.8}}]
    path = write_pipeline(tmp_path, stages, name="release", tracking={"log_models": False},
                          measure={"latency": False})
    runner = PipelineRunner(validate(path), tracking_uri=store)
    seen = {}
    original = runner._release

    def spy(done):
        original(done)
        seen[done] = {name for name, model in runner.models.items() if model is not None}

    runner._release = spy
    ctx = runner.run()
    # the teacher is held until the stage that names it has run, then dropped
    assert seen["pruned"] == {"input", "teacher", "pruned"}
    assert seen["cut"] == {"input", "teacher", "cut"}
    assert seen["tuned"] == {"input", "tuned"}
    assert seen["last"] == {"input", "last"}
    assert ctx.results["pruned"].model is None and ctx.results["pruned"].metrics["sparsity"] > 0
    with pytest.raises(StageFailed, match="'pruned' is no longer held in memory"):
        runner.model_at("pruned", "later")
    kept = PipelineRunner(validate(path), tracking_uri=store, keep_models=True).run()
    assert all(result.model is not None for result in kept.results.values())
