"""The pipeline file: YAML (safe_load only) to a validated PipelineSpec, every error at file:line.

Stage params are not validated here: only their plugins know them. The engine validates
them, and :func:`config_error` maps pydantic's errors back to lines of this file. The YAML
itself is read within bounds by :mod:`compressflow.yamlsafe`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from compressflow.errors import ConfigError
from compressflow.overrides import Override, apply_override, split_path
from compressflow.stage import MODEL_REFS, DataSpec, ModelSpec, refuse_bool_for_number
from compressflow.task import DEFAULT_TASK
from compressflow.yamlsafe import compose, file_place, read_text

STAGE_KEYS = ("name", "data", "gate")
OPTIONAL_SECTIONS = ("evaluation", "measure", "tracking", "task")
Path_ = tuple[Any, ...]
SEED_LIMIT = 2**32
"""Seeds stay below this: numpy's generators and scikit-learn's ``random_state`` take no more."""


class _Spec(BaseModel):
    """Base of the pipeline's own sections: unknown keys are errors, floats are finite and
    numbers are not booleans (``max_metric_drop: no`` is a slip, not 0)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_for_number(cls, value, info.field_name)


class TaskSpec(BaseModel):
    """The pipeline's task (``task: embedding``, or a mapping with ``name`` and its params)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(DEFAULT_TASK, description="a registered task: classification, regression, ...")

    def params(self) -> dict[str, Any]:
        """The task's own settings: every key but ``name``."""
        return dict(self.model_extra or {})


class EvaluationSpec(_Spec):
    """What is measured on the evaluated split after every stage: every metric of the task."""

    metric: str | None = Field(
        None, description="the headline metric (gates, summary); default: the task's own")
    extra: list[str] = Field(default_factory=list, description="registered extra metrics, also measured")


class MeasureSpec(_Spec):
    """How latency is measured: each model interleaved with the input model, round by round."""

    latency: bool = True
    threads: int = Field(1, ge=1, description="torch threads while timing")
    warmup: int = Field(5, ge=0)
    repeats: int = Field(30, ge=3, description="timed rounds at the first batch size")
    batch_sizes: list[Annotated[int, Field(ge=1, le=2**20)]] = Field(
        default_factory=lambda: [1, 64], min_length=1, description="latency_ms_b<N> for each")
    seq_lens: list[Annotated[int, Field(ge=1, le=2**20)]] | None = Field(
        None, min_length=1, description="tokens per example input (text): latency_ms_b<N>_t<L> "
        "for each; default: the evaluated split's median and 95th-percentile line lengths")
    seq_len: int | None = Field(None, ge=1, description="one length: the same as seq_lens: [L]")

    @model_validator(mode="after")
    def _one_length_setting(self):
        if self.seq_len is not None:
            if self.seq_lens is not None:
                raise ValueError("set seq_lens or seq_len, not both")
            self.seq_lens, self.seq_len = [self.seq_len], None
        return self


class TrackingSpec(BaseModel):
    """Where results go; the default store is sqlite:///mlflow.db in the working folder."""

    model_config = ConfigDict(extra="forbid")
    experiment: str | None = Field(None, min_length=1, pattern=r"^[^\x00-\x1f]+$",
                                   description="default: the pipeline's name")
    uri: str | None = Field(None, description="default: sqlite:///mlflow.db")
    log_models: bool = Field(True, description="log every stage's model")
    artifacts: str | None = Field(
        None, description="where a new experiment keeps its artifacts: a folder (absolute, or "
        "relative to the current folder) or a URI; default: <db file>.artifacts beside a sqlite "
        "store. An existing experiment keeps its own")


class GateSpec(_Spec):
    """A quality gate on a stage's result, against ``input``, ``previous`` or a stage."""

    max_metric_drop: float | None = Field(None, ge=0, description="task metric may fall by this much")
    min_size_ratio: float | None = Field(None, gt=0, description="at least this many times smaller")
    max_latency_ms_b1: float | None = Field(None, gt=0, description="batch-1 latency ceiling (ms)")
    against: str = Field("input", description="input, previous, or an earlier stage's name")
    on_fail: Literal["stop", "continue"] = Field("stop", description="stop: exit 3")


class RegisterSpec(_Spec):
    """Register the final model (a sweep: the selected variant's) in the model registry."""

    name: str = Field(pattern=r"^[\w.-]+$")
    alias: str | None = Field(None, pattern=r"^[A-Za-z][\w-]*$")


