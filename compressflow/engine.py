"""Validate a whole pipeline against the loaded plugins, then run its stages in order.

The engine knows stages only as ``kind/method`` pairs that plugins registered; what a stage
does is its plugin's business. After every stage the engine measures the model, logs it and
fires the lifecycle hooks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from compressflow.config import PipelineFile, StageEntry, config_error, load_pipeline
from compressflow.errors import ConfigError
from compressflow.fingerprint import code_digest
from compressflow.plugins import Plugins, load_plugins
from compressflow.registry import Provider, nearest
from compressflow.data import DataContext, Dataset
from compressflow.stage import MODEL_REFS, DataSpec, ModelSpec, SourceContext, Stage
from compressflow.task import Task


@dataclass
class PlannedStage:
    """A stage resolved against the plugins: its instance, provider and data."""

    entry: StageEntry
    stage: Stage
    provider: Provider
    data: DataSpec
    key: str = ""
    """Identifies the stage's result: equal keys, equal work (see :func:`stage_key`)."""
    content: dict[str, Any] = field(default_factory=dict)
    """Digests of the files it reads beyond its input model: its data's, its params' models'."""


@dataclass
class Plan:
    """A pipeline that passed validation: everything needed to run it."""

    file: PipelineFile
    plugins: Plugins
    stages: list[PlannedStage]
    input_key: str = ""
    task: Task | None = None
    data_params: dict[str, Any] = field(default_factory=dict)
    """Each distinct data spec's validated dataset params, by :func:`data_key`."""

    def higher_is_better(self, metric: str) -> bool:
        """Which way ``metric`` (a task metric or a registered extra one) is better."""
        if metric in self.task.metrics:
            return self.task.metrics[metric].higher_is_better
        return self.plugins.metrics.get(metric).higher_is_better

    @property
    def spec(self):
        """The validated PipelineSpec."""
        return self.file.spec


def validate(path: str | Path, overrides: list[str] = (), plugins: Plugins | None = None) -> Plan:
    """Load the file, resolve every stage and check every name, before anything runs."""
    loaded = load_pipeline(path, list(overrides))
    plugins = plugins or load_plugins()
    spec = loaded.spec
    model_digest = check_model_spec(spec.model, loaded, ("model",), plugins)
    task = _task(loaded, plugins)
    _check_metrics(loaded, plugins, task)
    # (params, digest) by data key: a stage's own data is checked (and hashed) once
    checked = {data_key(spec.data): check_data(spec.data, loaded, ("data",), plugins, task)}
    planned: list[PlannedStage] = []
    for entry in loaded.stages:
        stage = _plan_stage(entry, loaded, plugins, [p.entry.name for p in planned], task)
        if data_key(stage.data) not in checked:
            checked[data_key(stage.data)] = check_data(
                stage.data, loaded, ("stages", entry.index, "data"), plugins, task)
        stage.content["data"] = checked[data_key(stage.data)][1]
        planned.append(stage)
    data_params = {key: params for key, (params, _) in checked.items()}
    input_key = _digest({"model": spec.model.model_dump(mode="json"), "seed": spec.seed,
                         "content": [model_digest, checked[data_key(spec.data)][1]],
                         "task": spec.task.model_dump(mode="json"),
                         "data": spec.data.model_dump(mode="json"),
                         "evaluation": spec.evaluation.model_dump(mode="json"),
                         "measure": spec.measure.model_dump(mode="json"),
                         "source": str(plugins.model_sources.providers[spec.model.scheme]),
                         "code": [code_digest(plugins.model_sources.get(spec.model.scheme)),
                                  code_digest(plugins.datasets.get(spec.data.dataset))]})
    previous = input_key
    for stage in planned:
        stage.key = previous = stage_key(previous, stage)
    return Plan(loaded, plugins, planned, input_key, task, data_params)


def data_key(data: DataSpec) -> str:
    """Identifies a data spec: stages with equal keys share one bundle."""
    return data.model_dump_json()


