"""The plugin contract of compressflow: every hook a plugin may implement.

With the public types these hooks name (importable from ``compressflow``: Stage,
StageContext, StageResult, Task, Dataset, DataBundle, DataContext, ModelSource, and for a
sweep executor SweepExecutor, SweepJob, ExecutorOptions, VariantOutcome, run_job), this is all
a plugin author reads; docs/architecture.md shows how a run uses them.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names are the
hooks below, declared in the entry-point group ``compressflow`` of its distribution::

    [project.entry-points.compressflow]
    lowrank = "compressflow_lowrank"

Registration hooks run once, when plugins load, and hand the plugin a registrar; a name
registered twice is a conflict that names both plugins. Lifecycle hooks are for observers (a
notifier, a report, a progress bar): they see every pipeline and stage but change nothing.
One that raises is reported as a warning naming the plugin and the hook, and the run goes on.
A plugin implements only the hooks it needs, with only the parameters it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pluggy

if TYPE_CHECKING:
    from compressflow.registry import (
        DatasetRegistry,
        ExecutorRegistry,
        MetricRegistry,
        ModelSourceRegistry,
        StageRegistry,
        TaskRegistry,
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
    ``run(model, ctx) -> StageResult``. Several plugins may add methods of one kind; one of
    them may set ``default = True`` to be used when a pipeline names no method. ``tasks``
    (optional) names the tasks it serves; a pipeline of another task fails validation.

    ``ctx`` is a :class:`compressflow.StageContext`: ``ctx.data`` (a DataBundle),
    ``ctx.task`` (every model call, loss and metric goes through it: ``ctx.task.split(batch)``,
    ``ctx.task.predict(model, inputs)``, ``ctx.task.loss(...)``), ``ctx.evaluate(model)``,
    ``ctx.model_at(ref)``, ``ctx.reference()``, ``ctx.build_model(spec)``, ``ctx.seed``,
    ``ctx.workdir``, ``ctx.log_metric(name, value, step)``. The result's ``metrics`` may not
    reuse a name the engine measures; a packed file's size goes in ``packed_bytes``.

    :param registry: the stage registrar; ``add`` raises if ``(kind, method)`` is taken.
    """


@hookspec
def register_model_sources(registry: ModelSourceRegistry) -> None:
    """Add model source schemes: ``registry.add("zoo", ZooSource())``.

    A pipeline names a model as ``<scheme>:<reference>`` (``zoo:mlp``, ``file:w.pt``); the
    source turns the reference and its ``args`` into a ``torch.nn.Module``. A source is a
    :class:`compressflow.ModelSource` (``load``, and an optional cheap ``check`` and
    ``digest`` run during validation: ``digest`` fingerprints the files a reference names,
    for the stage keys) or a plain callable ``(reference, args, ctx) -> nn.Module``.

    :param registry: the model-source registrar; ``add`` raises if the scheme is taken.
    """


@hookspec
def register_datasets(registry: DatasetRegistry) -> None:
    """Add datasets: ``registry.add("csv", CsvDataset)``.

    A dataset is a :class:`compressflow.Dataset` subclass with a pydantic ``Params`` model
    (its settings, written under ``data.args`` and validated with the whole pipeline before
    anything runs; a :data:`compressflow.DataPath` field resolves from the pipeline file's
    folder), an optional cheap ``check(params, ctx)`` and ``digest(params, ctx)`` (a
    fingerprint of the files, for the stage keys) run during validation, and
    ``load(params, ctx) -> DataBundle``. ``ctx`` is a :class:`compressflow.DataContext`:
    the ``data:`` spec (batch size, fractions), seed, the pipeline's folder, the task's name,
    the input model's ``input_shape`` and the model itself (a tokenizer's owner).

    A :class:`compressflow.DataBundle` holds the ``train``, ``val`` (the evaluated split),
    ``calibration`` and optional ``holdout`` loaders, and ``info`` for MLflow. Loaders yield
    ``(inputs, targets)`` pairs (inputs a tensor, tuple or dict of tensors) or dicts of
    tensors; :mod:`compressflow.task` says how a task reads them. A plain factory
    ``(spec, seed, input_shape) -> DataBundle`` (the form before params) still registers.

    :param registry: the dataset registrar; ``add`` raises if the name is taken.
    """


@hookspec
def register_metrics(registry: MetricRegistry) -> None:
    """Add extra metrics: ``registry.add("top5", fn, higher_is_better=True, tasks=("classification",))``.

    ``fn(model, loader) -> float`` evaluates a model in eval mode over a loader of the
    task's batches. A task's own metrics come with the task (:func:`register_tasks`);
    these are measured beside them when ``evaluation.extra`` names them. ``tasks`` lists
    the tasks whose batches ``fn`` understands (default: classification; None: any); a
    pipeline naming a metric that does not fit its task fails validation.

    :param registry: the metric registrar; ``add`` raises if the name is taken.
    """


@hookspec
def register_tasks(registry: TaskRegistry) -> None:
    """Add tasks: ``registry.add(MyTask)``, a :class:`compressflow.task.Task` subclass.

    A task says how a batch feeds a model (``split``, ``feed``, ``prediction``), what a
    training stage minimizes (``loss(outputs, targets, reference)``), which metrics it
    measures (``metrics``: name -> :class:`compressflow.task.TaskMetric` with its
    direction), and how example inputs for signatures, MACs and latency are built
    (``examples``). ``uses_reference``: its metrics compare with the pipeline's input model.
    A pipeline names one with ``task:``; the default is ``classification``.

    :param registry: the task registrar; ``add`` raises if the task's name is taken.
    """


@hookspec
def register_executors(registry: ExecutorRegistry) -> None:
    """Add sweep executors: ``registry.add(RayExecutor())``.

    An executor is a :class:`compressflow.executor.SweepExecutor` with a ``name`` (what
    ``compressflow run --executor NAME`` says) and ``run(jobs, options)``: it runs
    :func:`compressflow.executor.run_job` on each :class:`~compressflow.executor.SweepJob`
    wherever it schedules work, gives the jobs stage-key locks that hold across all its
    workers (so a shared baseline is computed once), and returns one outcome a job.
    ``options`` carries ``--jobs`` and ``--address``. ``local`` (worker processes) is built
    in. Import the engine it drives inside ``run``, so that a user without it still loads
    the plugin and is told what to install.

    :param registry: the executor registrar; ``add`` raises if the name is taken.
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
