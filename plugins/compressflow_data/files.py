"""Datasets from the user's own files: ``npz``, ``csv``, ``image-folder`` and ``text``.

Each is a :class:`compressflow.Dataset`: its ``Params`` are validated with the pipeline
(paths are :data:`~compressflow.DataPath`, so a relative path starts at the pipeline file's
folder), ``check`` finds a missing file or folder before anything runs, and ``load`` reads
the files into memory and builds the loaders. Every split, shuffle and calibration sample
follows the pipeline's seed.

- ``npz``, ``csv``: arrays of features and a target (classification or regression); the
  evaluated split is ``test_path`` when given, else a ``val_fraction`` held out (stratified
  for classification).
- ``image-folder``: torchvision's ImageFolder layout, one subfolder per class.
- ``text``: lines tokenized by the model's own tokenizer (embedding, causal-lm), or, for
  causal-lm, strided windows over one token stream.

This module imports neither numpy nor torch at import time (validation stays fast).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveInt, model_validator

from compressflow import ConfigError, DataBundle, DataInfo, DataPath, Dataset, DatasetParams
from compressflow.data import DataContext, file_digest
from compressflow.fingerprint import files_digest, listing_digest

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


def loaders(train, val, ctx: DataContext, *, val_batch: int, collate=None, **bundle: Any
            ) -> DataBundle:
    """The bundle's three loaders: train shuffled by the seed, calibration
    ``calibration_batches`` seeded batches of train, val in order."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from compressflow_data.batching import in_batches

    spec = ctx.spec
    generator = torch.Generator().manual_seed(ctx.seed)
    calibration_size = min(len(train), spec.calibration_batches * spec.batch_size)
    calibration_rows = torch.randperm(len(train), generator=generator)[:calibration_size]
    calibration = Subset(train, calibration_rows.tolist())
    info = bundle.pop("info")
    info.splits = {"train": len(train), "eval": len(val), "calibration": len(calibration)}
    return DataBundle(
        train=DataLoader(train, batch_size=spec.batch_size, shuffle=True, generator=generator,
                         collate_fn=collate),
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


# --- npz ----------------------------------------------------------------------------------


class NpzParams(DatasetParams):
    """An .npz of features and targets (``numpy.savez``)."""

    path: DataPath = Field(description="the .npz file (relative: from the pipeline's folder)")
    x: str = Field("x", min_length=1, description="the array of features, one sample per row")
    y: str = Field("y", min_length=1, description="the array of targets (labels or values)")
    test_path: DataPath | None = Field(
        None, description="an .npz with the same arrays, evaluated instead of a val_fraction split")
    standardize: bool = Field(True, description="features scaled by the training split's mean and std")


def npz_names(path: Path, params: NpzParams, ctx: DataContext, key: str) -> list[str]:
    """The arrays an .npz holds (its zip directory only: cheap), ``x`` and ``y`` among them."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = [name.removesuffix(".npy") for name in archive.namelist()]
    except (OSError, zipfile.BadZipFile) as error:
        raise ConfigError(f"{ctx.place}: data.args.{key}: {path} cannot be read as .npz: {error}",
                          "write it with numpy.savez (or savez_compressed)") from None
    missing = [name for name in (params.x, params.y) if name not in names]
    if missing:
        raise ConfigError(
            f"{ctx.place}: {path} holds no array {', '.join(map(repr, missing))}",
            f"it holds {', '.join(map(repr, names)) or 'no arrays'}; "
            "name the arrays with data.args.x and data.args.y")
    return names


def npz_arrays(path: Path, params: NpzParams, ctx: DataContext, key: str):
    """The ``x`` and ``y`` arrays of one file, checked."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in (params.x, params.y) if name not in archive.files]
            if missing:
                raise ConfigError(
                    f"{ctx.place}: {path} holds no array {', '.join(map(repr, missing))}",
                    f"it holds {', '.join(map(repr, archive.files)) or 'no arrays'}; "
                    "name the arrays with data.args.x and data.args.y")
            x, y = archive[params.x], archive[params.y]
    except ConfigError:
        raise
    except (OSError, ValueError) as error:  # not a zip, or object arrays (pickles refused)
        raise ConfigError(f"{ctx.place}: data.args.{key}: {path} cannot be read as .npz: {error}",
                          "write it with numpy.savez of numeric arrays (pickled objects are refused)"
                          ) from None
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim < 2 or len(y) != len(x):
        raise ConfigError(f"{ctx.place}: {path}: '{params.x}' has shape {list(x.shape)} but "
                          f"'{params.y}' has shape {list(y.shape)}",
                          "one row of x per target: x is (N, ...), y is (N,) or (N, k)")
    if x.dtype.kind not in "iufb":
        raise ConfigError(f"{ctx.place}: {path}: '{params.x}' is not numeric (dtype {x.dtype})",
                          "store the features as numbers")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise ConfigError(f"{ctx.place}: {path}: '{params.x}' holds NaN or infinite values",
                          "drop or fill the missing values")
    return x, y


class Npz(Dataset):
    """Arrays from an .npz: ``x`` (N, ...) features and ``y`` (N,) targets; integer labels
    (or strings, numbered in sorted order) for classification, floats for regression."""

    Params = NpzParams
    tasks = TENSOR_TASKS

    def check(self, params: NpzParams, ctx: DataContext) -> None:
        expected = f"an .npz holding arrays '{params.x}' and '{params.y}'"
        for key in ("path", "test_path"):
            path = getattr(params, key)
            if path is not None:
                require_file(path, ctx, key, expected)
                npz_names(path, params, ctx, key)

    def digest(self, params: NpzParams, ctx: DataContext) -> str | None:
        """A sha256 of ``path``'s and ``test_path``'s bytes."""
        return files_digest(p for p in (params.path, params.test_path) if p is not None)

    def load(self, params: NpzParams, ctx: DataContext) -> DataBundle:
        self.check(params, ctx)
        files = [params.path] + ([params.test_path] if params.test_path else [])
        x, y = npz_arrays(params.path, params, ctx, "path")
        what = f"{params.path} '{params.y}'"
        if params.test_path is None:
            # targets first (class indices), so the held-out split is stratified by class
            y, _, num_classes, names = targets_for(y, y[:0], ctx, what)
            x_train, x_val, y_train, y_val = holdout_split(x, y, ctx, num_classes is not None)
        else:
            x_val, y_val = npz_arrays(params.test_path, params, ctx, "test_path")
            if x_val.shape[1:] != x.shape[1:]:
                raise ConfigError(
                    f"{ctx.place}: {params.test_path}: samples of shape {list(x_val.shape[1:])}, "
                    f"but {params.path} has {list(x.shape[1:])}",
                    "the test file must hold samples like the training file's")
            x_train = x
            y_train, y_val, num_classes, names = targets_for(y, y_val, ctx, what)
        info = DataInfo(name=f"npz:{params.path.stem}", digest=file_digest(files),
                        source=source_text(files, names))
        return tensor_bundle(x_train, y_train, x_val, y_val, ctx, name="npz", info=info,
                             standardize=params.standardize, num_classes=num_classes)


# --- csv ----------------------------------------------------------------------------------


class CsvParams(DatasetParams):
    """A CSV table with a header row: one sample per row."""

    path: DataPath = Field(description="the .csv file (relative: from the pipeline's folder)")
    label: str = Field(min_length=1, description="the column of targets (class names or values)")
    features: list[str] | None = Field(
        None, min_length=1, description="the feature columns; default: every other numeric column")
    delimiter: str = Field(",", min_length=1, max_length=1, description="the field separator")
    test_path: DataPath | None = Field(
        None, description="a CSV with the same columns, evaluated instead of a val_fraction split")
    standardize: bool = Field(True, description="features scaled by the training split's mean and std")

    @model_validator(mode="after")
    def _label_is_no_feature(self):
        if self.features is not None and self.label in self.features:
            raise ValueError(f"column '{self.label}' is the label; it cannot be a feature too")
        return self


def csv_header(path: Path, params: CsvParams) -> list[str]:
    """The header row of a CSV file."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as handle:
        return [name.strip() for name in next(csv.reader(handle, delimiter=params.delimiter), [])]


def check_columns(path: Path, params: CsvParams, ctx: DataContext) -> list[str]:
    """The header, with the label and the named features in it."""
    header = csv_header(path, params)
    wanted = [params.label, *(params.features or [])]
    missing = [name for name in wanted if name not in header]
    if missing:
        raise ConfigError(
            f"{ctx.place}: {path} has no column {', '.join(map(repr, missing))}",
            f"its header row names {', '.join(map(repr, header)) or 'nothing'}"
            + ("" if params.delimiter != "," or len(header) > 1
               else "; set data.args.delimiter if the fields are not separated by commas"))
    return header


def csv_columns(path: Path, params: CsvParams, ctx: DataContext) -> tuple[list[str], dict[str, list[str]], list[int]]:
    """Header, every column's cells (strings), and each data row's line in the file."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=params.delimiter)
        header = [name.strip() for name in next(reader, [])]
        columns: dict[str, list[str]] = {name: [] for name in header}
        lines: list[int] = []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue  # a blank line
            if len(row) != len(header):
                raise ConfigError(
                    f"{ctx.place}: {path}, row {len(lines) + 1} (line {reader.line_num}): "
                    f"{len(row)} fields, but the header has {len(header)}",
                    "every row needs one value per header column (quote values that hold the delimiter)")
            lines.append(reader.line_num)
            for name, cell in zip(header, row):
                columns[name].append(cell.strip())
    if not lines:
        raise ConfigError(f"{ctx.place}: {path} has a header but no rows", "add one row per sample")
    return header, columns, lines


def numeric(cells: list[str]) -> np.ndarray | None:
    """The cells as float64 if every one is a finite number, else None."""
    import numpy as np

    try:
        values = np.array(cells, dtype=np.float64)
    except ValueError:
        return None
    return values if np.all(np.isfinite(values)) else None


def numeric_or_error(path: Path, name: str, cells: list[str], lines: list[int], ctx: DataContext,
                     what: str = "feature") -> np.ndarray:
    """A column as float64; the first cell that is no finite number is a ConfigError."""
    import math

    values = numeric(cells)
    if values is not None:
        return values
    for row, (cell, line) in enumerate(zip(cells, lines), start=1):
        try:
            ok = math.isfinite(float(cell))
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(
                f"{ctx.place}: {path}, row {row} (line {line}), column '{name}': "
                f"{cell!r} is not a number",
                f"every {what} value must be a finite number; fix the cell, or list the "
                "numeric columns in data.args.features")
    raise AssertionError("unreachable")  # pragma: no cover


def csv_table(path: Path, params: CsvParams, ctx: DataContext, features: list[str] | None):
    """``(features, x, labels as strings, lines)`` of one file; ``features`` None: every
    numeric column but the label (a column with no number at all is left out)."""
    import numpy as np

    header, columns, lines = csv_columns(path, params, ctx)
    missing = [name for name in [params.label, *(features or [])] if name not in columns]
    if missing:
        raise ConfigError(f"{ctx.place}: {path} has no column {', '.join(map(repr, missing))}",
                          f"its header row names {', '.join(map(repr, header))}")
    if features is None:
        features = [name for name in header if name != params.label
                    and any(_is_number(cell) for cell in columns[name])]
        if not features:
            raise ConfigError(f"{ctx.place}: {path} has no numeric column besides '{params.label}'",
                              "list the feature columns in data.args.features")
    x = np.stack([numeric_or_error(path, name, columns[name], lines, ctx) for name in features],
                 axis=1)
    return features, x, columns[params.label], lines


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


class Csv(Dataset):
    """A CSV table: ``label`` is the target column (class names, integers or values), the
    features every other numeric column or those listed."""

    Params = CsvParams
    tasks = TENSOR_TASKS

    def check(self, params: CsvParams, ctx: DataContext) -> None:
        expected = f"a CSV file whose header row names the column '{params.label}'"
        require_file(params.path, ctx, "path", expected)
        check_columns(params.path, params, ctx)
        if params.test_path is not None:
            require_file(params.test_path, ctx, "test_path", expected)
            check_columns(params.test_path, params, ctx)

    def digest(self, params: CsvParams, ctx: DataContext) -> str | None:
        """A sha256 of ``path``'s and ``test_path``'s bytes."""
        return files_digest(p for p in (params.path, params.test_path) if p is not None)

    def load(self, params: CsvParams, ctx: DataContext) -> DataBundle:
        import numpy as np

        self.check(params, ctx)
        files = [params.path] + ([params.test_path] if params.test_path else [])
        features, x, labels, lines = csv_table(params.path, params, ctx, params.features)
        y = self._labels(params.path, params, labels, lines, ctx)
        if params.test_path is not None:
            _, x_val, val_labels, val_lines = csv_table(params.test_path, params, ctx, features)
            y_val = self._labels(params.test_path, params, val_labels, val_lines, ctx)
            y_train, y_val, num_classes, names = targets_for(y, y_val, ctx, f"column '{params.label}'")
            x_train = x
        else:
            y_all, _, num_classes, names = targets_for(y, y[:0], ctx, f"column '{params.label}'")
            x_train, x_val, y_train, y_val = holdout_split(x, y_all, ctx, num_classes is not None)
        source = source_text(files, names) + f" features: {', '.join(features)}"
        info = DataInfo(name=f"csv:{params.path.stem}", digest=file_digest(files), source=source)
        return tensor_bundle(x_train, y_train, np.asarray(x_val), y_val, ctx, name="csv", info=info,
                             standardize=params.standardize, num_classes=num_classes)

    @staticmethod
    def _labels(path: Path, params: CsvParams, cells: list[str], lines: list[int], ctx: DataContext):
        """The label column: numbers where every cell is one, else strings (class names)."""
        import numpy as np

        values = numeric(cells)
        if ctx.task != "classification":
            return numeric_or_error(path, params.label, cells, lines, ctx, "label")
        if values is not None and np.all(values == np.round(values)):
            return values.astype(np.int64)
        return np.array(cells, dtype=object)


# --- image folder -------------------------------------------------------------------------


class ImageFolderParams(DatasetParams):
    """Images in one subfolder per class (torchvision's ImageFolder layout)."""

    root: DataPath = Field(description="the folder of class folders (relative: from the pipeline's folder)")
    test_root: DataPath | None = Field(
        None, description="a folder laid out the same, evaluated instead of a val_fraction split")
    size: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="[height, width] every image is resized to; default: all must share one size")
    grayscale: bool = Field(False, description="one channel; default RGB, three")


