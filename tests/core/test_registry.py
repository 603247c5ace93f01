"""Registrars: duplicates name both providers; each kind has a default method."""

from __future__ import annotations

import pytest

from compressflow.data import Dataset

from compressflow import Stage, StageParams
from compressflow.errors import ConfigError, PluginError
from compressflow.registry import DatasetRegistry, Provider, StageRegistry


def _stage(kind, method, default=False):
    return type(f"{kind}_{method}", (Stage,), {"kind": kind, "method": method, "default": default,
                                                "Params": StageParams})


def test_duplicate_stage_names_both_providers():
    registry = StageRegistry()
    registry.current_provider = Provider("prune", "compressflow", "0.1.0")
    registry.add(_stage("prune", "magnitude"))
    registry.current_provider = Provider("wanda", "compressflow-wanda", "2.0")
    with pytest.raises(PluginError) as error:
        registry.add(_stage("prune", "magnitude"))
    assert "compressflow 0.1.0" in str(error.value) and "compressflow-wanda 2.0" in str(error.value)


def test_duplicate_dataset_names_both_providers():
    registry = DatasetRegistry()
    registry.current_provider = Provider("data", "compressflow", "0.1.0")
    registry.add("digits", Dataset)
    registry.current_provider = Provider("more", "more-data", "1.0")
    with pytest.raises(PluginError, match="by plugin 'data'.*by plugin 'more'"):
        registry.add("digits", Dataset)
    with pytest.raises(PluginError, match="not a Dataset subclass"):
        registry.add("other", object())


def test_default_method_declared_or_only():
    registry = StageRegistry()
    registry.add(_stage("prune", "magnitude", default=True))
    registry.add(_stage("prune", "wanda"))
    registry.add(_stage("export", "onnx"))
    registry.add(_stage("quantize", "a"))
    registry.add(_stage("quantize", "b"))
    assert registry.get("prune", None, "here").method == "magnitude"
    assert registry.get("export", None, "here").method == "onnx"
    with pytest.raises(ConfigError, match="needs a method"):
        registry.get("quantize", None, "here")
    with pytest.raises(PluginError, match="two default methods"):
        registry.add(_stage("prune", "taylor", default=True))