class SelectSpec(_Spec):
    """How a sweep picks its model: among the Pareto front, within a drop, then the cheapest."""

    rule: Literal["pareto-best"] = "pareto-best"
    max_metric_drop: float = Field(0.0, ge=0, description="below the best variant's metric")
    then: Literal["smallest", "fastest", "fewest-macs"] = "smallest"


class PipelineSpec(_Spec):
    """A whole pipeline file; ``stages`` stay raw here and become StageEntry objects."""

    # `register` would shadow a BaseModel attribute, so the field has another name
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=r"^[\w.-]+$")
    description: str = ""
    seed: int = Field(0, ge=0, lt=SEED_LIMIT,
                      description="0 <= seed < 2**32; stage i runs with seed + i + 1")
    model: ModelSpec
    data: DataSpec
    task: TaskSpec = Field(default_factory=TaskSpec, description="default: classification")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    stages: list[Any] = Field(min_length=1)
    sweep: dict[str, Any] | None = Field(
        None, description="--set paths to lists of values; mode: product (default) or zip")
    registration: RegisterSpec | None = Field(None, alias="register")
    select: SelectSpec | None = None

    @field_validator("task", mode="before")
    @classmethod
    def _task_by_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


@dataclass
class StageEntry:
    """One stage as written: its kind, method (None: the kind's default) and raw params."""

    index: int
    name: str
    kind: str
    method: str | None
    params: dict[str, Any]
    data: dict[str, Any] | None = None
    gate: GateSpec | None = None


