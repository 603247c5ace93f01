"""Built-in model sources: ``zoo:``, ``import:``, ``file:`` and ``mlflow:``.

This module stays light (no torch) so that validation is fast; models are built by
:mod:`compressflow_models.zoo` and :mod:`compressflow_models.sources` when a run needs them.

``import:`` calls whatever the pipeline names, and ``mlflow:`` and ``file:`` with
``allow_pickle: true`` unpickle, which runs code too. With ``COMPRESSFLOW_TRUSTED_ONLY=1``
(``--trusted-only``) each refuses, at the place in the pipeline, during validation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from compressflow import ConfigError, ModelSource, SourceContext, hookimpl
from compressflow.fingerprint import files_digest
from compressflow.plugins import TRUSTED_ONLY_ENV, trusted_only

_Width = Annotated[int, Field(strict=True, ge=1)]
_Count = Annotated[int, Field(strict=True, ge=0)]
# name -> the args its constructor takes and their types, checked during validation (before
# torch loads): `num_classes: 0` or `hidden: 5` would otherwise fail deep inside torch
ZOO_ARGS: dict[str, dict[str, Any]] = {
    "mlp": {"in_features": _Width, "hidden": list[_Width], "num_classes": _Width},
    "cnn": {"channels": Annotated[list[_Width], Field(min_length=2, max_length=2)],
            "hidden": _Width, "num_classes": _Width},
    "resnet": {"width": _Width, "blocks": list[_Count], "num_classes": _Width},
    "lenet5": {"num_classes": _Width},
}
_ZOO_HINTS = {
    "in_features": "inputs per sample: 64 for digits, 784 for MNIST",
    "hidden": "zoo:mlp: a list of layer widths, e.g. [32]; zoo:cnn: one width, e.g. 64",
    "num_classes": "outputs: 10 for digits and MNIST, 1 for a regression",
    "channels": "two conv widths, e.g. [16, 32]",
    "width": "the stem's conv width, e.g. 16",
    "blocks": "residual blocks per stage, e.g. [1, 1]",
}

# what each scheme that runs code does, as a refusal says it
RUNS_CODE = {
    "import": "import: runs code named in the pipeline",
    "mlflow": "mlflow: loads a pickled model (unpickling runs code)",
}


def refuse_untrusted(what: str, ctx: SourceContext) -> None:
    """A ConfigError at ``ctx.place`` saying ``what``, when the trusted-only switch is on."""
    if trusted_only():
        raise ConfigError(
            f"{ctx.place}: {what}; {TRUSTED_ONLY_ENV}=1 (--trusted-only) refuses it",
            "build the model with zoo: or from a plain state dict (file: with architecture:); "
            f"for a pipeline and models you trust, unset {TRUSTED_ONLY_ENV} or drop --trusted-only",
        )


class ZooSource(ModelSource):
    """``zoo:mlp``, ``zoo:cnn``, ``zoo:resnet``: small models for 64 features or 1x8x8 images;
    ``zoo:lenet5``: the paper's LeNet-5 for 1x28x28 (MNIST)."""

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        if reference not in ZOO_ARGS:
            raise ConfigError(f"{ctx.place}: unknown zoo model '{reference}'",
                              f"the zoo has: {', '.join(sorted(ZOO_ARGS))}")
        takes = ZOO_ARGS[reference]
        unknown = set(args) - set(takes)
        if unknown:
            raise ConfigError(
                f"{ctx.place}: zoo:{reference} takes no arg {', '.join(sorted(map(str, unknown)))}",
                f"zoo:{reference} takes: {', '.join(sorted(takes))}")
        for name, value in args.items():
            try:
                TypeAdapter(takes[name]).validate_python(value)
            except ValidationError as error:
                problem = error.errors()[0]["msg"]
                raise ConfigError(f"{ctx.place}: zoo:{reference} arg {name}: {problem} (got {value!r})",
                                  _ZOO_HINTS.get(name, "")) from None

    def load(self, reference: str, args: dict[str, Any], ctx: SourceContext):
        from compressflow_models import zoo

        self.check(reference, args, ctx)
        return zoo.BUILDERS[reference](**args)


class ImportSource(ModelSource):
    """``import:package.module:factory``: calls ``factory(**args)``."""

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        refuse_untrusted(RUNS_CODE["import"], ctx)
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
        if ctx.allow_pickle:
            refuse_untrusted("file: with allow_pickle: true unpickles the file (unpickling runs code)", ctx)
        architecture = args.get("architecture")
        source = architecture.get("source", "") if isinstance(architecture, dict) else ""
        scheme = str(source).partition(":")[0]
        if scheme in RUNS_CODE:  # built only at run time: refused now, while validating
            refuse_untrusted(f"{RUNS_CODE[scheme]} (the architecture of file:{reference})", ctx)
        if not self.path(reference, ctx).is_file():
            raise ConfigError(f"{ctx.place}: model file '{self.path(reference, ctx)}' does not exist",
                              "paths are relative to the pipeline file's folder")
        unknown = set(args) - {"architecture"}
        if unknown:
            raise ConfigError(f"{ctx.place}: file: takes no arg {', '.join(sorted(unknown))}",
                              "file: takes `architecture: {source: ..., args: ...}` for a state dict")

    def digest(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> str | None:
        """A sha256 of the file's bytes: weights replaced in place change the stage keys."""
        return files_digest([self.path(reference, ctx)])

    def load(self, reference: str, args: dict[str, Any], ctx: SourceContext):
        from compressflow_models.sources import load_file

        self.check(reference, args, ctx)
        return load_file(self.path(reference, ctx), args, ctx)


class MlflowSource(ModelSource):
    """``mlflow:runs:/<run_id>/model`` or ``mlflow:models:/<name>/<version>`` from the store.

    Models logged by compressflow are pickles: load only from a store you trust."""

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        refuse_untrusted(RUNS_CODE["mlflow"], ctx)
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
