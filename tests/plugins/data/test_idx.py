"""compressflow_data.idx: IDX files read back exactly, found in each layout, every error named.

Every file here is small and synthetic, written with numpy: the real MNIST is never needed.
"""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressflow import ConfigError, DataSpec
from compressflow_data.idx import (
    MNIST_FILES,
    find_idx_files,
    idx_bundle,
    load_idx_split,
    read_idx,
)

CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
         np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` in the IDX format: 0, 0, dtype code, ndim, big-endian dims, big-endian data."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, CODES[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fake_mnist(rng: np.random.Generator, train: int = 30, test: int = 20, side: int = 28):
    """Random images and labels (every class present) shaped like MNIST's."""
    return (rng.integers(0, 256, (train, side, side), dtype=np.uint8),
            rng.permutation(np.arange(train) % 10).astype(np.uint8),
            rng.integers(0, 256, (test, side, side), dtype=np.uint8),
            rng.permutation(np.arange(test) % 10).astype(np.uint8))


def write_mnist(folder: Path, arrays, gz: bool = False) -> dict[str, Path]:
    suffix = ".gz" if gz else ""
    return {name: write_idx(folder / f"{name}{suffix}", array, gz)
            for name, array in zip(MNIST_FILES, arrays)}


# --- read_idx -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_every_dtype(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array, gz)
    back = read_idx(path)
    assert back.shape == (3, 4, 5)
    assert back.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_read_idx_reads_gzip_whatever_the_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "labels-idx1-ubyte"  # no .gz in the name
    path.write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_one_dimension(tmp_path):
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l", labels)), labels)


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        read_idx(path)
    assert str(path) in caught.value.message
    assert caught.value.hint
    return caught.value


def test_truncated_file_is_refused_naming_it(tmp_path):
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(data[:-10])
    assert "truncated" in _error(path).message


def test_truncated_header_is_refused(tmp_path):
    path = tmp_path / "header"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">I", 4))  # 3 dims, only one given
    assert "truncated" in _error(path).message
    path.write_bytes(b"\x00\x00")
    assert "truncated" in _error(path).message


def test_file_longer_than_its_header_is_refused(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)) + b"\x00")
    assert "longer" in _error(path).message


def test_wrong_magic_is_refused(tmp_path):
    path = tmp_path / "png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert "wrong magic" in _error(path).message
    path.write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00")  # no dtype 0x07
    assert "wrong magic" in _error(path).message


def test_truncated_gzip_is_refused(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), dtype=np.uint8)))[:-20])
    assert "gzip" in _error(path).message


def test_truncated_data_inside_gzip_is_refused(tmp_path):
    path = tmp_path / "inner.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8))[:-1]))
    assert "truncated" in _error(path).message


def test_unreadable_path_is_a_config_error(tmp_path):
    assert "cannot be read" in _error(tmp_path / "nowhere").message


# --- find_idx_files / load_idx_split --------------------------------------------------------


@pytest.mark.parametrize("layout", [".", "raw", "MNIST/raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_split_is_found_and_read_back_in_every_layout(tmp_path, layout, gz):
    arrays = fake_mnist(np.random.default_rng(1))
    written = write_mnist(tmp_path / layout, arrays, gz)
    found = find_idx_files(tmp_path)
    assert found == written
    x_train, y_train, x_test, y_test = load_idx_split(tmp_path)
    assert x_train.dtype == np.uint8 and x_train.shape == (30, 28, 28)
    for back, array in zip((x_train, y_train, x_test, y_test), arrays):
        np.testing.assert_array_equal(back, array)


def test_plain_file_is_preferred_to_its_gz(tmp_path):
    arrays = fake_mnist(np.random.default_rng(2))
    write_mnist(tmp_path, arrays, gz=True)
    plain = write_mnist(tmp_path, arrays, gz=False)
    assert find_idx_files(tmp_path) == plain


def test_plain_and_gz_files_mix_in_one_folder(tmp_path):
    arrays = fake_mnist(np.random.default_rng(3))
    for index, (name, array) in enumerate(zip(MNIST_FILES, arrays)):
        write_idx(tmp_path / (name + (".gz" if index % 2 else "")), array, gz=bool(index % 2))
    for back, array in zip(load_idx_split(tmp_path), arrays):
        np.testing.assert_array_equal(back, array)


def test_missing_files_are_named_with_their_folder(tmp_path):
    arrays = fake_mnist(np.random.default_rng(4))
    write_mnist(tmp_path / "raw", arrays)
    (tmp_path / "raw" / MNIST_FILES[3]).unlink()
    (tmp_path / "raw" / MNIST_FILES[1]).unlink()
    with pytest.raises(ConfigError) as caught:
        find_idx_files(tmp_path)
    message = caught.value.message
    assert str(tmp_path / "raw") in message
    assert MNIST_FILES[1] in message and MNIST_FILES[3] in message
    assert MNIST_FILES[0] not in message and MNIST_FILES[2] not in message
    assert "make data" in caught.value.hint and "root:" in caught.value.hint


def test_empty_folder_names_every_file_and_the_layouts(tmp_path):
    with pytest.raises(ConfigError) as caught:
        find_idx_files(tmp_path)
    assert str(tmp_path) in caught.value.message
    assert all(name in caught.value.message for name in MNIST_FILES)
    assert "MNIST/raw" in caught.value.message
    assert "make data" in caught.value.hint


def test_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        find_idx_files(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in caught.value.message
    assert "make data" in caught.value.hint


def test_image_and_label_counts_must_match(tmp_path):
    x_train, y_train, x_test, y_test = fake_mnist(np.random.default_rng(5))
    paths = write_mnist(tmp_path, (x_train, y_train[:-1], x_test, y_test))
    with pytest.raises(ConfigError) as caught:
        load_idx_split(tmp_path)
    assert "30 images" in caught.value.message and "29 labels" in caught.value.message
    assert str(paths[MNIST_FILES[1]]) in caught.value.message


def test_images_must_be_three_dimensional(tmp_path):
    x_train, y_train, x_test, y_test = fake_mnist(np.random.default_rng(6))
    write_mnist(tmp_path, (x_train.reshape(30, -1), y_train, x_test, y_test))
    with pytest.raises(ConfigError, match="rows, cols"):
        load_idx_split(tmp_path)


def test_the_module_does_not_import_torch(tmp_path):
    import subprocess

    code = "import sys, compressflow_data.idx; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={"PYTHONPATH": ":".join(sys.path)})
    assert result.stdout.strip() == "False"


# --- the idx dataset ------------------------------------------------------------------------


def _bundle(spec, seed, input_shape):
    from compressflow_data import IdxParams

    return idx_bundle(spec, IdxParams.model_validate(spec.args), seed, input_shape)


def test_idx_bundle_standardizes_and_keeps_the_official_split(tmp_path):
    arrays = fake_mnist(np.random.default_rng(7), train=40, test=25)
    write_mnist(tmp_path / "mnist" / "MNIST" / "raw", arrays, gz=True)
    spec = DataSpec(dataset="idx", batch_size=8, args={"root": str(tmp_path / "mnist")})
    bundle = _bundle(spec, 0, (784,))
    x_train, y_train = bundle.train.dataset.tensors
    x_val, y_val = bundle.val.dataset.tensors
    assert x_train.shape == (40, 784) and x_val.shape == (25, 784)
    assert bundle.sample_shape == (784,) and bundle.num_classes == 10
    scaled = arrays[0].astype(np.float64) / 255
    mean, std = scaled.mean(), scaled.std()
    np.testing.assert_allclose(x_train.numpy(), ((scaled - mean) / std).reshape(40, -1), atol=1e-5)
    np.testing.assert_allclose(x_val.numpy(), ((arrays[2] / 255 - mean) / std).reshape(25, -1),
                               atol=1e-5)
    np.testing.assert_array_equal(y_val.numpy(), arrays[3])  # the test images, in file order
    assert len(bundle.calibration.dataset) == min(40, spec.calibration_batches * 8)
    image = _bundle(spec, 0, (1, 28, 28))
    assert image.train.dataset.tensors[0].shape == (40, 1, 28, 28)
    assert image.sample_shape == (1, 28, 28)


def test_idx_bundle_shuffles_by_seed(tmp_path):
    write_mnist(tmp_path, fake_mnist(np.random.default_rng(8)))
    spec = DataSpec(dataset="idx", batch_size=30, args={"root": str(tmp_path)})
    first = [next(iter(_bundle(spec, seed, None).train))[1].tolist() for seed in (0, 0, 1)]
    assert first[0] == first[1] and first[0] != first[2]


def test_idx_bundle_train_fraction_is_stratified(tmp_path):
    write_mnist(tmp_path, fake_mnist(np.random.default_rng(9), train=100))
    spec = DataSpec(dataset="idx", train_fraction=0.5, args={"root": str(tmp_path)})
    labels = _bundle(spec, 0, None).train.dataset.tensors[1].numpy()
    assert np.bincount(labels, minlength=10).tolist() == [5] * 10


def test_idx_bundle_holds_out_and_limits(tmp_path):
    write_mnist(tmp_path, fake_mnist(np.random.default_rng(9), train=100, test=30))
    spec = DataSpec(dataset="idx", args={"root": str(tmp_path), "holdout": 20, "test_samples": 12})
    bundle = _bundle(spec, 0, None)
    held = bundle.holdout.dataset.tensors[1].numpy()
    assert len(held) == 20 and np.bincount(held, minlength=10).tolist() == [2] * 10
    assert len(bundle.train.dataset) == 80 and len(bundle.val.dataset) == 12
    assert bundle.info.splits == {"train": 80, "eval": 12, "holdout": 20, "calibration": 80}
    assert len(bundle.info.digest) == 16


def test_idx_args_are_checked_at_their_line_before_anything_runs(tmp_path, cli, store):
    from tests.conftest import write_pipeline

    model = {"source": "zoo:mlp", "args": {"in_features": 784, "hidden": [8], "num_classes": 10}}
    for args, words in [({"root": "nowhere"}, ["MNIST folder", "nowhere", "make data"]),
                        ({"root": ".", "folder": "x"}, ["unknown key 'folder'"]),
                        ({}, ["missing required key 'root'"])]:
        path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}], model=model,
                              data={"dataset": "idx", "args": args})
        result = cli("run", path, "--tracking-uri", store)
        assert result.exit_code == 2, result.output
        assert f"{path}:" in result.stderr and "Traceback" not in result.output
        for word in words:
            assert word in result.stderr, result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_idx_dataset_runs_in_a_pipeline(tmp_path, store):
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner
    from tests.conftest import write_pipeline

    write_mnist(tmp_path / "mnist", fake_mnist(np.random.default_rng(10)))
    path = write_pipeline(
        tmp_path, [{"name": "fit", "train": {"epochs": 1}}], name="idx",
        model={"source": "zoo:lenet5", "args": {"num_classes": 10}},
        data={"dataset": "idx", "batch_size": 16, "args": {"root": "mnist"}},  # from the file's folder
        tracking={"log_models": False}, measure={"latency": False})
    ctx = PipelineRunner(validate(path), tracking_uri=store).run()
    assert 0.0 <= ctx.results["fit"].metrics["accuracy"] <= 1.0
    assert ctx.results["fit"].metrics["params_total"] == 431_080


def test_the_idx_digest_follows_the_four_files_bytes(tmp_path):
    from compressflow_data.idx import idx_digest

    files = write_mnist(tmp_path / "mnist", fake_mnist(np.random.default_rng(0)))
    before = idx_digest(tmp_path / "mnist")
    assert before is not None and idx_digest(tmp_path / "mnist") == before
    data = bytearray(files[MNIST_FILES[3]].read_bytes())
    data[-1] = (data[-1] + 1) % 10  # one test label, size kept
    files[MNIST_FILES[3]].write_bytes(bytes(data))
    assert idx_digest(tmp_path / "mnist") != before
    files[MNIST_FILES[0]].unlink()
    assert idx_digest(tmp_path / "mnist") is None  # missing: check names it, not the digest


def test_shift_moves_training_images_only_and_follows_the_seed(tmp_path):
    arrays = fake_mnist(np.random.default_rng(11), train=40, test=10)
    write_mnist(tmp_path, arrays)
    spec = DataSpec(dataset="idx", batch_size=40, args={"root": str(tmp_path), "shift": 2})
    bundle = _bundle(spec, 0, (1, 28, 28))
    stored = bundle.train.dataset.tensors[0]
    x, y = next(iter(bundle.train))
    order = [int(np.flatnonzero((bundle.train.dataset.tensors[1] == label).numpy())[0]) for label in y]
    assert x.shape == (40, 1, 28, 28) and not np.allclose(x.numpy(), stored.numpy()[order])
    blank = (0.0 - (arrays[0] / 255).mean()) / (arrays[0] / 255).std()
    moved = 0
    for image, label in zip(x, y):  # every batch image is a stored one moved by at most 2 px
        candidates = stored[bundle.train.dataset.tensors[1] == label]
        padded = torch.nn.functional.pad(candidates, (2, 2, 2, 2), value=blank)
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.isclose(padded[:, :, dy:dy + 28, dx:dx + 28], image, atol=1e-5).all((1, 2, 3)).any()]
        assert hits, "an augmented image is no stored image moved by up to 2 pixels"
        moved += (2, 2) not in hits
    assert moved > 20  # most move (1 in 25 is drawn in place)
    np.testing.assert_array_equal(next(iter(bundle.val))[0].numpy(), bundle.val.dataset.tensors[0][:10].numpy())
    bundle.reseed(5)
    again = next(iter(bundle.train))[0]
    bundle.reseed(5)
    assert torch.equal(next(iter(bundle.train))[0], again)  # shifts follow the stage's seed
    flat = next(iter(_bundle(spec, 0, (784,)).train))[0]  # flat samples move as images
    assert flat.shape == (40, 784)
    assert torch.equal(flat.reshape(40, 1, 28, 28), next(iter(_bundle(spec, 0, (1, 28, 28)).train))[0])
