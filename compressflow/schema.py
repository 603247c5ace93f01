"""Describing what the loaded plugins accept: the pipeline's JSON Schema and the plugin list."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, create_model

from compressflow.config import GateSpec, PipelineSpec, TaskSpec
from compressflow.plugins import Plugins
from compressflow.stage import DataSpec


def _stage_entry_model(plugins: Plugins, kind: str):
    variants = []
    for method in plugins.stages.methods(kind):
        params = plugins.stages.stages[(kind, method)].Params
        default = plugins.stages.default_method(kind) == method
        method_type = Optional[Literal[method]] if default else Literal[method]
        variants.append(create_model(
            f"{kind}_{method}".replace("-", "_"), __base__=params,
            method=(method_type, None if default else ...)))
    params_type = variants[0] if len(variants) == 1 else Union[tuple(variants)]
    # the keys config.STAGE_KEYS allows beside the kind, typed as config.py reads them
    return create_model(
        f"stage_{kind}", __config__=ConfigDict(extra="forbid"),
        name=(Optional[Union[str, int]], Field(None, description="default: <index>-<kind>")),
        data=(Optional[dict[str, Any]], Field(None, description="overrides of the pipeline's data")),
        gate=(Optional[GateSpec], Field(None, description="a quality gate on this stage's result")),
        **{kind: (Optional[params_type], ...)},
    )


def pipeline_schema(plugins: Plugins) -> dict[str, Any]:
    """The JSON Schema of a pipeline file, with every loaded stage's params."""
    entries = [_stage_entry_model(plugins, kind) for kind in plugins.stages.kinds()]
    stage_type = Union[tuple(entries)] if len(entries) > 1 else entries[0]
    task_field = PipelineSpec.model_fields["task"]
    model = create_model("Pipeline", __base__=PipelineSpec,
                         stages=(list[stage_type], Field(min_length=1)),
                         # `task: embedding` is read as `task: {name: embedding}`
                         task=(Union[str, TaskSpec], Field(default_factory=TaskSpec,
                                                           description=task_field.description)))
    schema = model.model_json_schema()
    schema["$comment"] = "DataSpec fields may be overridden per stage: " + ", ".join(DataSpec.model_fields)
    # data.args and task params depend on the dataset and task named: each one's schema
    schema["x-dataset-args"] = {name: _params_schema(plugins.datasets.get(name))
                                for name in plugins.datasets.names()}
    schema["x-task-params"] = {name: plugins.tasks.get(name).Params.model_json_schema()
                               for name in plugins.tasks.names()}
    return schema


def _params_schema(dataset: Any) -> dict[str, Any]:
    params = getattr(dataset, "Params", None)
    if params is None:
        return {"description": "a factory from before datasets declared params: args unchecked"}
    return params.model_json_schema()


def _fields(params_class: Any) -> dict[str, Any]:
    """Each field's type, whether required, default and description."""
    fields = {}
    for name, info in params_class.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        fields[name] = {"type": _type_name(info.annotation), "required": info.is_required(),
                        "default": _jsonable(default), "description": info.description or ""}
    return fields


def plugin_listing(plugins: Plugins) -> dict[str, Any]:
    """Every stage (with its params and defaults), source, dataset, metric and sweep
    executor, by provider."""
    stages = []
    for (kind, method), stage_class in sorted(plugins.stages.stages.items()):
        provider = plugins.stages.providers[(kind, method)]
        params = _fields(stage_class.Params)
        stages.append({"kind": kind, "method": method,
                       "default": plugins.stages.default_method(kind) == method,
                       "plugin": provider.plugin, "distribution": provider.distribution,
                       "version": provider.version, "doc": (stage_class.__doc__ or "").strip(),
                       "params": params})

    def named(registry) -> list[dict[str, str]]:
        return [{"name": n, "plugin": registry.providers[n].plugin,
                 "distribution": registry.providers[n].distribution,
                 "version": registry.providers[n].version} for n in registry.names()]

    datasets = named(plugins.datasets)
    for entry in datasets:
        dataset = plugins.datasets.get(entry["name"])
        entry["params"] = _fields(dataset.Params) if hasattr(dataset, "Params") else None
        entry["tasks"] = list(getattr(dataset, "tasks", None) or [])
        entry["doc"] = (type(dataset).__doc__ or "").strip().splitlines()[0] if hasattr(dataset, "Params") else ""
    tasks = named(plugins.tasks)
    for entry in tasks:
        task = plugins.tasks.get(entry["name"])
        entry["metrics"] = {n: {"higher_is_better": m.higher_is_better, "description": m.description}
                            for n, m in task.metrics.items()}
        entry["default_metric"] = task.default_metric
    executors = named(plugins.executors)
    for entry in executors:
        entry["description"] = plugins.executors.get(entry["name"]).description
    return {"stages": stages, "model_sources": named(plugins.model_sources),
            "datasets": datasets, "tasks": tasks, "metrics": named(plugins.metrics),
            "executors": executors,
            "broken": [b.__dict__ for b in plugins.broken]}


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else str(value)
