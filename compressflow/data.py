"""The data contract: what a pipeline's ``data:`` says, what a dataset plugin builds from it.

A dataset plugin registers a :class:`Dataset` subclass (``registry.add("csv", CsvDataset)``)
that declares its settings as a pydantic ``Params`` model, validated with the whole
pipeline before anything runs (errors at ``file:line``), and a ``load`` that returns a
:class:`DataBundle`. Its settings are written under ``data.args``. A :class:`DataPath`
field resolves from the pipeline file's folder. See docs/architecture.md.

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader

    from compressflow.task import Task


class DataSpec(BaseModel):
    """The data a pipeline (or, with overrides, one stage) trains and evaluates on."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset: str = Field(description="a registered dataset: digits, idx, csv, npz, ...")
    batch_size: int = Field(64, ge=1)
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="held out for evaluation (datasets without a test split)")
    train_fraction: float = Field(
        1.0, gt=0, le=1, description="stratified part of the training split kept")
    shape: Literal["auto", "flat", "image"] = Field(
        "auto", description="auto: whatever the model's input_shape asks for")
    calibration_batches: int = Field(4, ge=1, description="train batches for calibration")
    args: dict[str, Any] = Field(
        default_factory=dict, description="the dataset's own settings (its Params)")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_bool(cls, value, info)


def _resolve_from_pipeline(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    return value if value.is_absolute() or base is None else Path(base) / value


DataPath = Annotated[Path, AfterValidator(_resolve_from_pipeline)]
"""A path in a dataset's Params: relative paths start at the pipeline file's folder."""


class DatasetParams(BaseModel):
    """Base of every dataset's settings: unknown keys are errors, values are validated, and
    numbers are not booleans (``batch_size: true`` is no 1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_bool(cls, value, info)


def _refuse_bool(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    from compressflow.stage import refuse_bool_for_number  # stage.py imports this module

    return refuse_bool_for_number(model, value, info.field_name)


@dataclass
class DataInfo:
    """What MLflow records of the data (``mlflow.log_input``): name, digest, source.

    Attributes:
        name: e.g. ``mnist``. digest: a fingerprint of the content (file hashes, or the
        arrays'). source: where it came from (a folder, a package). splits: samples per
        split (``train``, ``eval``, ...).
    """

    name: str
    digest: str
    source: str
    splits: dict[str, int] = field(default_factory=dict)


@dataclass
class DataBundle:
    """The loaders a dataset builds.

    Attributes:
        train: the training split (shuffled by the seed).
        val: the evaluated split: every stage's task metric is measured on it. Where the
            data has an official test split (MNIST), this is it.
        calibration: a few training batches for calibration (pruning criteria, int8 ranges).
        num_classes: classes, for classification data (else None).
        sample_shape: one sample's input shape, for tensor inputs (else None).
        holdout: a part of train held out for tuning (early stopping), when asked for.
        info: what MLflow records as the dataset (None: the engine describes the spec).

    Every loader yields batches as :mod:`compressflow.task` describes: ``(inputs, targets)``
    pairs or dicts of tensors.
    """

    train: DataLoader
    val: DataLoader
    calibration: DataLoader
    num_classes: int | None = None
    sample_shape: tuple[int, ...] | None = None
    holdout: DataLoader | None = None
    info: DataInfo | None = None

    def reseed(self, seed: int) -> None:
        """Restart every shuffling generator of the loaders at ``seed``.

        The engine calls this before each stage runs, with the stage's seed: a stage's
        batches then follow from its own seed and key alone, not from how far earlier stages
        (run, reused or resumed) advanced a generator the loaders share.
        """
        for loader in (self.train, self.val, self.calibration, self.holdout):
            for generator in _generators(loader):
                generator.manual_seed(seed)

    def example_input(self, batch: int = 1, task: Task | None = None, seq_len: int | None = None) -> Any:
        """``batch`` real validation inputs (for signatures, MACs and latency)."""
        if task is None:
            from compressflow.task import Task

            task = Task()
        return task.examples(self.val, batch, seq_len)


def batch_size(loader: Any) -> int:
    """The samples a batch of ``loader`` holds: its ``batch_size``, or its batch sampler's
    (a loader built with ``batch_sampler=`` has none of its own)."""
    size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    return int(size or 1)


def _generators(loader: Any) -> list[Any]:
    """The distinct torch generators a loader draws from (its own, its samplers')."""
    import torch

    found: list[Any] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


@dataclass
class DataContext:
    """What a dataset's ``load`` (and ``check``) may use.

    Attributes:
        spec: the resolved ``data:`` section (batch_size, fractions, shape, calibration).
        seed: the pipeline's seed (splits and shuffling follow it).
        base_dir: the pipeline file's folder, where relative paths start.
        place: ``file:line`` of the data section, for messages.
        task: the pipeline's task name.
        input_shape: the shape the input model declares for one sample, else None.
        model: the pipeline's input model (None during validation); a text dataset takes
            its tokenizer (``model.tokenizer``).
    """

    spec: DataSpec
    seed: int
    base_dir: Path
    place: str = "data"
    task: str = "classification"
    input_shape: tuple[int, ...] | None = None
    model: nn.Module | None = None

    def resolve(self, path: str | Path) -> Path:
        """``path`` from the pipeline file's folder (absolute and ``~`` paths as they are)."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    @property
    def tokenizer(self) -> Any:
        """The input model's tokenizer, if it carries one."""
        return getattr(self.model, "tokenizer", None)


class Dataset:
    """Base of a dataset plugin: set ``Params`` and write ``load`` (and, cheaply, ``check``).

    ``tasks``: the task names it serves (None: any). ``check`` runs during validation with
    validated params and no model: it catches what can be known early (a missing file);
    ``digest``, after it, fingerprints the files for the stage keys.
    """

    Params: ClassVar[type[DatasetParams]] = DatasetParams
    tasks: ClassVar[tuple[str, ...] | None] = None

    def check(self, params: DatasetParams, ctx: DataContext) -> None:
        """Raise ConfigError if the data cannot load; default: accept."""

    def digest(self, params: DatasetParams, ctx: DataContext) -> str | None:
        """A fingerprint of the data's content (its files' bytes), run after ``check`` in
        every validation and part of the stage keys: without it, ``--reuse`` and
        ``--resume`` would hand back results of files edited since.

        Default None: the params alone say what loads (a packaged or generated set). Keep
        it cheap (:mod:`compressflow.fingerprint` hashes files); None also where a file is
        missing (``check`` reports that).
        """
        return None

    def load(self, params: DatasetParams, ctx: DataContext) -> DataBundle:
        """Build the loaders."""
        raise NotImplementedError


def file_digest(paths: list[Path], *, length: int = 16) -> str:
    """A short sha256 over the files' bytes, in order: equal data, equal digest."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:length]
