"""compressflow: YAML pipelines that compress PyTorch models, every stage a plugin.

What a plugin author imports lives here; the contract itself is :mod:`compressflow.hookspecs`.
Importing this package imports neither torch nor mlflow.
"""

from compressflow.data import DataContext, DataInfo, DataPath, Dataset, DatasetParams
from compressflow.errors import CompressflowError, ConfigError, PluginError, StageFailed
from compressflow.executor import ExecutorOptions, SweepExecutor, SweepJob, VariantOutcome, run_job
from compressflow.hookspecs import hookimpl
from compressflow.stage import (
    DataBundle,
    DataSpec,
    ModelSource,
    ModelSpec,
    OptionalStageRef,
    PipelineContext,
    SourceContext,
    Stage,
    StageContext,
    StageParams,
    StageRef,
    StageResult,
)
from compressflow.task import Task, TaskMetric, TaskParams

__version__ = "0.1.0"

__all__ = [
    "CompressflowError",
    "ConfigError",
    "DataBundle",
    "DataContext",
    "DataInfo",
    "DataPath",
    "Dataset",
    "DatasetParams",
    "DataSpec",
    "ExecutorOptions",
    "ModelSource",
    "ModelSpec",
    "OptionalStageRef",
    "PipelineContext",
    "PluginError",
    "SourceContext",
    "Stage",
    "StageContext",
    "StageFailed",
    "StageParams",
    "StageRef",
    "StageResult",
    "SweepExecutor",
    "SweepJob",
    "Task",
    "TaskMetric",
    "TaskParams",
    "VariantOutcome",
    "hookimpl",
    "run_job",
    "__version__",
]