def _task(loaded: PipelineFile, plugins: Plugins) -> Task:
    task_class = plugins.tasks.get(loaded.spec.task.name, loaded.place(("task",)))
    try:
        params = task_class.Params.model_validate(loaded.spec.task.params())
    except ValidationError as error:
        raise config_error(error, loaded, ("task",), f"task '{task_class.name}'") from None
    return task_class(params)


def _check_metrics(loaded: PipelineFile, plugins: Plugins, task: Task) -> None:
    """The headline and extra metrics exist and fit the task; the headline defaults to the task's."""
    evaluation = loaded.spec.evaluation
    if evaluation.metric is None:
        evaluation.metric = task.default_metric
    for loc, metric in [(("evaluation", "metric"), evaluation.metric),
                        *((("evaluation", "extra", i), m) for i, m in enumerate(evaluation.extra))]:
        if metric in task.metrics:
            continue
        place = loaded.place(loc)
        if metric not in plugins.metrics:
            known = [*task.metrics, *(n for n in plugins.metrics.names()
                                      if plugins.metrics.get(n).fits(task.name))]
            raise ConfigError(
                f"{place}: unknown metric '{metric}' for task '{task.name}'{nearest(metric, known)}",
                f"metrics that fit task '{task.name}': {', '.join(known)}")
        entry = plugins.metrics.get(metric)
        if not entry.fits(task.name):
            raise ConfigError(
                f"{place}: metric '{metric}' does not fit task '{task.name}' (it judges "
                f"{', '.join(entry.tasks)} models)",
                f"task '{task.name}' measures {', '.join(task.metrics)}; set `task:` or pick one of those")


def check_data(data: DataSpec, loaded: PipelineFile, loc: tuple, plugins: Plugins,
               task: Task) -> tuple[Any, str | None]:
    """The dataset exists, serves the task, and its params (``data.args``) validate.

    Returns the validated params and the dataset's :meth:`~compressflow.Dataset.digest` of
    its files (both None for a legacy factory, whose args stay unchecked).
    """
    dataset = plugins.datasets.get(data.dataset, loaded.place(loc + ("dataset",)))
    if not isinstance(dataset, Dataset):
        return None, None
    what = f"dataset '{data.dataset}'"
    if dataset.tasks is not None and task.name not in dataset.tasks:
        raise ConfigError(
            f"{loaded.place(loc + ('dataset',))}: {what} serves task(s) "
            f"{', '.join(dataset.tasks)}, not '{task.name}'",
            "pick a dataset made for this task, or set `task:` to one it serves")
    base_dir = loaded.path.resolve().parent
    try:
        params = dataset.Params.model_validate(data.args, context={"base_dir": base_dir})
    except ValidationError as error:
        raise config_error(error, loaded, loc + ("args",), what) from None
    ctx = DataContext(data, loaded.spec.seed, base_dir, loaded.place(loc + ("args",)), task.name)
    dataset.check(params, ctx)
    return params, dataset.digest(params, ctx)


