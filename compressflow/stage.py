"""What a plugin builds on: Stage, its Params, the context it runs in, and what it returns.

Nothing here imports torch, so that the CLI can validate a pipeline without it; the type
names below refer to torch only for static checkers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from compressflow.data import DataBundle, DataSpec  # noqa: F401  (re-exported: the contract)

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader

    from compressflow.task import Task

REF_MARK = "x-compressflow-ref"
MODEL_REFS = ("input", "previous")

StageRef = Annotated[str, Field(json_schema_extra={REF_MARK: True})]
"""A param naming another model of the pipeline: ``input``, ``previous`` or a stage's name.

The engine checks, before anything runs, that it names a stage that runs earlier."""

OptionalStageRef = Annotated[str | None, Field(json_schema_extra={REF_MARK: True})]
"""A StageRef that may be left out (``StageRef | None`` would drop the mark)."""


def wants_number(annotation: Any) -> bool:
    """Whether a field of this type takes a number and never a boolean.

    Pydantic reads ``true`` as 1 for an ``int`` or ``float`` field; in a pipeline that is a
    slip (``epochs: yes`` is one epoch), so number fields refuse booleans.
    """
    found: set[Any] = set()

    def leaves(kind: Any) -> None:
        if kind in (int, float, bool) or kind is Any:
            found.add(kind)
        elif get_origin(kind) not in (Literal, list, dict, tuple, set):  # containers: their own
            for inner in get_args(kind):
                leaves(inner)

    leaves(annotation)
    return bool(found & {int, float}) and not found & {bool, Any}


def refuse_bool_for_number(model: type[BaseModel], value: Any, field_name: str | None) -> Any:
    """A ``mode="before"`` validator's body: ``value``, unless it is a boolean given to a
    number field of ``model``."""
    info = model.model_fields.get(field_name or "")
    if isinstance(value, bool) and info is not None and wants_number(info.annotation):
        raise PydanticCustomError("bool_for_number", "Input should be a number, not true/false")
    return value


class StageParams(BaseModel):
    """Base of every stage's settings: unknown keys are errors, values are validated, floats
    are finite (``lr: .inf`` would train to NaN, not fail) and numbers are not booleans."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_for_number(cls, value, info.field_name)

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


@dataclass
class StageResult:
    """What a stage hands back.

    Attributes:
        model: the new model (it may be the input model changed in place).
        metrics: the stage's own figures (``reconstruction_error``...); measure adds the rest.
        artifacts: files to keep with the stage's MLflow run, by name.
        notes: sentences for the summary (``"not smaller on disk: dense storage"``).
        packed_bytes: where the stage wrote the model in a packed format, that file's size
            in bytes; logged as ``compressed_bytes`` with ``compressed_ratio`` to the input.

    A metric of the stage's own may not reuse a name the engine measures (``size_bytes``,
    ``accuracy``, ...): that is an error, never a silent overwrite.
    """

    model: nn.Module
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    packed_bytes: int | None = None


class StageContext:
    """What a running stage may use; the engine builds one per stage.

    Attributes:
        name: the stage's name. seed: its seed. device: ``"cpu"`` here. workdir: a folder of
        its own for files it writes. metric: the task metric's name. task: the pipeline's
        :class:`compressflow.task.Task`: every model call, loss and metric goes through it.
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
        task: Task | None = None,
    ) -> None:
        self.name, self.seed, self.workdir, self.metric = name, seed, workdir, metric
        self.device = device
        self._data, self._evaluate, self._model_at = data, evaluate, model_at
        self._build_model, self._log_metric, self._progress = build_model, log_metric, progress
        self._log_metrics = log_metrics
        if task is None:
            from compressflow.task import default_task

            task = default_task()
        self.task = task

    @classmethod
    def detached(cls, data: DataBundle,
                 evaluate: Callable[[nn.Module, DataLoader | None], dict[str, float]], *,
                 seed: int = 0, workdir: Path | None = None, metric: str = "accuracy",
                 name: str = "detached", task: Task | None = None,
                 models: dict[str, nn.Module] | None = None) -> StageContext:
        """A context outside any pipeline (a benchmark, a script): fixed data, the given
        ``models`` to ask for by name (``input``...), nothing logged."""
        import copy
        import tempfile

        known = models or {}

        def model_at(ref: str) -> nn.Module:
            if ref not in known:
                raise LookupError(f"a detached context has no model '{ref}'")
            return copy.deepcopy(known[ref])

        def no_sources(spec: ModelSpec) -> nn.Module:
            raise LookupError(f"a detached context builds no model ({spec.source})")

        return cls(name=name, seed=seed, workdir=workdir or Path(tempfile.mkdtemp(prefix=f"{name}-")),
                   metric=metric, data=lambda: data, evaluate=evaluate, model_at=model_at,
                   build_model=no_sources, log_metric=lambda *_: None,
                   progress=lambda *_: None, task=task)

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

    def reference(self) -> nn.Module | None:
        """The input model, where the task measures fidelity to it (``task.uses_reference``);
        training stages match it when they have no teacher. Else None."""
        return self.model_at("input") if self.task.uses_reference else None

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
    tasks: ClassVar[tuple[str, ...] | None] = None
    """The task names this stage can serve (None: any); another task is a validation error."""

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
    """Base of a model source scheme: ``load`` builds the model; ``check`` and ``digest``
    are run in validate.

    ``check`` must be cheap and import nothing heavy: it only catches what can be known
    without building the model (an unknown zoo name, a missing file). ``digest`` says what
    the files behind a reference hold, for the stage keys.
    """

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        """Raise ConfigError if ``reference``/``args`` cannot work; default: accept."""

    def digest(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> str | None:
        """A fingerprint of the content ``reference`` loads (a weights file's bytes), run
        after ``check`` in every validation and part of the stage keys: without it,
        ``--reuse`` and ``--resume`` would hand back results of a file replaced since.

        Default None: the reference and args alone say what loads (a zoo name). Keep it
        cheap (hash files, load nothing); None also where the file is missing (``check``
        reports that).
        """
        return None

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
