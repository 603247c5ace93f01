"""The pipeline file: YAML (safe_load only) to a validated PipelineSpec, every error at file:line.

Stage params are not validated here: only their plugins know them. The engine validates
them with :func:`stage_params`, which maps pydantic's errors back to lines of this file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compressflow.errors import ConfigError
from compressflow.stage import MODEL_REFS, DataSpec, ModelSpec
from compressflow.task import DEFAULT_TASK

STAGE_KEYS = ("name", "data", "gate")
OPTIONAL_SECTIONS = ("evaluation", "measure", "tracking", "task")
Path_ = tuple[Any, ...]


class TaskSpec(BaseModel):
    """The pipeline's task (``task: embedding``, or a mapping with ``name`` and its params)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(DEFAULT_TASK, description="a registered task: classification, regression, ...")

    def params(self) -> dict[str, Any]:
        """The task's own settings: every key but ``name``."""
        return dict(self.model_extra or {})


class EvaluationSpec(BaseModel):
    """What is measured on the evaluated split after every stage: every metric of the task."""

    model_config = ConfigDict(extra="forbid")
    metric: str | None = Field(
        None, description="the headline metric (gates, summary); default: the task's own")
    extra: list[str] = Field(default_factory=list, description="registered extra metrics, also measured")


class MeasureSpec(BaseModel):
    """How latency is measured: each model interleaved with the input model, round by round."""

    model_config = ConfigDict(extra="forbid")
    latency: bool = True
    threads: int = Field(1, ge=1, description="torch threads while timing")
    warmup: int = Field(5, ge=0)
    repeats: int = Field(30, ge=3, description="timed rounds at the first batch size")
    batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 64], min_length=1, description="latency_ms_b<N> for each")
    seq_len: int | None = Field(
        None, ge=1, description="tokens per example input (text); default: as the data gives")


class TrackingSpec(BaseModel):
    """Where results go; the default store is sqlite:///mlflow.db in the working folder."""

    model_config = ConfigDict(extra="forbid")
    experiment: str | None = Field(None, description="default: the pipeline's name")
    uri: str | None = Field(None, description="default: sqlite:///mlflow.db")
    log_models: bool = Field(True, description="log every stage's model")


class GateSpec(BaseModel):
    """A quality gate on a stage's result, against ``input``, ``previous`` or a stage."""

    model_config = ConfigDict(extra="forbid")
    max_metric_drop: float | None = Field(None, ge=0, description="task metric may fall by this much")
    min_size_ratio: float | None = Field(None, gt=0, description="at least this many times smaller")
    max_latency_ms_b1: float | None = Field(None, gt=0, description="batch-1 latency ceiling (ms)")
    against: str = Field("input", description="input, previous, or an earlier stage's name")
    on_fail: Literal["stop", "continue"] = Field("stop", description="stop: exit 3")


