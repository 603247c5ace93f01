"""compressflow_data: digits and synthetic, split, shaped and batched as DataSpec says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressflow import ConfigError, DataSpec
from compressflow_data import digits, synthetic
from tests.conftest import write_pipeline

DIGITS_ROWS = 1797


def _tensors(loader):
    """(inputs, labels) of a loader's whole dataset, in storage order."""
    return loader.dataset.tensors


def _class_counts(labels: torch.Tensor, classes: int = 10) -> np.ndarray:
    return np.bincount(labels.numpy(), minlength=classes)


def test_digits_split_is_stratified_and_complete():
    bundle = digits(DataSpec(dataset="digits"), 0, None)
    (x_train, y_train), (x_val, y_val) = _tensors(bundle.train), _tensors(bundle.val)
    assert len(y_train) + len(y_val) == DIGITS_ROWS
    assert len(y_val) == pytest.approx(0.2 * DIGITS_ROWS, abs=1)
    assert bundle.num_classes == 10
    every = _class_counts(torch.cat([y_train, y_val]))
    # stratified: each class holds its share of the validation split, to within one sample
    assert np.all(np.abs(_class_counts(y_val) - every * len(y_val) / DIGITS_ROWS) <= 1)
    # standardized with the training split's statistics
    assert x_train.mean().abs() < 1e-4
    assert x_train.std(dim=0).max() <= 1.0 + 1e-3


def test_digits_split_is_deterministic_by_seed():
    first = digits(DataSpec(dataset="digits"), 3, None)
    again = digits(DataSpec(dataset="digits"), 3, None)
    other = digits(DataSpec(dataset="digits"), 4, None)
    for a, b in zip(_tensors(first.val) + _tensors(first.train), _tensors(again.val) + _tensors(again.train)):
        assert torch.equal(a, b)
    assert not torch.equal(_tensors(first.val)[1], _tensors(other.val)[1])


def test_train_fraction_shrinks_train_stratified_and_keeps_validation_identical():
    full = digits(DataSpec(dataset="digits"), 0, None)
    small = digits(DataSpec(dataset="digits", train_fraction=0.2), 0, None)
    (x_full, y_full), (x_small, y_small) = _tensors(full.train), _tensors(small.train)
    assert len(y_small) == pytest.approx(0.2 * len(y_full), abs=1)
    assert np.all(np.abs(_class_counts(y_small) - 0.2 * _class_counts(y_full)) <= 1)
    # the kept rows are rows of the full training split, standardized the same way
    full_rows = {tuple(row.tolist()) for row in x_full}
    assert all(tuple(row.tolist()) in full_rows for row in x_small)
    for a, b in zip(_tensors(full.val), _tensors(small.val)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("shape", "input_shape", "expected"),
    [
        ("auto", (64,), (64,)),          # an MLP
        ("auto", (1, 8, 8), (1, 8, 8)),  # a CNN
        ("auto", None, (64,)),           # a model that declares nothing
        ("image", None, (1, 8, 8)),
        ("flat", (1, 8, 8), (64,)),
    ],
)
def test_digits_shape_follows_the_model(shape, input_shape, expected):
    bundle = digits(DataSpec(dataset="digits", shape=shape), 0, input_shape)
    flat = digits(DataSpec(dataset="digits", shape="flat"), 0, None)
    for loader in (bundle.train, bundle.val, bundle.calibration):
        inputs, _ = next(iter(loader))
        assert tuple(inputs.shape[1:]) == expected
    assert bundle.sample_shape == expected
    # the same pixels, only reshaped
    assert torch.equal(_tensors(bundle.val)[0].reshape(-1, 64), _tensors(flat.val)[0])


