"""Stage keys know the files' content, not only their names: a weights file or data file
replaced in place changes the keys, so ``--reuse`` and ``--resume`` cannot hand back results
computed from the old files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from compressflow.engine import validate
from tests.conftest import write_pipeline

MLP3 = {"in_features": 3, "hidden": [8], "num_classes": 3}
TRAIN = [{"name": "base", "train": {"epochs": 1, "lr": 0.01}}]


def write_table(path: Path, shift: float = 0.0) -> Path:
    """A small CSV of three features and a class label; ``shift`` moves every feature."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["f0", "f1", "f2", "label"])
        for row in range(60):
            label = row % 3
            writer.writerow([*(f"{(3.0 if i == label else 0.0) + shift + row % 7 / 10:.2f}"
                               for i in range(3)), label])
    return path


def csv_data(name: str = "table.csv") -> dict:
    return {"dataset": "csv", "batch_size": 16, "args": {"path": name, "label": "label"}}


def keys(path: Path) -> tuple[str, list[str]]:
    plan = validate(path)
    return plan.input_key, [s.key for s in plan.stages]


def test_a_weights_files_bytes_are_in_the_input_key(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights, version 1")
    model = {"source": "file:w.pt", "args": {"architecture": {"source": "zoo:mlp", "args": MLP3}}}
    path = write_pipeline(tmp_path, TRAIN, model=model, data=csv_data())
    write_table(tmp_path / "table.csv")
    before = keys(path)
    assert keys(path) == before  # nothing changed, nothing differs
    weights.write_bytes(b"weights, version 2")  # same name, same size, other bytes
    after = keys(path)
    assert after[0] != before[0] and after[1] != before[1]


def test_a_data_files_bytes_are_in_the_input_key(tmp_path):
    path = write_pipeline(tmp_path, TRAIN, model={"source": "zoo:mlp", "args": MLP3},
                          data=csv_data())
    table = write_table(tmp_path / "table.csv")
    before = keys(path)
    assert keys(path) == before
    write_table(table, shift=0.5)
    assert keys(path)[0] != before[0]


def test_a_stages_own_data_and_student_are_in_its_key_alone(tmp_path):
    write_table(tmp_path / "table.csv")
    other = write_table(tmp_path / "other.csv")
    (tmp_path / "student.pt").write_bytes(b"student, version 1")
    student = {"source": "file:student.pt",
               "args": {"architecture": {"source": "zoo:mlp", "args": MLP3}}}
    stages = [*TRAIN,
              {"name": "own", "finetune": {"epochs": 1}, "data": {"args": {"path": "other.csv",
                                                                          "label": "label"}}},
              {"name": "kd", "distill": {"epochs": 1, "student": student}}]
    path = write_pipeline(tmp_path, stages, model={"source": "zoo:mlp", "args": MLP3},
                          data=csv_data())
    input_key, (base, own, kd) = keys(path)
    write_table(other, shift=0.5)
    changed = keys(path)
    assert changed[0] == input_key and changed[1][0] == base  # the main data did not change
    assert changed[1][1] != own and changed[1][2] != kd  # later keys chain from the changed one
    (tmp_path / "student.pt").write_bytes(b"student, version 2")
    assert keys(path)[1][:2] == changed[1][:2] and keys(path)[1][2] != changed[1][2]


def test_a_missing_file_is_checks_error_not_the_digests(tmp_path, cli):
    path = write_pipeline(tmp_path, TRAIN, model={"source": "zoo:mlp", "args": MLP3},
                          data=csv_data("absent.csv"))
    result = cli("validate", path)
    assert result.exit_code == 2 and "absent.csv" in result.output
    assert "Traceback" not in result.output


def _reused(store: str, experiment: str) -> list[dict[str, bool]]:
    """Per parent run (oldest first): each stage run's name, and whether it was reused."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=100)
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags),
                     key=lambda r: r.info.start_time)
    return [{r.info.run_name: "compressflow.reused_from" in r.data.tags for r in runs
             if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
            for parent in parents]


@pytest.mark.filterwarnings("ignore")
def test_reuse_recomputes_a_stage_whose_data_file_changed(tmp_path, cli, store):
    path = write_pipeline(tmp_path, TRAIN, name="content", model={"source": "zoo:mlp", "args": MLP3},
                          data=csv_data(), measure={"latency": False})
    table = write_table(tmp_path / "table.csv")
    for _ in range(2):
        result = cli("run", path, "--tracking-uri", store, "-q", "--reuse")
        assert result.exit_code == 0, result.output
    write_table(table, shift=0.5)
    result = cli("run", path, "--tracking-uri", store, "-q", "--reuse")
    assert result.exit_code == 0, result.output
    first, same, changed = _reused(store, "content")
    assert first == {"input": False, "base": False}
    assert same == {"input": True, "base": True}  # nothing changed: all reused
    assert changed == {"input": False, "base": False}  # the same names, other data: recomputed