class RegisterSpec(BaseModel):
    """Register the final model (a sweep: the selected variant's) in the model registry."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[\w.-]+$")
    alias: str | None = Field(None, pattern=r"^[A-Za-z][\w-]*$")


class SelectSpec(BaseModel):
    """How a sweep picks its model: among the Pareto front, within a drop, then the cheapest."""

    model_config = ConfigDict(extra="forbid")
    rule: Literal["pareto-best"] = "pareto-best"
    max_metric_drop: float = Field(0.0, ge=0, description="below the best variant's metric")
    then: Literal["smallest", "fastest", "fewest-macs"] = "smallest"


class PipelineSpec(BaseModel):
    """A whole pipeline file; ``stages`` stay raw here and become StageEntry objects."""

    # `register` would shadow a BaseModel attribute, so the field has another name
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[\w.-]+$")
    description: str = ""
    seed: int = 0
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
    text = path.read_text()
    raw, lines = _parse_yaml(text, path)
    applied = {}
    for override in overrides:
        dotted = _apply_override(raw, override)
        applied[tuple(_split(dotted))] = dotted
    loaded = PipelineFile(path, text, raw, None, [], lines, applied)  # type: ignore[arg-type]
    try:
        loaded.spec = PipelineSpec.model_validate(raw)
    except ValidationError as error:
        raise config_error(error, loaded, (), "pipeline") from None
    loaded.stages = _stage_entries(loaded)
    return loaded


def _parse_yaml(text: str, path: Path) -> tuple[dict[str, Any], dict[Path_, int]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{path}: the file is empty", "a pipeline needs name, model, data and stages")
        data = loader.construct_document(node)
    except yaml.constructor.ConstructorError as error:
        line = error.problem_mark.line + 1 if error.problem_mark else "?"
        tag = getattr(error, "problem", "")
        raise ConfigError(
            f"{path}:{line}: YAML tag refused: {tag}",
            "pipelines are read with yaml.safe_load: tags that build Python objects are "
            "never executed; write plain values",
        ) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else "?"
        raise ConfigError(
            f"{path}:{line}: malformed YAML: {error.problem or error.context}",
            "check indentation and quoting around that line",
        ) from None
    finally:
        loader.dispose()
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


def _split(dotted: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in dotted.split(".")]


Override = str | tuple[str, Any]
"""``"path=yaml-text"`` from the command line, or ``(path, value)`` from a sweep."""


def _apply_override(raw: dict[str, Any], override: Override) -> str:
    if isinstance(override, tuple):
        dotted, sep, text = override[0], "=", None
    else:
        dotted, sep, text = override.partition("=")
    if not sep or not dotted:
        raise ConfigError(f"--set {override}: expected PATH=VALUE", "e.g. --set stages.2.prune.sparsity=0.9")
    parts = _split(dotted)
    node: Any = raw
    if len(parts) > 1 and parts[0] in OPTIONAL_SECTIONS:
        raw.setdefault(parts[0], {})  # a section left to its defaults can still be set
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, parts[: depth + 1], dotted)
    last = parts[-1]
    if isinstance(node, list):
        _child(node, last, parts, dotted)
    elif not isinstance(node, dict):
        raise ConfigError(f"--set {dotted}: '{'.'.join(map(str, parts[:-1]))}' holds a value, not a mapping")
    current = node[last] if isinstance(node, dict) and last in node else (
        node[last] if isinstance(node, list) else None)
    if isinstance(override, tuple):
        value = override[1]
    else:
        # a string stays a string ("001" is a name, not a number); anything else is read as YAML
        value = text if isinstance(current, str) else yaml.safe_load(text)
    node[last] = value
    return dotted


def _child(node: Any, part: Any, walked: list[Any], dotted: str) -> Any:
    here = ".".join(map(str, walked))
    if isinstance(node, list):
        if not isinstance(part, int) or not 0 <= part < len(node):
            raise ConfigError(
                f"--set {dotted}: path does not exist: '{here}' (a list of {len(node)})",
                f"list items are numbered from 0 to {len(node) - 1}",
            )
        return node[part]
    if isinstance(node, dict):
        if part not in node:
            known = ", ".join(map(str, node)) or "none"
            raise ConfigError(f"--set {dotted}: path does not exist: '{here}'", f"keys there: {known}")
        return node[part]
    raise ConfigError(f"--set {dotted}: path does not exist: '{here}' is inside a plain value")


def _stage_entries(loaded: PipelineFile) -> list[StageEntry]:
    entries, names = [], set()
    for index, item in enumerate(loaded.spec.stages):
        loc = ("stages", index)
        place = loaded.place(loc)
        if not isinstance(item, dict):
            raise ConfigError(f"{place}: stage {index} is not a mapping", "write `- <kind>: {params}`")
        kinds = [k for k in item if k not in STAGE_KEYS]
        if len(kinds) != 1:
            raise ConfigError(
                f"{place}: stage {index} must hold exactly one kind key, found "
                f"{', '.join(map(str, kinds)) or 'none'}",
                "a stage entry is `<kind>: {params}` plus optional `name` and `data`",
            )
        kind = str(kinds[0])
        params = item[kind] if item[kind] is not None else {}
        if not isinstance(params, dict):
            raise ConfigError(f"{loaded.place(loc + (kind,))}: params of '{kind}' must be a mapping")
        params = dict(params)
        method = params.pop("method", None)
        name = str(item.get("name") or f"{index}-{kind}")
        if name in names or name in MODEL_REFS:
            raise ConfigError(
                f"{loaded.place(loc + ('name',))}: stage name '{name}' is "
                + ("reserved" if name in MODEL_REFS else "used twice"),
                "give every stage a unique name other than 'input' and 'previous'",
            )
        names.add(name)
        data = item.get("data")
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{loaded.place(loc + ('data',))}: a stage's data must be a mapping")
        gate = None
        if item.get("gate") is not None:
            try:
                gate = GateSpec.model_validate(item["gate"])
            except ValidationError as error:
                raise config_error(error, loaded, loc + ("gate",), f"stage '{name}' gate") from None
        entries.append(StageEntry(index, name, kind, method, params, data, gate))
    return entries


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
