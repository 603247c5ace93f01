"""What the datasets from the user's own files share: path checks, splits, targets and the
loaders. The datasets themselves: ``npz`` and ``csv`` in :mod:`compressflow_data.tabular`,
``image-folder`` in :mod:`compressflow_data.images`, ``text`` in :mod:`compressflow_data.text`.

Each is a :class:`compressflow.Dataset`: its ``Params`` are validated with the pipeline
(paths are :data:`~compressflow.DataPath`, so a relative path starts at the pipeline file's
folder), ``check`` finds a missing file or folder before anything runs, and ``load`` reads
the files into memory and builds the loaders. Every split, shuffle and calibration sample
follows the pipeline's seed.

This module imports neither numpy nor torch at import time (validation stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressflow import ConfigError, DataBundle, DataInfo
from compressflow.data import DataContext

if TYPE_CHECKING:
    import numpy as np

TENSOR_TASKS = ("classification", "regression")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VAL_BATCH = 256  # the evaluated split of tensor data is read in large batches (as make_bundle)


# --- checks shared by every dataset -------------------------------------------------------


def require_file(path: Path, ctx: DataContext, key: str, expected: str) -> None:
    """ConfigError naming ``path`` and the pipeline's place unless it is a file."""
    _require(path, ctx, key, expected, folder=False)


def require_folder(path: Path, ctx: DataContext, key: str, expected: str) -> None:
    """ConfigError naming ``path`` and the pipeline's place unless it is a folder."""
    _require(path, ctx, key, expected, folder=True)


def _require(path: Path, ctx: DataContext, key: str, expected: str, *, folder: bool) -> None:
    if path.is_dir() if folder else path.is_file():
        return
    if not path.exists():
        problem = "does not exist"
    else:
        problem = "is a file, not a folder" if folder else "is a folder, not a file"
    raise ConfigError(f"{ctx.place}: data.args.{key}: {path} {problem}",
                      f"{key} is {expected}; a relative path starts at the pipeline's folder "
                      f"({ctx.base_dir})")


# --- arrays to loaders --------------------------------------------------------------------


def fit_shape(shape: tuple[int, ...], ctx: DataContext, name: str) -> tuple[int, ...]:
    """One sample's shape as ``data.shape`` and the model's ``input_shape`` ask for.

    ``flat``: one vector. ``image``: C,H,W (the samples', or the model's of the same size).
    ``auto``: the model's input_shape where it holds as many values, else as stored.
    """
    import math

    size = math.prod(shape)
    wanted = tuple(ctx.input_shape) if ctx.input_shape else None
    fits = wanted is not None and math.prod(wanted) == size
    if ctx.spec.shape == "flat":
        return (size,)
    if ctx.spec.shape == "image":
        if len(shape) == 3:
            return shape
        if fits and len(wanted) == 3:
            return wanted
        raise ConfigError(
            f"{ctx.place}: dataset {name}: samples of shape {list(shape)} have no image shape",
            "store samples as C,H,W, or use a model whose input_shape is C,H,W of the same size, "
            "or set data.shape: flat")
    return wanted if fits else shape


def holdout_split(x: np.ndarray, y: np.ndarray, ctx: DataContext, stratify: bool):
    """``x_train, x_val, y_train, y_val``: ``val_fraction`` held out by the seed."""
    from sklearn.model_selection import train_test_split

    from compressflow_data.loaders import _split_error

    try:
        return train_test_split(x, y, test_size=ctx.spec.val_fraction,
                                stratify=y if stratify else None, random_state=ctx.seed)
    except ValueError as error:
        raise _split_error("val_fraction", ctx.spec.val_fraction, error) from None