def class_folders(root: Path) -> list[Path]:
    """The class subfolders of ``root``, by sorted name (hidden ones skipped)."""
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def image_files(folder: Path) -> list[Path]:
    """Every image below ``folder``, in sorted order."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class ImageFolder(Dataset):
    """Images as float C,H,W in [0, 1], standardized per channel by the training split;
    class ``i`` is the ``i``-th class folder by sorted name."""

    Params = ImageFolderParams

    def check(self, params: ImageFolderParams, ctx: DataContext) -> None:
        expected = "a folder holding one subfolder of images per class"
        for key, root in (("root", params.root), ("test_root", params.test_root)):
            if root is None:
                continue
            require_folder(root, ctx, key, expected)
            if not class_folders(root):
                raise ConfigError(f"{ctx.place}: data.args.{key}: {root} has no class subfolders",
                                  f"{key} is {expected} (root/cat/1.png, root/dog/2.png)")

    def digest(self, params: ImageFolderParams, ctx: DataContext) -> str | None:
        """The class folders' names and every image's relative path, size and ``mtime_ns``
        (:func:`compressflow.fingerprint.listing_digest`), not the images' bytes: thousands
        of images are too many to read at every validation. An image rewritten with its
        size and modification time kept goes unseen (``touch`` it to be sure)."""
        parts = []
        for root in (params.root, params.test_root):
            if root is not None and not root.is_dir():
                return None
            folders = class_folders(root) if root is not None else []
            # the class names too: an empty class folder still counts as a class
            parts += ["/".join(f.name for f in folders),
                      listing_digest([p for f in folders for p in image_files(f)], root)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def load(self, params: ImageFolderParams, ctx: DataContext) -> DataBundle:
        import numpy as np

        self.check(params, ctx)
        classes = [p.name for p in class_folders(params.root)]
        if len(classes) < 2:
            raise ConfigError(f"{ctx.place}: {params.root} has one class folder ({classes[0]})",
                              "classification needs a subfolder per class, at least two")
        files, labels = self._listing(params.root, classes, classes, ctx, "root")
        size = tuple(params.size) if params.size else None
        x, size = self._read(files, params, size, ctx)
        y = np.array(labels, dtype=np.int64)
        if params.test_root is not None:
            test_classes = [p.name for p in class_folders(params.test_root)]
            test_files, y_val = self._listing(params.test_root, test_classes, classes, ctx, "test_root")
            x_val, _ = self._read(test_files, params, size, ctx, first=files[0])
            x_train, y_train, y_val = x, y, np.array(y_val, dtype=np.int64)
            every = files + test_files
        else:
            x_train, x_val, y_train, y_val = holdout_split(x, y, ctx, stratify=True)
            every = files
        names = hashlib.sha256()
        for root in (params.root, params.test_root):
            if root is not None:
                names.update("\n".join(str(p.relative_to(root)) for p in every
                                       if p.is_relative_to(root)).encode())
        digest = hashlib.sha256((file_digest(every, length=64) + names.hexdigest()).encode())
        sources = [params.root] + ([params.test_root] if params.test_root else [])
        info = DataInfo(name=f"image-folder:{params.root.name}", digest=digest.hexdigest()[:16],
                        source=source_text(sources, classes))
        return tensor_bundle(x_train, y_train, x_val, y_val, ctx, name="image-folder", info=info,
                             standardize=True, per_channel=True, num_classes=len(classes))

    @staticmethod
    def _listing(root: Path, folders: list[str], classes: list[str], ctx: DataContext, key: str):
        """``(files, labels)`` of a root whose class folders are ``folders``; labels index ``classes``."""
        unknown = [name for name in folders if name not in classes]
        if unknown:
            raise ConfigError(
                f"{ctx.place}: data.args.{key}: {root} has class folder(s) "
                f"{', '.join(map(repr, unknown))} that the training root lacks",
                f"the training classes are {', '.join(map(repr, classes))}")
        files, labels = [], []
        for name in folders:
            found = image_files(root / name)
            if not found and key == "root":
                raise ConfigError(f"{ctx.place}: class folder {root / name} holds no image",
                                  f"put {', '.join(IMAGE_EXTENSIONS[:3])} files in every class folder")
            files += found
            labels += [classes.index(name)] * len(found)
        if not files:
            raise ConfigError(f"{ctx.place}: data.args.{key}: {root} holds no image",
                              f"put {', '.join(IMAGE_EXTENSIONS[:3])} files in its class folders")
        return files, labels

    @staticmethod
    def _read(files: list[Path], params: ImageFolderParams, size: tuple[int, int] | None,
              ctx: DataContext, first: Path | None = None):
        """``(uint8 array N,C,H,W, (h, w))``: every image in one mode and size."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        mode = "L" if params.grayscale else "RGB"
        arrays, fixed = [], params.size is not None
        for path in files:
            try:
                with Image.open(path) as image:
                    image = image.convert(mode)
                    if size is None:
                        size, first = (image.height, image.width), path
                    if (image.height, image.width) != size:
                        if not fixed:
                            raise ConfigError(
                                f"{ctx.place}: {path} is {image.height}x{image.width} (h x w), but "
                                f"{first} is {size[0]}x{size[1]}",
                                "set data.args.size: [height, width] to resize every image, "
                                "or give all images one size")
                        image = image.resize((size[1], size[0]), Image.BILINEAR)
                    array = np.asarray(image, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as error:
                raise ConfigError(f"{ctx.place}: {path} cannot be read as an image: {error}",
                                  "remove the file, or replace it by a PNG or JPEG") from None
            arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        return np.stack(arrays).astype(np.float32) / 255.0, size


# --- text ---------------------------------------------------------------------------------


class TextParams(DatasetParams):
    """Lines of text, tokenized by the model's tokenizer."""

    paths: list[DataPath] = Field(min_length=1, description="training text files, one sample per line")
    eval_paths: list[DataPath] = Field(
        min_length=1, description="held-out text files: the evaluated split (never training lines)")
    max_length: PositiveInt = Field(128, description="tokens per line at most (longer lines are cut)")
    window: int | None = Field(
        None, ge=2, description="causal-lm: windows of this many tokens over all the split's tokens")
    stride: PositiveInt | None = Field(
        None, description="causal-lm: a window starts every stride tokens (default: window)")
    eval_tokens: PositiveInt | None = Field(
        None, description="causal-lm: score the first N tokens of the eval files only "
        "(default: all of them)")
    encoding: str = Field("utf-8", description="the files' text encoding")

    @model_validator(mode="after")
    def _stride_fits_window(self):
        if self.stride is not None and self.window is None:
            raise ValueError("stride needs window: set window (tokens per window) too")
        if self.window is not None:
            self.stride = self.stride or self.window
            if self.stride > self.window:
                raise ValueError(f"stride {self.stride} is longer than window {self.window}: "
                                 "tokens between windows would be skipped")
        elif self.eval_tokens is not None:
            raise ValueError("eval_tokens needs window: set window (tokens per window) too")
        return self


def read_lines(paths: list[Path], encoding: str, ctx: DataContext, key: str) -> list[str]:
    """The non-blank lines of ``paths``, in order, without their line ends."""
    lines = []
    for path in paths:
        try:
            text = path.read_text(encoding=encoding)
        except UnicodeDecodeError as error:
            raise ConfigError(f"{ctx.place}: data.args.{key}: {path} is not {encoding} text: {error}",
                              "set data.args.encoding to the files' encoding") from None
        lines += [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{ctx.place}: data.args.{key}: {', '.join(map(str, paths))} hold no text",
                          "one sample per line; blank lines are skipped")
    return lines


class Tokenize:
    """A collate_fn: a batch of lines to the tokenizer's tensors, padded to the batch's
    longest line (at most ``max_length`` tokens)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, lines: list[str]) -> dict:
        encoded = self.tokenizer(list(lines), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        return dict(encoded)


class Windows:
    """Equal windows of one token stream as a map-style dataset of dicts (``input_ids``,
    ``attention_mask``, ``labels``), which the default collate stacks."""

    def __init__(self, input_ids, labels) -> None:
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        import torch

        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[index]}


def stream_windows(tokens: list[int], window: int, stride: int):
    """``(input_ids, labels)`` (M, L) of windows of ``window`` tokens starting every
    ``stride`` tokens; the last one ends at the stream's end. Labels are the tokens, with
    -100 on those a window shares with the one before (already scored there), so that every
    token is scored exactly once. A stream shorter than ``window`` is one window."""
    import torch

    ids = torch.tensor(tokens, dtype=torch.long)
    total = len(ids)
    if total <= window:
        return ids[None].clone(), ids[None].clone()
    starts = list(range(0, total - window + 1, stride))
    if starts[-1] + window < total:
        starts.append(total - window)  # the tail, as the context before it allows
    inputs = torch.stack([ids[s:s + window] for s in starts])
    labels = inputs.clone()
    scored_until = window
    for row, start in enumerate(starts[1:], start=1):
        labels[row, : scored_until - start] = -100
        scored_until = start + window
    return inputs, labels


def token_stream(tokenizer: Any, lines: list[str]) -> list[int]:
    """Every line's tokens in order, one stream; a tokenizer with an end-of-sequence token
    gets it after each line that does not already end with it (lines stay apart)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for start in range(0, len(lines), 1000):
        for ids in tokenizer(lines[start:start + 1000])["input_ids"]:
            ids = [int(i) for i in ids]
            stream += ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
    return stream


class Text(Dataset):
    """Lines of text for the model's own tokenizer: each line a sample, batches padded to
    their longest line; for causal-lm with ``window``, strided windows over all the tokens."""

    Params = TextParams
    tasks = ("embedding", "causal-lm")

    def check(self, params: TextParams, ctx: DataContext) -> None:
        for key in ("paths", "eval_paths"):
            for path in getattr(params, key):
                require_file(path, ctx, key, "a text file, one sample per line")
        if params.window is not None and ctx.task != "causal-lm":
            raise ConfigError(f"{ctx.place}: data.args.window is for task causal-lm, not '{ctx.task}'",
                              "remove window/stride: each line is then one sample")

    def digest(self, params: TextParams, ctx: DataContext) -> str | None:
        """A sha256 of every file's bytes, ``paths`` then ``eval_paths``; which list a file is
        in the params say (moving one changes the data spec)."""
        return files_digest([*params.paths, *params.eval_paths])

    def load(self, params: TextParams, ctx: DataContext) -> DataBundle:
        import torch

        self.check(params, ctx)
        tokenizer = ctx.tokenizer
        if tokenizer is None:
            raise ConfigError(f"{ctx.place}: dataset text needs the model's tokenizer, and the "
                              "input model carries none",
                              "the model needs a `.tokenizer` (a Hugging Face tokenizer, set by "
                              "the model's factory), which text is tokenized with")
        train_lines = read_lines(params.paths, params.encoding, ctx, "paths")
        eval_lines = read_lines(params.eval_paths, params.encoding, ctx, "eval_paths")
        files = [*params.paths, *params.eval_paths]
        info = DataInfo(name=f"text:{params.paths[0].stem}", digest=file_digest(files),
                        source=", ".join(map(str, params.paths)) + " | eval: "
                        + ", ".join(map(str, params.eval_paths)))
        if params.window is not None:
            train = Windows(*stream_windows(token_stream(tokenizer, train_lines),
                                            params.window, params.stride))
            scored = token_stream(tokenizer, eval_lines)[: params.eval_tokens]
            val = Windows(*stream_windows(scored, params.window, params.stride))
            kept = keep_fraction(len(train), ctx)
            if len(kept) < len(train):
                train = Windows(train.input_ids[torch.as_tensor(kept)], train.labels[torch.as_tensor(kept)])
            return loaders(train, val, ctx, val_batch=ctx.spec.batch_size, info=info)
        if getattr(tokenizer, "pad_token", True) is None:
            raise ConfigError(f"{ctx.place}: the model's tokenizer has no padding token, and "
                              "lines of different lengths are padded per batch",
                              "set the tokenizer's pad_token in the model's factory (for a causal "
                              "LM often its eos_token), or, for causal-lm, use window/stride")
        kept = keep_fraction(len(train_lines), ctx)
        train_lines = [train_lines[i] for i in kept]
        return loaders(train_lines, eval_lines, ctx, val_batch=ctx.spec.batch_size,
                       collate=Tokenize(tokenizer, params.max_length), info=info)
