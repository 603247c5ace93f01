"""What a plugin builds on: Stage, its Params, the context it runs in, and what it returns.

Nothing here imports torch, so that the CLI can validate a pipeline without it; the type
names below refer to torch only for static checkers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader

REF_MARK = "x-compressflow-ref"
MODEL_REFS = ("input", "previous")

StageRef = Annotated[str, Field(json_schema_extra={REF_MARK: True})]
"""A param naming another model of the pipeline: ``input``, ``previous`` or a stage's name.

The engine checks, before anything runs, that it names a stage that runs earlier."""

OptionalStageRef = Annotated[str | None, Field(json_schema_extra={REF_MARK: True})]
"""A StageRef that may be left out (``StageRef | None`` would drop the mark)."""


class StageParams(BaseModel):
    """Base of every stage's settings: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid")

    def stage_refs(self) -> dict[str, str]:
        """The params that name another model of the pipeline: ``{field: value}``."""
        refs = {}
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get(REF_MARK) and getattr(self, name):
                refs[name] = getattr(self, name)
        return refs

    def model_specs(self) -> dict[str, ModelSpec]:
        """The params that describe a model to build (checked during validation)."""
        return {n: v for n, v in self if isinstance(v, ModelSpec)}


_SOURCE = re.compile(r"^[A-Za-z][\w+.-]*:.+$")


class ModelSpec(BaseModel):
    """A model to build: ``source: <scheme>:<reference>`` plus the source's ``args``."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="<scheme>:<reference>, e.g. zoo:mlp or file:weights.pt")
    args: dict[str, Any] = Field(default_factory=dict, description="passed to the source")
    allow_pickle: bool = Field(
        False, description="allow unpickling a whole model (runs code from the file)"
    )

    @field_validator("source")
    @classmethod
    def _has_scheme(cls, value: str) -> str:
        if not _SOURCE.match(value):
            raise ValueError("must look like <scheme>:<reference>, e.g. zoo:mlp")
        return value

    @property
    def scheme(self) -> str:
        """The part before the first colon: which model source plugin loads it."""
        return self.source.split(":", 1)[0]

    @property
    def reference(self) -> str:
        """The part after the first colon, handed to the source."""
        return self.source.split(":", 1)[1]


class DataSpec(BaseModel):
    """The data a pipeline (or, with overrides, one stage) trains and evaluates on."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="a registered dataset: digits, synthetic, ...")
    batch_size: int = Field(64, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="held out for evaluation")
    train_fraction: float = Field(
        1.0, gt=0, le=1, description="stratified part of the training split kept"
    )
    shape: Literal["auto", "flat", "image"] = Field(
        "auto", description="auto: whatever the model's input_shape asks for"
    )
    calibration_batches: int = Field(4, ge=1, description="train batches for calibration")
    args: dict[str, Any] = Field(default_factory=dict, description="dataset-specific settings")


@dataclass
class DataBundle:
    """Loaders a dataset factory returns; validation is the same whatever ``train_fraction``."""

    train: DataLoader
    val: DataLoader
    calibration: DataLoader
    num_classes: int
    sample_shape: tuple[int, ...]

    def example_input(self, batch: int = 1) -> Any:
        """A real batch of ``batch`` validation inputs (for signatures and latency)."""
        import torch

        inputs = torch.cat([x for x, _ in self.val])
        while inputs.shape[0] < batch:
            inputs = torch.cat([inputs, inputs])
        return inputs[:batch]