def keep_fraction(count: int, ctx: DataContext, labels: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``train_fraction`` of ``count`` training samples kept (stratified by
    ``labels`` where given), sorted; all of them at 1.0."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    from compressflow_data.loaders import _split_error

    rows = np.arange(count)
    if ctx.spec.train_fraction >= 1.0:
        return rows
    try:
        kept, _ = train_test_split(rows, train_size=ctx.spec.train_fraction,
                                   stratify=labels, random_state=ctx.seed)
    except ValueError as error:
        raise _split_error("train_fraction", ctx.spec.train_fraction, error) from None
    return np.sort(kept)


def loaders(train, val, ctx: DataContext, *, val_batch: int, collate=None,
            lengths: list[int] | None = None, **bundle: Any) -> DataBundle:
    """The bundle's three loaders: train shuffled by the seed (in batches of similar
    ``lengths`` when given), calibration ``calibration_batches`` seeded batches of train, val
    in order."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from compressflow_data.batching import LengthGroupedBatches, in_batches

    spec = ctx.spec
    generator = torch.Generator().manual_seed(ctx.seed)
    calibration_size = min(len(train), spec.calibration_batches * spec.batch_size)
    calibration_rows = torch.randperm(len(train), generator=generator)[:calibration_size]
    calibration = Subset(train, calibration_rows.tolist())
    info = bundle.pop("info")
    info.splits = {"train": len(train), "eval": len(val), "calibration": len(calibration)}
    if lengths is None:
        train_loader = DataLoader(train, batch_size=spec.batch_size, shuffle=True,
                                  generator=generator, collate_fn=collate)
    else:
        train_loader = DataLoader(train, collate_fn=collate, batch_sampler=LengthGroupedBatches(
            lengths, spec.batch_size, generator))
    return DataBundle(
        train=train_loader,
        val=in_batches(val, val_batch, collate),
        calibration=DataLoader(calibration, batch_size=spec.batch_size, collate_fn=collate),
        info=info, **bundle)


def class_targets(labels: np.ndarray, what: str, ctx: DataContext) -> tuple[np.ndarray, list[str] | None]:
    """Class indices for ``labels``: integers as they are (0..K-1 expected), anything else
    (strings) as the index of the label among the sorted unique labels, whose names return."""
    import numpy as np

    if labels.dtype.kind in "iu":
        if labels.size and labels.min() < 0:
            raise ConfigError(f"{ctx.place}: {what}: class labels must be 0 or more, found {labels.min()}",
                              "label classes 0..K-1 (or name them with strings)")
        return labels.astype(np.int64), None
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ConfigError(f"{ctx.place}: {what}: classification needs integer class labels, "
                              "found fractional values",
                              "set `task: regression` for real-valued targets")
        return class_targets(labels.astype(np.int64), what, ctx)
    if labels.dtype.kind == "b":
        return labels.astype(np.int64), None
    names = sorted({str(v) for v in labels.tolist()})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[str(v)] for v in labels.tolist()], dtype=np.int64), names


def float_targets(values: np.ndarray, what: str, ctx: DataContext) -> np.ndarray:
    """Regression targets as float32, every one finite."""
    import numpy as np

    try:
        values = values.astype(np.float32)
    except (TypeError, ValueError):
        raise ConfigError(f"{ctx.place}: {what}: regression needs numeric targets (dtype {values.dtype})",
                          "store numbers, or set `task: classification` for class labels") from None
    if not np.all(np.isfinite(values)):
        raise ConfigError(f"{ctx.place}: {what}: targets hold NaN or infinite values",
                          "drop or fill the samples without a target")
    return values


def tensor_bundle(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                  ctx: DataContext, *, name: str, info: DataInfo, standardize: bool = True,
                  per_channel: bool = False, num_classes: int | None = None) -> DataBundle:
    """Features and targets (already split) as a bundle: ``train_fraction`` of train kept
    (stratified for classes), standardized by the whole training split's statistics (per
    feature, or per channel of C,H,W samples), shaped by :func:`fit_shape`."""
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    classification = num_classes is not None
    x_train = x_train.astype(np.float32, copy=False)
    x_val = x_val.astype(np.float32, copy=False)
    if standardize:
        axes = (0, *range(2, x_train.ndim)) if per_channel else (0,)
        mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
        std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
        std[std < 1e-6] = 1.0  # a constant feature must not blow up elsewhere
        x_train = ((x_train - mean) / std).astype(np.float32)
        x_val = ((x_val - mean) / std).astype(np.float32)
    kept = keep_fraction(len(x_train), ctx, y_train if classification else None)
    x_train, y_train = x_train[kept], y_train[kept]
    shape = fit_shape(tuple(x_train.shape[1:]), ctx, name)
    dtype = torch.long if classification else torch.float32

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, *shape),
                             torch.as_tensor(y, dtype=dtype))

    return loaders(tensors(x_train, y_train), tensors(x_val, y_val), ctx, val_batch=VAL_BATCH,
                   num_classes=num_classes, sample_shape=shape, info=info)


def targets_for(y_train: np.ndarray, y_val: np.ndarray, ctx: DataContext, what: str):
    """``(y_train, y_val, num_classes, class_names)`` for the pipeline's task."""
    import numpy as np

    if ctx.task != "classification":
        return (float_targets(y_train, what, ctx), float_targets(y_val, what, ctx), None, None)
    both, names = class_targets(np.concatenate([y_train, y_val]), what, ctx)
    num_classes = len(names) if names else int(both.max()) + 1
    return both[: len(y_train)], both[len(y_train):], num_classes, names


def source_text(paths: list[Path], names: list[str] | None) -> str:
    """``DataInfo.source``: the files, and the class names behind indices 0..K-1 if any."""
    text = ", ".join(map(str, paths))
    return f"{text} (classes: {', '.join(f'{i}={n}' for i, n in enumerate(names))})" if names else text
