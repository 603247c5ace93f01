"""compressflow_data.tabular: the npz and csv datasets from the user's files.

Every file is written here, small; pipelines run through the CLI into one sqlite store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compressflow import ConfigError
from tests.plugins.data.conftest import (
    MLP3,
    assert_learned,
    assert_one_error,
    final_runs,
    line_of,
    load,
    pipeline,
    write_csv,
    write_npz,
)


# --- whole pipelines, no plugin code -----------------------------------------------------


def test_csv_pipeline_learns_from_a_relative_path(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    write_csv(project / "data" / "train.csv")
    path = pipeline(project, {"dataset": "csv", "batch_size": 32,
                              "args": {"path": "data/train.csv", "label": "animal"}},
                    MLP3, name="csv-blobs")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert_learned(result, shared_store, "csv-blobs")
    assert not (elsewhere / "data").exists()


def test_npz_pipeline_evaluates_on_test_path(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    write_npz(project / "train.npz", 240, seed=1)
    write_npz(project / "test.npz", 90, seed=2)
    path = pipeline(project, {"dataset": "npz", "batch_size": 32,
                              "args": {"path": "train.npz", "test_path": "test.npz",
                                       "x": "features", "y": "labels"}},
                    MLP3, name="npz-blobs")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert_learned(result, shared_store, "npz-blobs")
    # the evaluated split is the test file: all 90 of its samples, none held out of train
    from mlflow.tracking import MlflowClient

    run = final_runs(shared_store, "npz-blobs")["input"]
    inputs = MlflowClient(shared_store).get_run(run.info.run_id).inputs.dataset_inputs
    assert any('"eval_samples": "90"' in d.dataset.source for d in inputs), inputs


# --- bad input: exit 2, one message at its line, no traceback ----------------------------


def test_an_unknown_arg_is_named_at_its_line(tmp_path, elsewhere, cli):
    write_csv(tmp_path / "t.csv", count=30)
    path = pipeline(tmp_path, {"dataset": "csv", "args": {"path": "t.csv", "label": "animal",
                                                          "delimeter": ";"}}, MLP3, name="typo")
    result = cli("validate", path)
    assert_one_error(result, "delimeter", f"{path}:{line_of(path, 'delimeter')}")


def test_a_non_numeric_cell_names_its_row_and_column(tmp_path, elsewhere, cli):
    write_csv(tmp_path / "t.csv", count=60, bad=(17, "n/a"))
    path = pipeline(tmp_path, {"dataset": "csv", "args": {"path": "t.csv", "label": "animal"}},
                    MLP3, name="cell")
    result = cli("run", path, "--tracking-uri", f"sqlite:///{tmp_path / 'db.db'}", "--quiet")
    assert_one_error(result, str(tmp_path / "t.csv"), "row 17", "line 18", "column 'f2'", "'n/a'",
                     f"{path}:")


def test_a_missing_column_is_found_during_validation(tmp_path, elsewhere, cli):
    write_csv(tmp_path / "t.csv", count=30)
    path = pipeline(tmp_path, {"dataset": "csv", "args": {"path": "t.csv", "label": "species"}},
                    MLP3, name="column")
    assert_one_error(cli("validate", path), "'species'", "'animal'")


# --- the datasets directly ---------------------------------------------------------------


def test_csv_string_labels_default_features_and_test_split(tmp_path):
    write_csv(tmp_path / "train.csv", count=60, seed=0)
    write_csv(tmp_path / "test.csv", count=21, seed=1)
    bundle = load("csv", {"path": "train.csv", "label": "animal", "test_path": "test.csv"},
                  tmp_path, batch_size=8, calibration_batches=2)
    x, y = bundle.train.dataset.tensors
    x_val, y_val = bundle.val.dataset.tensors
    assert x.shape == (60, 3) and x_val.shape == (21, 3)  # id (text) is no feature
    assert y.dtype == torch.long and set(y.tolist()) == {0, 1, 2}
    assert y_val.tolist() == [i % 3 for i in range(21)]  # cat=0, dog=1, fox=2, in file order
    assert bundle.num_classes == 3 and bundle.sample_shape == (3,)
    assert x.mean(0).abs().max() < 1e-5  # standardized by the training split
    assert "0=cat" in bundle.info.source and "2=fox" in bundle.info.source
    assert bundle.info.splits == {"train": 60, "eval": 21, "calibration": 16}
    assert sum(len(b[0]) for b in bundle.calibration) == 16


def test_csv_regression_takes_float_targets_and_honours_features(tmp_path):
    rows = [["a", "b", "target"]] + [[str(i), str(2 * i), str(0.5 * i)] for i in range(50)]
    (tmp_path / "r.csv").write_text("\n".join(";".join(r) for r in rows) + "\n")
    bundle = load("csv", {"path": "r.csv", "label": "target", "features": ["b"], "delimiter": ";",
                          "standardize": False}, tmp_path, task="regression", val_fraction=0.2)
    (x, y), (x_val, y_val) = bundle.train.dataset.tensors, bundle.val.dataset.tensors
    assert y.dtype == torch.float32 and bundle.num_classes is None
    assert len(y) == 40 and len(y_val) == 10
    assert torch.allclose(y, x[:, 0] / 4)  # target = b / 4, row for row
    with pytest.raises(ConfigError, match="regression"):
        load("npz", {"path": str(write_regression_npz(tmp_path))}, tmp_path)


def write_regression_npz(folder: Path) -> Path:
    np.savez(folder / "r.npz", x=np.arange(20.0).reshape(10, 2), y=np.linspace(0, 1, 10))
    return folder / "r.npz"


def test_npz_split_is_seeded_stratified_and_train_fraction_kept(tmp_path):
    write_npz(tmp_path / "d.npz", 300, seed=0)
    args = {"path": "d.npz", "x": "features", "y": "labels"}
    full = load("npz", args, tmp_path, val_fraction=0.2)
    again = load("npz", args, tmp_path, val_fraction=0.2)
    small = load("npz", args, tmp_path, val_fraction=0.2, train_fraction=0.5)
    for a, b in zip(full.val.dataset.tensors, again.val.dataset.tensors):
        assert torch.equal(a, b)
    assert np.bincount(full.val.dataset.tensors[1].numpy()).tolist() == [20, 20, 20]
    assert len(small.train.dataset) == 120
    assert np.bincount(small.train.dataset.tensors[1].numpy()).tolist() == [40, 40, 40]
    for a, b in zip(full.val.dataset.tensors, small.val.dataset.tensors):  # eval unchanged
        assert torch.equal(a, b)
    first = [y.tolist() for _, y in load("npz", args, tmp_path).train]
    assert first == [y.tolist() for _, y in load("npz", args, tmp_path).train]  # seeded shuffle
    with pytest.raises(ConfigError, match="no array 'y'") as caught:
        load("npz", {"path": "d.npz", "x": "features"}, tmp_path)
    assert "'features', 'labels'" in caught.value.hint
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="cannot be read as .npz"):
        load("npz", {"path": "text.npz"}, tmp_path)
    regression = load("npz", {"path": str(write_regression_npz(tmp_path))}, tmp_path,
                      task="regression")
    assert regression.train.dataset.tensors[1].dtype == torch.float32