def test_digits_shape_auto_through_a_cnn_pipeline(tmp_path):
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    path = write_pipeline(
        tmp_path, [{"finetune": {"epochs": 0}}],
        model={"source": "zoo:cnn", "args": {"channels": [4, 8], "hidden": 16, "num_classes": 10}},
        tracking={"log_models": False})
    runner = PipelineRunner(validate(path), tracking_uri=f"sqlite:///{tmp_path / 'unused.db'}")
    runner.loader.input_model = runner.loader.build_model(runner.spec.model)
    bundle = runner.loader.data_for(runner.spec.data)
    assert bundle.sample_shape == (1, 8, 8)
    assert next(iter(bundle.train))[0].shape[1:] == (1, 8, 8)


def test_digits_refuses_args_during_validation(tmp_path):
    from compressflow.engine import validate

    path = write_pipeline(tmp_path, [{"finetune": {"epochs": 0}}],
                          data={"dataset": "digits", "args": {"samples": 10}})
    with pytest.raises(ConfigError, match=r"test.yaml:\d+: dataset 'digits': unknown key 'samples'"):
        validate(path)


SYNTHETIC = {"samples": 500, "features": 7, "classes": 3, "informative": 4, "clusters_per_class": 1}


def test_synthetic_is_seeded_and_honours_its_args():
    spec = DataSpec(dataset="synthetic", args=SYNTHETIC)
    first, again, other = synthetic(spec, 1, None), synthetic(spec, 1, None), synthetic(spec, 2, None)
    for a, b in zip(_tensors(first.train) + _tensors(first.val), _tensors(again.train) + _tensors(again.val)):
        assert torch.equal(a, b)
    assert not torch.equal(_tensors(first.val)[0], _tensors(other.val)[0])
    (x_train, y_train), (x_val, y_val) = _tensors(first.train), _tensors(first.val)
    assert len(y_train) + len(y_val) == 500
    assert x_train.shape[1:] == (7,) and first.sample_shape == (7,)
    assert first.num_classes == 3
    assert set(torch.cat([y_train, y_val]).tolist()) == {0, 1, 2}


def test_synthetic_rejects_an_image_shape():
    with pytest.raises(ConfigError, match="flat"):
        synthetic(DataSpec(dataset="synthetic", shape="image"), 0, None)


def test_synthetic_unknown_arg_stops_a_run_with_exit_2(tmp_path, store, cli):
    path = write_pipeline(
        tmp_path, [{"finetune": {"epochs": 0}}],
        model={"source": "zoo:mlp", "args": {"in_features": 20, "hidden": [8], "num_classes": 4}},
        data={"dataset": "synthetic", "args": {"sampels": 100}})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 2, result.output
    assert "sampels" in result.stderr and "test.yaml:" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("batch_size", "batches", "expected"), [(16, 3, 48), (64, 4, 256), (500, 10, None)])
def test_calibration_holds_at_most_batches_times_batch_size(batch_size, batches, expected):
    bundle = digits(DataSpec(dataset="digits", batch_size=batch_size, calibration_batches=batches), 0, None)
    x_train, _ = _tensors(bundle.train)
    expected = expected if expected is not None else len(x_train)  # capped by the split
    seen = [inputs for inputs, _ in bundle.calibration]
    assert sum(len(inputs) for inputs in seen) == expected
    assert len(seen) <= batches
    # calibration samples are training samples, never validation ones
    train_rows = {tuple(row.tolist()) for row in x_train}
    assert all(tuple(row.tolist()) in train_rows for row in torch.cat(seen))


@pytest.mark.parametrize(("field", "value"), [("train_fraction", 0.001), ("val_fraction", 0.001)])
def test_a_split_too_small_for_every_class_is_a_config_error(field, value):
    # 1437 * 0.001 keeps 1 training sample for 10 classes; 1797 * 0.001 holds out 1
    with pytest.raises(ConfigError, match=field):
        digits(DataSpec(dataset="digits", **{field: value}), 0, None)


def test_a_split_too_small_stops_a_run_with_exit_2(tmp_path, store, cli):
    path = write_pipeline(tmp_path, [{"finetune": {"epochs": 0}}],
                          data={"dataset": "digits", "train_fraction": 0.001})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 2, result.output
    assert "train_fraction" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
