"""The ``npz`` and ``csv`` datasets: arrays of features and a target (classification or
regression) from the user's files; the evaluated split is ``test_path`` when given, else a
``val_fraction`` held out (stratified for classification).

This module imports neither numpy nor torch at import time (validation stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from compressflow import ConfigError, DataBundle, DataInfo, DataPath, Dataset, DatasetParams
from compressflow.data import DataContext, file_digest
from compressflow.fingerprint import files_digest
from compressflow_data.files import (
    TENSOR_TASKS,
    holdout_split,
    require_file,
    source_text,
    targets_for,
    tensor_bundle,
)

if TYPE_CHECKING:
    import numpy as np


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
