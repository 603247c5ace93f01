"""Registering the pipeline's final model in the MLflow model registry (``register:``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressflow.errors import ConfigError
from compressflow.tracking import Tag

if TYPE_CHECKING:
    from compressflow.config import RegisterSpec
    from compressflow.tracking import Tracker


def register_final(tracker: Tracker, register: RegisterSpec, model_uri: str | None) -> str:
    """A new version of ``register.name`` (with its alias) from the final stage's model."""
    if model_uri is None:
        raise ConfigError("register: the final model was not logged (tracking.log_models is off)",
                          "turn tracking.log_models on to register a model")
    version = tracker.register(model_uri, register.name, register.alias)
    tracker.set_tags({Tag.REGISTERED: f"{register.name}/{version}"})
    return version
