"""What the tests of the datasets from the user's files share: small files written in the
test, pipelines run through the CLI into one sqlite store a module, the datasets loaded and
fingerprinted directly."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import yaml

from compressflow import DataContext, DataSpec

if TYPE_CHECKING:
    from torch import nn

CENTERS = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
NAMES = ["cat", "dog", "fox"]


# --- writing the user's files ------------------------------------------------------------


def blobs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian blobs in 3-D (one per class), as float features and labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    return CENTERS[labels] + rng.normal(0, 0.7, (count, 3)), labels


def write_csv(path: Path, count: int = 240, seed: int = 0, bad: tuple[int, str] | None = None) -> Path:
    """A table with an id column (text), three features, string labels; ``bad``: (row, value)
    put in column f2 of that data row."""
    x, labels = blobs(count, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "f0", "f1", "f2", "animal"])
        for row, (features, label) in enumerate(zip(x, labels), start=1):
            cells = [f"s{row}", *(f"{v:.4f}" for v in features), NAMES[label]]
            if bad is not None and bad[0] == row:
                cells[3] = bad[1]
            writer.writerow(cells)
    return path


def write_npz(path: Path, count: int, seed: int) -> Path:
    x, labels = blobs(count, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=x.astype(np.float32), labels=labels)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- pipelines through the CLI -----------------------------------------------------------


def pipeline(folder: Path, data: dict, model: dict, stages: list | None = None, *,
             name: str, **extra) -> Path:
    document = {
        "name": name,
        "seed": 0,
        "model": model,
        "data": data,
        "measure": {"latency": False},
        "tracking": {"log_models": False},
        "stages": stages or [{"name": "baseline", "train": {"epochs": 8, "lr": 0.01}},
                             {"prune": {"sparsity": 0.5}},
                             {"finetune": {"epochs": 2, "lr": 0.005}}],
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def line_of(path: Path, text: str) -> int:
    """The 1-based line of the first line of the pipeline's ``data:`` section that holds ``text``."""
    lines = path.read_text().splitlines()
    start = lines.index("data:")
    return next(i for i, line in enumerate(lines[start:], start + 1) if text in line)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One sqlite store for the module's runs (each pipeline its own experiment)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """Work in a folder other than the pipeline's: relative paths must not start here."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def final_runs(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    return {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def assert_learned(result, uri: str, experiment: str, floor: float = 0.85) -> None:
    assert result.exit_code == 0, result.output
    runs = final_runs(uri, experiment)
    assert set(runs) == {"input", "baseline", "1-prune", "2-finetune"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["input"].data.metrics["accuracy"] < 0.6  # chance is 1/3
    for name in ("baseline", "2-finetune"):
        assert runs[name].data.metrics["accuracy"] >= floor, (name, runs[name].data.metrics)
    assert runs["1-prune"].data.metrics["sparsity"] > 0.3


MLP3 = {"source": "zoo:mlp", "args": {"in_features": 3, "hidden": [16], "num_classes": 3}}


def assert_one_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.count("error:") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# --- the datasets directly ---------------------------------------------------------------


def load(dataset_name: str, args: dict, folder: Path, *, task: str = "classification",
         model: nn.Module | None = None, **spec):
    from compressflow.plugins import load_plugins

    dataset = load_plugins().datasets.get(dataset_name)
    params = dataset.Params.model_validate(args, context={"base_dir": folder})
    ctx = DataContext(DataSpec(dataset=dataset_name, **spec), 0, folder, "p.yaml:4", task,
                      getattr(model, "input_shape", None), model)
    dataset.check(params, ctx)
    return dataset.load(params, ctx)


def digest(dataset_name: str, args: dict, folder: Path, *, task: str = "classification") -> str | None:
    """The dataset's digest after its check, as validation computes it."""
    from compressflow.plugins import load_plugins

    dataset = load_plugins().datasets.get(dataset_name)
    params = dataset.Params.model_validate(args, context={"base_dir": folder})
    ctx = DataContext(DataSpec(dataset=dataset_name), 0, folder, "p.yaml:4", task)
    dataset.check(params, ctx)
    return dataset.digest(params, ctx)
