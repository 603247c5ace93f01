"""The plugin contract of compressflow: every hook a plugin may implement.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names are the
hooks below, declared in the entry-point group ``compressflow`` of its distribution::

    [project.entry-points.compressflow]
    lowrank = "compressflow_lowrank"

Registration hooks run once, when plugins load, and hand the plugin a registrar; a name
registered twice is an error that names both plugins. Lifecycle hooks are for observers (a
notifier, a report, a progress bar): they see every pipeline and stage but change nothing.
A plugin implements only the hooks it needs, with only the parameters it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pluggy

if TYPE_CHECKING:
    from compressflow.registry import (
        DatasetRegistry,
        MetricRegistry,
        ModelSourceRegistry,
        StageRegistry,
    )
    from compressflow.stage import PipelineContext, Stage, StageResult

PROJECT = "compressflow"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

PipelineStatus = Literal["FINISHED", "FAILED"]


# --- registration -----------------------------------------------------------------------


@hookspec
def register_stages(registry: StageRegistry) -> None:
    """Add stage classes: ``registry.add(MyStage)``.

    A stage class (subclass of :class:`compressflow.Stage`) declares ``kind`` (the key a
    pipeline writes: ``prune``), ``method`` (``magnitude``), a pydantic ``Params`` model, and
    ``run(model, ctx)``. Several plugins may add methods of one kind; one of them may set
    ``default = True`` to be used when a pipeline names no method.

    :param registry: the stage registrar; ``add`` raises if ``(kind, method)`` is taken.
    """


@hookspec
def register_model_sources(registry: ModelSourceRegistry) -> None:
    """Add model source schemes: ``registry.add("zoo", ZooSource())``.

    A pipeline names a model as ``<scheme>:<reference>`` (``zoo:mlp``, ``file:w.pt``); the
    source turns the reference and its ``args`` into a ``torch.nn.Module``. A source is a
    :class:`compressflow.ModelSource` (``load`` and an optional cheap ``check`` run during
    validation) or a plain callable ``(reference, args, ctx) -> nn.Module``.

    :param registry: the model-source registrar; ``add`` raises if the scheme is taken.
    """


@hookspec
def register_datasets(registry: DatasetRegistry) -> None:
    """Add datasets: ``registry.add("digits", factory)``.

    ``factory(spec, seed, input_shape)`` returns a :class:`compressflow.DataBundle` (train,
    validation and calibration loaders). ``spec`` is the resolved :class:`DataSpec`;
    ``input_shape`` is the shape the model declares for one sample (``model.input_shape``),
    or ``None`` when it declares none.

    :param registry: the dataset registrar; ``add`` raises if the name is taken.
    """


@hookspec
def register_metrics(registry: MetricRegistry) -> None:
    """Add task metrics: ``registry.add("accuracy", fn, higher_is_better=True)``.

    ``fn(model, loader) -> float`` evaluates a model in eval mode over a loader. The
    pipeline's ``evaluation.metric`` names one; it is measured after every stage.

    :param registry: the metric registrar; ``add`` raises if the name is taken.
    """


# --- lifecycle (observers) --------------------------------------------------------------


@hookspec
def pipeline_start(ctx: PipelineContext) -> None:
    """Called once the pipeline is validated, before the input model is evaluated.

    :param ctx: the pipeline's context: its spec, the tracking URI, the parent run id.
    """


@hookspec
def stage_start(stage: Stage, ctx: PipelineContext) -> None:
    """Called before a stage runs.

    :param stage: the stage about to run (its ``name``, ``kind``, ``method``, ``params``).
    :param ctx: the pipeline's context.
    """


@hookspec
def stage_progress(stage: Stage, step: int, total: int, metrics: dict[str, float]) -> None:
    """Called by long stages as they go (the training loop calls it once an epoch).

    :param stage: the running stage.
    :param step: steps done so far (1-based).
    :param total: steps the stage expects to do in all.
    :param metrics: the latest figures, e.g. ``{"train_loss": 0.12, "val_accuracy": 0.97}``.
    """


@hookspec
def stage_end(stage: Stage, result: StageResult, ctx: PipelineContext) -> None:
    """Called after a stage ran and its model was measured and logged.

    :param stage: the stage that ran.
    :param result: its result; ``result.metrics`` holds every measured figure.
    :param ctx: the pipeline's context.
    """


@hookspec
def stage_error(stage: Stage, error: BaseException, ctx: PipelineContext) -> None:
    """Called when a stage raised; its MLflow run is already marked FAILED.

    :param stage: the stage that failed.
    :param error: the exception it raised.
    :param ctx: the pipeline's context.
    """


@hookspec
def pipeline_end(ctx: PipelineContext, status: PipelineStatus) -> None:
    """Called once at the end, after the parent run is closed.

    :param ctx: the pipeline's context; ``ctx.results`` holds every finished stage's result.
    :param status: ``"FINISHED"`` or ``"FAILED"``.
    """
