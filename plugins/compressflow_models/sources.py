"""Loading models from files and from the MLflow store (torch and mlflow imported here)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressflow import ConfigError, ModelSpec, SourceContext


def load_file(path: Path, args: dict[str, Any], ctx: SourceContext) -> nn.Module:
    """A state dict loaded into ``args.architecture``, or a whole model if pickles are allowed."""
    if ctx.allow_pickle:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ConfigError(
                f"{ctx.place}: '{path}' is not a plain state dict ({str(error).splitlines()[0]})",
                "a pickled model runs code when loaded: set `allow_pickle: true` if you trust it",
            ) from None
    if isinstance(loaded, nn.Module):
        return loaded
    if "architecture" not in args:
        raise ConfigError(f"{ctx.place}: '{path}' holds a state dict but no architecture is given",
                          "add args: {architecture: {source: zoo:mlp, args: {...}}}")
    model = ctx.build_model(ModelSpec.model_validate(args["architecture"]))
    try:
        model.load_state_dict(loaded)
    except RuntimeError as error:
        raise ConfigError(f"{ctx.place}: '{path}' does not fit its architecture: "
                          f"{str(error).splitlines()[0]}",
                          "the architecture's args must match the saved model's") from None
    return model


def load_mlflow(reference: str, ctx: SourceContext) -> nn.Module:
    """A model logged to the pipeline's store, by runs:/ or models:/ URI."""
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    if ctx.tracking_uri:
        mlflow.set_tracking_uri(ctx.tracking_uri)
    try:
        return mlflow.pytorch.load_model(reference, map_location="cpu")
    except (MlflowException, OSError) as error:
        raise ConfigError(f"{ctx.place}: cannot load '{reference}' from {ctx.tracking_uri}: "
                          f"{str(error).splitlines()[0]}",
                          "check the run id or model name/version, and --tracking-uri") from None
