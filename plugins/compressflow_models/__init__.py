"""Built-in model sources: ``zoo:``, ``import:``, ``file:`` and ``mlflow:``.

This module stays light (no torch) so that validation is fast; models are built by
:mod:`compressflow_models.zoo` and :mod:`compressflow_models.sources` when a run needs them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from compressflow import ConfigError, ModelSource, SourceContext, hookimpl

# name -> the args its constructor takes (checked during validation, before torch loads)
ZOO_ARGS = {
    "mlp": {"in_features", "hidden", "num_classes"},
    "cnn": {"channels", "hidden", "num_classes"},
    "resnet": {"width", "blocks", "num_classes"},
    "lenet5": {"num_classes"},
}


class ZooSource(ModelSource):
    """``zoo:mlp``, ``zoo:cnn``, ``zoo:resnet``: small models for 64 features or 1x8x8 images;
    ``zoo:lenet5``: the paper's LeNet-5 for 1x28x28 (MNIST)."""

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        if reference not in ZOO_ARGS:
            raise ConfigError(f"{ctx.place}: unknown zoo model '{reference}'",
                              f"the zoo has: {', '.join(sorted(ZOO_ARGS))}")
        unknown = set(args) - ZOO_ARGS[reference]
        if unknown:
            raise ConfigError(f"{ctx.place}: zoo:{reference} takes no arg {', '.join(sorted(unknown))}",
                              f"zoo:{reference} takes: {', '.join(sorted(ZOO_ARGS[reference]))}")

    def load(self, reference: str, args: dict[str, Any], ctx: SourceContext):
        from compressflow_models import zoo

        self.check(reference, args, ctx)
        return zoo.BUILDERS[reference](**args)


class ImportSource(ModelSource):
    """``import:package.module:factory``: calls ``factory(**args)``."""

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        module, sep, attr = reference.partition(":")
        if not sep or not module or not attr:
            raise ConfigError(f"{ctx.place}: import source '{reference}' is not module:factory",
                              "write import:package.module:factory")
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise ConfigError(f"{ctx.place}: no module named '{module.split('.')[0]}'",
                              "install the package that provides the factory")

    def load(self, reference: str, args: dict[str, Any], ctx: SourceContext):
        import importlib

        self.check(reference, args, ctx)
        module, _, attr = reference.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        return factory(**args)


class FileSource(ModelSource):
    """``file:weights.pt``: a state dict with ``args.architecture`` (a model spec) to load it into;
    a whole pickled model only with ``allow_pickle: true``. Paths are relative to the pipeline."""

    def path(self, reference: str, ctx: SourceContext) -> Path:
        path = Path(reference).expanduser()
        return path if path.is_absolute() else ctx.base_dir / path

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        if not self.path(reference, ctx).is_file():
            raise ConfigError(f"{ctx.place}: model file '{self.path(reference, ctx)}' does not exist",
                              "paths are relative to the pipeline file's folder")
        unknown = set(args) - {"architecture"}
        if unknown:
            raise ConfigError(f"{ctx.place}: file: takes no arg {', '.join(sorted(unknown))}",
                              "file: takes `architecture: {source: ..., args: ...}` for a state dict")

    def load(self, reference: str, args: dict[str, Any], ctx: SourceContext):
        from compressflow_models.sources import load_file

        self.check(reference, args, ctx)
        return load_file(self.path(reference, ctx), args, ctx)


class MlflowSource(ModelSource):
    """``mlflow:runs:/<run_id>/model`` or ``mlflow:models:/<name>/<version>`` from the store.

    Models logged by compressflow are pickles: load only from a store you trust."""

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        if not reference.startswith(("runs:/", "models:/")):
            raise ConfigError(f"{ctx.place}: mlflow source '{reference}' is not runs:/ or models:/",
                              "write mlflow:runs:/<run_id>/model or mlflow:models:/<name>/<version>")

    def load(self, reference: str, args: dict[str, Any], ctx: SourceContext):
        from compressflow_models.sources import load_mlflow

        self.check(reference, args, ctx)
        return load_mlflow(reference, ctx)


@hookimpl
def register_model_sources(registry) -> None:
    """The four built-in schemes."""
    registry.add("zoo", ZooSource())
    registry.add("import", ImportSource())
    registry.add("file", FileSource())
    registry.add("mlflow", MlflowSource())