def _digest(document: dict) -> str:
    blob = json.dumps(document, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def stage_key(input_key: str, planned: PlannedStage) -> str:
    """The stage's identity: its input's key, kind/method, plugin and version, a digest of
    its plugin's code (:mod:`compressflow.fingerprint`), params, data, and the digests of
    the files its data and its params' model specs read (``planned.content``).

    Two stages with equal keys do the same work on the same model, so a sweep may reuse one
    for the other. The seed and evaluation settings enter through the input's key.
    """
    stage = planned.stage
    return _digest({"input": input_key, "kind": stage.kind, "method": stage.method,
                    "plugin": f"{planned.provider.distribution} {planned.provider.version}",
                    "code": code_digest(stage),
                    "params": stage.params.model_dump(mode="json"),
                    "data": planned.data.model_dump(mode="json"), "index": planned.entry.index,
                    "content": planned.content})


def _plan_stage(entry: StageEntry, loaded: PipelineFile, plugins: Plugins,
                earlier: list[str], task: Task) -> PlannedStage:
    loc = ("stages", entry.index)
    place = f"{loaded.place(loc + (entry.kind,))}: stage '{entry.name}'"
    try:
        stage_class = plugins.stages.get(entry.kind, entry.method, place)
    except ConfigError as error:
        if plugins.broken:
            error.hint += "; some plugins failed to load: " + "; ".join(
                b.describe() for b in plugins.broken)
        raise
    provider = plugins.stages.providers[(stage_class.kind, stage_class.method)]
    what = f"stage '{entry.name}' ({stage_class.kind}/{stage_class.method})"
    if stage_class.tasks is not None and task.name not in stage_class.tasks:
        raise ConfigError(
            f"{place}: {stage_class.kind}/{stage_class.method} serves task(s) "
            f"{', '.join(stage_class.tasks)}, not '{task.name}'",
            f"methods of '{entry.kind}': {', '.join(plugins.stages.methods(entry.kind))}")
    try:
        params = stage_class.Params.model_validate(entry.params)
    except ValidationError as error:
        raise config_error(error, loaded, loc + (entry.kind,), what) from None
    data = loaded.spec.data
    if entry.data:
        try:
            data = DataSpec.model_validate({**data.model_dump(), **entry.data})
        except ValidationError as error:
            raise config_error(error, loaded, loc + ("data",), f"{what} data") from None
    for field_name, ref in params.stage_refs().items():
        if ref not in MODEL_REFS and ref not in earlier:
            choices = [*MODEL_REFS, *earlier]
            raise ConfigError(
                f"{loaded.place(loc + (entry.kind, field_name))}: {what}: {field_name} "
                f"'{ref}' names no earlier stage{nearest(ref, choices)}",
                f"name 'input', 'previous' or a stage that runs before it: {', '.join(choices)}",
            )
    gate = entry.gate
    if gate is not None and gate.against not in MODEL_REFS and gate.against not in earlier:
        choices = [*MODEL_REFS, *earlier]
        raise ConfigError(
            f"{loaded.place(loc + ('gate', 'against'))}: {what}: gate against '{gate.against}' "
            f"names no earlier stage{nearest(gate.against, choices)}",
            f"compare with 'input', 'previous' or an earlier stage: {', '.join(choices)}",
        )
    models = {field_name: check_model_spec(model_spec, loaded, loc + (entry.kind, field_name), plugins)
              for field_name, model_spec in params.model_specs().items()}
    stage = stage_class(entry.name, params, entry.data)
    return PlannedStage(entry, stage, provider, data, content={"models": models} if models else {})


def check_model_spec(model_spec: ModelSpec, loaded: PipelineFile, loc: tuple,
                     plugins: Plugins) -> str | None:
    """The scheme is registered and the source's cheap ``check`` accepts the reference.

    Returns the source's :meth:`~compressflow.ModelSource.digest` of what the reference
    loads (None for a source without one, or a plain callable)."""
    place = loaded.place(loc + ("source",))
    source = plugins.model_sources.get(model_spec.scheme, place)
    ctx = source_context(loaded, model_spec, place)
    check = getattr(source, "check", None)
    if check is not None:
        check(model_spec.reference, model_spec.args, ctx)
    digest = getattr(source, "digest", None)
    return digest(model_spec.reference, model_spec.args, ctx) if digest is not None else None


def source_context(loaded: PipelineFile, model_spec: ModelSpec, place: str,
                   tracking_uri: str | None = None, build_model=None) -> SourceContext:
    """What a model source gets: the pipeline's folder for relative paths, the opt-ins."""
    return SourceContext(base_dir=loaded.path.resolve().parent, place=place,
                         allow_pickle=model_spec.allow_pickle, tracking_uri=tracking_uri,
                         build_model=build_model)