@dataclass
class StageResult:
    """What a stage hands back.

    Attributes:
        model: the new model (it may be the input model changed in place).
        metrics: the stage's own figures (``reconstruction_error``...); measure adds the rest.
        artifacts: files to keep with the stage's MLflow run, by name.
        notes: sentences for the summary (``"not smaller on disk: dense storage"``).
    """

    model: nn.Module
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class StageContext:
    """What a running stage may use; the engine builds one per stage.

    Attributes:
        name: the stage's name. seed: its seed. device: ``"cpu"`` here. workdir: a folder of
        its own for files it writes. metric: the task metric's name.
    """

    def __init__(
        self,
        *,
        name: str,
        seed: int,
        workdir: Path,
        metric: str,
        data: Callable[[], DataBundle],
        evaluate: Callable[[nn.Module, DataLoader | None], dict[str, float]],
        model_at: Callable[[str], nn.Module],
        build_model: Callable[[ModelSpec], nn.Module],
        log_metric: Callable[[str, float, int | None], None],
        progress: Callable[[int, int, dict[str, float]], None],
        device: str = "cpu",
        log_metrics: Callable[[dict[str, float], int | None], None] | None = None,
    ) -> None:
        self.name, self.seed, self.workdir, self.metric = name, seed, workdir, metric
        self.device = device
        self._data, self._evaluate, self._model_at = data, evaluate, model_at
        self._build_model, self._log_metric, self._progress = build_model, log_metric, progress
        self._log_metrics = log_metrics

    @classmethod
    def detached(cls, data: DataBundle,
                 evaluate: Callable[[nn.Module, DataLoader | None], dict[str, float]], *,
                 seed: int = 0, workdir: Path | None = None, metric: str = "accuracy",
                 name: str = "detached") -> StageContext:
        """A context outside any pipeline (a benchmark, a script): fixed data, no other
        models to ask for, nothing logged."""
        import tempfile

        def no_other_models(ref: str) -> nn.Module:
            raise LookupError(f"a detached context has no model '{ref}'")

        return cls(name=name, seed=seed, workdir=workdir or Path(tempfile.mkdtemp(prefix=f"{name}-")),
                   metric=metric, data=lambda: data, evaluate=evaluate, model_at=no_other_models,
                   build_model=no_other_models, log_metric=lambda *_: None,
                   progress=lambda *_: None)

    @property
    def data(self) -> DataBundle:
        """Train, validation and calibration loaders (the stage's ``data:`` applied)."""
        return self._data()

    def evaluate(self, model: nn.Module, loader: DataLoader | None = None) -> dict[str, float]:
        """The task metric and loss of ``model`` on ``loader`` (default: validation)."""
        return self._evaluate(model, loader)

    def model_at(self, ref: str) -> nn.Module:
        """A copy of the model after stage ``ref`` (or ``input``, or ``previous``)."""
        return self._model_at(ref)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        """A fresh model from a model spec (a distillation student, say)."""
        return self._build_model(spec)

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        """Log a figure to this stage's MLflow run (with ``step`` for curves)."""
        self._log_metric(name, value, step)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log several figures at once (one write to the store where it can batch them)."""
        if self._log_metrics is not None:
            self._log_metrics(metrics, step)
        else:
            for name, value in metrics.items():
                self._log_metric(name, value, step)

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        """Report progress to observers (fires ``stage_progress``)."""
        self._progress(step, total, metrics)


class Stage:
    """Base of every stage: set ``kind``, ``method``, ``Params`` and write ``run``.

    ``default = True`` makes this the method used when a pipeline names none for its kind.
    """

    kind: ClassVar[str]
    method: ClassVar[str] = "default"
    default: ClassVar[bool] = False
    Params: ClassVar[type[StageParams]] = StageParams

    def __init__(self, name: str, params: StageParams, data: dict[str, Any] | None = None):
        self.name = name
        self.params = params
        self.data_overrides = data or {}

    def run(self, model: nn.Module, ctx: StageContext) -> StageResult:
        """Do the stage's work on ``model`` (the previous stage's output) and return it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.kind}/{self.method}>"


class ModelSource:
    """Base of a model source scheme: ``load`` builds the model; ``check`` is run in validate.

    ``check`` must be cheap and import nothing heavy: it only catches what can be known
    without building the model (an unknown zoo name, a missing file).
    """

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        """Raise ConfigError if ``reference``/``args`` cannot work; default: accept."""

    def load(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> nn.Module:
        """Build the model."""
        raise NotImplementedError


@dataclass
class SourceContext:
    """What a model source may need: where relative paths start, the store, the opt-ins."""

    base_dir: Path
    place: str
    allow_pickle: bool = False
    tracking_uri: str | None = None
    build_model: Callable[[ModelSpec], nn.Module] | None = None
    """Builds another model spec (a state dict's architecture, say); None during validation."""


@dataclass
class PipelineContext:
    """The pipeline as the lifecycle hooks see it.

    Attributes:
        spec: the validated PipelineSpec. path: its file. tracking_uri: the store.
        experiment: the MLflow experiment. run_id: the parent run (None until it starts).
        results: finished stages' results by stage name (``input`` first).
        summary: one row a finished stage: stage, method, the metric, size, ratios, notes.
        gate_failures: the stages whose gate failed.
    """

    spec: Any
    path: Path
    tracking_uri: str
    experiment: str
    run_id: str | None = None
    results: dict[str, StageResult] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)
