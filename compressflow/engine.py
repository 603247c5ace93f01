"""Validate a whole pipeline against the loaded plugins, then run its stages in order.

The engine knows stages only as ``kind/method`` pairs that plugins registered; what a stage
does is its plugin's business. After every stage the engine measures the model, logs it and
fires the lifecycle hooks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from compressflow.config import PipelineFile, StageEntry, config_error, load_pipeline
from compressflow.errors import ConfigError
from compressflow.plugins import Plugins, load_plugins
from compressflow.registry import Provider, nearest
from compressflow.stage import MODEL_REFS, DataSpec, ModelSpec, SourceContext, Stage


@dataclass
class PlannedStage:
    """A stage resolved against the plugins: its instance, provider and data."""

    entry: StageEntry
    stage: Stage
    provider: Provider
    data: DataSpec
    key: str = ""
    """Identifies the stage's result: equal keys, equal work (see :func:`stage_key`)."""


@dataclass
class Plan:
    """A pipeline that passed validation: everything needed to run it."""

    file: PipelineFile
    plugins: Plugins
    stages: list[PlannedStage]
    input_key: str = ""

    @property
    def spec(self):
        """The validated PipelineSpec."""
        return self.file.spec


def validate(path: str | Path, overrides: list[str] = (), plugins: Plugins | None = None) -> Plan:
    """Load the file, resolve every stage and check every name, before anything runs."""
    loaded = load_pipeline(path, list(overrides))
    plugins = plugins or load_plugins()
    spec = loaded.spec
    check_model_spec(spec.model, loaded, ("model",), plugins)
    plugins.datasets.get(spec.data.dataset, loaded.place(("data", "dataset")))
    for metric in [spec.evaluation.metric, *spec.evaluation.extra]:
        plugins.metrics.get(metric, loaded.place(("evaluation",)))
    planned: list[PlannedStage] = []
    for entry in loaded.stages:
        planned.append(_plan_stage(entry, loaded, plugins, [p.entry.name for p in planned]))
    input_key = _digest({"model": spec.model.model_dump(mode="json"), "seed": spec.seed,
                         "data": spec.data.model_dump(mode="json"),
                         "evaluation": spec.evaluation.model_dump(mode="json"),
                         "measure": spec.measure.model_dump(mode="json"),
                         "source": str(plugins.model_sources.providers[spec.model.scheme])})
    previous = input_key
    for stage in planned:
        stage.key = previous = stage_key(previous, stage)
    return Plan(loaded, plugins, planned, input_key)


def _digest(document: dict) -> str:
    blob = json.dumps(document, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def stage_key(input_key: str, planned: PlannedStage) -> str:
    """The stage's identity: its input's key, kind/method, plugin and version, params, data.

    Two stages with equal keys do the same work on the same model, so a sweep may reuse one
    for the other. The seed and evaluation settings enter through the input's key.
    """
    stage = planned.stage
    return _digest({"input": input_key, "kind": stage.kind, "method": stage.method,
                    "plugin": f"{planned.provider.distribution} {planned.provider.version}",
                    "params": stage.params.model_dump(mode="json"),
                    "data": planned.data.model_dump(mode="json"), "index": planned.entry.index})


def _plan_stage(entry: StageEntry, loaded: PipelineFile, plugins: Plugins,
                earlier: list[str]) -> PlannedStage:
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
        plugins.datasets.get(data.dataset, loaded.place(loc + ("data",)))
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
    for field_name, model_spec in params.model_specs().items():
        check_model_spec(model_spec, loaded, loc + (entry.kind, field_name), plugins)
    stage = stage_class(entry.name, params, entry.data)
    return PlannedStage(entry, stage, provider, data)


def check_model_spec(model_spec: ModelSpec, loaded: PipelineFile, loc: tuple, plugins: Plugins) -> None:
    """The scheme is registered and the source's cheap ``check`` accepts the reference."""
    place = loaded.place(loc + ("source",))
    source = plugins.model_sources.get(model_spec.scheme, place)
    check = getattr(source, "check", None)
    if check is not None:
        check(model_spec.reference, model_spec.args, source_context(loaded, model_spec, place))


def source_context(loaded: PipelineFile, model_spec: ModelSpec, place: str,
                   tracking_uri: str | None = None, build_model=None) -> SourceContext:
    """What a model source gets: the pipeline's folder for relative paths, the opt-ins."""
    return SourceContext(base_dir=loaded.path.resolve().parent, place=place,
                         allow_pickle=model_spec.allow_pickle, tracking_uri=tracking_uri,
                         build_model=build_model)
