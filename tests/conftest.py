"""Shared fixtures: a real MLflow sqlite store per test, the CLI in-process, small pipelines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# small models train fastest on one thread, and a loaded 2-core machine slows many threads
# down many times over; worker processes (sweeps with --jobs) inherit this too
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Every test on one torch thread, whatever OMP_NUM_THREADS the caller set."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A fresh sqlite tracking URI inside the test's folder (never the working folder's)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the default store and the ./mlruns artifact folder must land in tmp, not the checkout
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cli():
    """Invoke the compressflow CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    from typer.testing import CliRunner

    from compressflow.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def write_pipeline(folder: Path, stages: list, *, name: str = "test", model: dict | None = None,
                   data: dict | None = None, **extra) -> Path:
    """A small pipeline file: digits and a 64-32-10 MLP unless told otherwise."""
    document = {
        "name": name,
        "seed": 0,
        "model": model or {"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [32], "num_classes": 10}},
        "data": data or {"dataset": "digits", "batch_size": 64},
        "measure": {"repeats": 5, "warmup": 1},
        "stages": stages,
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path
