"""compressflow: YAML pipelines that compress PyTorch models, every stage a plugin.

What a plugin author imports lives here; the contract itself is :mod:`compressflow.hookspecs`.
Importing this package imports neither torch nor mlflow.
"""

from compressflow.errors import CompressflowError, ConfigError, PluginError, StageFailed
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

__version__ = "0.1.0"

__all__ = [
    "CompressflowError",
    "ConfigError",
    "DataBundle",
    "DataSpec",
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
    "hookimpl",
    "__version__",
]