@dataclass
class PipelineFile:
    """A loaded pipeline: the spec, its stages, and where every value came from."""

    path: Path
    text: str
    raw: dict[str, Any]
    spec: PipelineSpec
    stages: list[StageEntry]
    lines: dict[Path_, int] = field(default_factory=dict)
    overrides: dict[Path_, str] = field(default_factory=dict)

    def place(self, loc: Path_) -> str:
        """``file:line`` (or ``--set path``) of the value at ``loc``, else of its parent."""
        for cut in range(len(loc), -1, -1):
            prefix = tuple(loc[:cut])
            if prefix in self.overrides:
                return f"--set {self.overrides[prefix]}"
            if prefix in self.lines:
                return f"{self.path}:{self.lines[prefix]}"
        return str(self.path)

    def content_hash(self) -> str:
        """A short hash of the resolved document: equal pipelines hash equal."""
        blob = json.dumps(self.raw, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_pipeline(path: str | Path, overrides: list[Override] = ()) -> PipelineFile:
    """Read, override and validate a pipeline file (stage params excepted)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file", "check the path of the pipeline file")
    text = read_text(path)
    raw, lines = _parse_yaml(text, path)
    applied = {}
    for override in overrides:
        dotted = apply_override(raw, override, OPTIONAL_SECTIONS)
        applied[tuple(split_path(dotted))] = dotted
    loaded = PipelineFile(path, text, raw, None, [], lines, applied)  # type: ignore[arg-type]
    try:
        loaded.spec = PipelineSpec.model_validate(raw)
    except ValidationError as error:
        raise config_error(error, loaded, (), "pipeline") from None
    _check_seed(loaded)
    loaded.stages = _stage_entries(loaded)
    return loaded


def _check_seed(loaded: PipelineFile) -> None:
    # every stage derives its own seed, and each must stay in numpy's range too
    last = loaded.spec.seed + len(loaded.spec.stages)
    if last >= SEED_LIMIT:
        raise ConfigError(
            f"{loaded.place(('seed',))}: seed {loaded.spec.seed} is too large for "
            f"{len(loaded.spec.stages)} stage(s): stage i runs with seed + i + 1, which must "
            f"stay below 2**32", f"use a seed below {SEED_LIMIT - len(loaded.spec.stages)}")


def _parse_yaml(text: str, path: Path) -> tuple[dict[str, Any], dict[Path_, int]]:
    data, node = compose(text, file_place(path))
    if node is None:
        raise ConfigError(f"{path}: the file is empty", "a pipeline needs name, model, data and stages")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:{node.start_mark.line + 1}: the document is a {type(data).__name__}, "
            "not a mapping",
            "a pipeline is a mapping with keys name, model, data, stages",
        )
    lines: dict[Path_, int] = {}
    _record_lines(node, (), lines)
    return data, lines


def _record_lines(node: yaml.Node, loc: Path_, lines: dict[Path_, int]) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = loc + (key.value,)
            _record_lines(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, loc + (index,), lines)


def _stage_entries(loaded: PipelineFile) -> list[StageEntry]:
    entries, names = [], set()
    for index, item in enumerate(loaded.spec.stages):
        entry = _stage_entry(loaded, index, item)
        if entry.name in names or entry.name in MODEL_REFS:
            raise ConfigError(
                f"{loaded.place(('stages', index, 'name'))}: stage name '{entry.name}' is "
                + ("reserved" if entry.name in MODEL_REFS else "used twice"),
                "give every stage a unique name other than 'input' and 'previous'",
            )
        names.add(entry.name)
        entries.append(entry)
    return entries


def _stage_entry(loaded: PipelineFile, index: int, item: Any) -> StageEntry:
    loc = ("stages", index)
    kind = _stage_kind(item, index, loaded.place(loc))
    params = item[kind] if item[kind] is not None else {}
    if not isinstance(params, dict):
        raise ConfigError(f"{loaded.place(loc + (kind,))}: params of '{kind}' must be a mapping")
    params = dict(params)
    method = params.pop("method", None)
    if method is not None and not isinstance(method, str):
        raise ConfigError(
            f"{loaded.place(loc + (kind, 'method'))}: stage {index}: method must be a "
            f"name, not {type(method).__name__} {method!r}",
            f"write method: <name>; `compressflow plugins` lists the methods of '{kind}'")
    name = _stage_name(item.get("name"), index, kind, loaded.place(loc + ("name",)))
    data = item.get("data")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{loaded.place(loc + ('data',))}: a stage's data must be a mapping")
    gate = None
    if item.get("gate") is not None:
        try:
            gate = GateSpec.model_validate(item["gate"])
        except ValidationError as error:
            raise config_error(error, loaded, loc + ("gate",), f"stage '{name}' gate") from None
    return StageEntry(index, name, kind, method, params, data, gate)


def _stage_kind(item: Any, index: int, place: str) -> str:
    if not isinstance(item, dict):
        raise ConfigError(f"{place}: stage {index} is not a mapping", "write `- <kind>: {params}`")
    kinds = [k for k in item if k not in STAGE_KEYS]
    if len(kinds) != 1:
        raise ConfigError(
            f"{place}: stage {index} must hold exactly one kind key, found "
            f"{', '.join(map(str, kinds)) or 'none'}",
            "a stage entry is `<kind>: {params}` plus optional `name` and `data`",
        )
    if not isinstance(kinds[0], str):
        raise ConfigError(f"{place}: stage {index}: the kind key must be a name, not "
                          f"{type(kinds[0]).__name__} {kinds[0]!r}",
                          "write `- <kind>: {params}`, e.g. `- prune: {sparsity: 0.5}`")
    return kinds[0]


_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def _stage_name(value: Any, index: int, kind: str, place: str) -> str:
    if value is None or value == "":
        return f"{index}-{kind}"
    # a number is a fine name (`name: 1`); a list or mapping is a mistake, and so is `yes`
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{place}: stage {index}: name must be a string, not "
                          f"{type(value).__name__} {value!r}", "write name: <text>")
    name = str(value)
    # the name becomes a folder prefix and an MLflow run name
    if _BAD_NAME.search(name):
        raise ConfigError(f"{place}: stage {index}: name {name!r} holds a path separator or "
                          "a control character", "use letters, digits, spaces, '.', '_', '-'")
    return name


def config_error(error: ValidationError, loaded: PipelineFile, root: Path_, what: str) -> ConfigError:
    """A ConfigError for the first pydantic error, placed at its file:line."""
    first = error.errors()[0]
    loc = root + tuple(first["loc"])
    field_name = ".".join(map(str, first["loc"])) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        problem = f"unknown key '{first['loc'][-1]}'"
    elif kind == "missing":
        problem = f"missing required key '{first['loc'][-1]}'"
    elif not first["loc"]:  # a rule across several fields: the message says it all
        problem = first["msg"].removeprefix("Value error, ")
    else:
        problem = f"{field_name}: {first['msg']} (got {first.get('input')!r})"
    more = len(error.errors()) - 1
    hint = f"{more} more problem(s) after this one; " if more else ""
    return ConfigError(
        f"{loaded.place(loc)}: {what}: {problem}",
        hint + "`compressflow schema` shows every key and type",
    )
