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


def test_a_duplicate_is_a_conflict_a_plugin_error_that_names_both():
    from compressflow.registry import Conflict, MetricRegistry

    registry = MetricRegistry()
    registry.current_provider = Provider("a", "dist-a", "1")
    registry.add("top5", lambda model, loader: 0.0)
    registry.current_provider = Provider("b", "dist-b", "2")
    with pytest.raises(Conflict, match="by plugin 'a'.*by plugin 'b'") as error:
        registry.add("top5", lambda model, loader: 1.0)
    assert isinstance(error.value, PluginError) and error.value.hint
    stages = StageRegistry()
    stages.add(_stage("prune", "magnitude", default=True))
    with pytest.raises(Conflict, match="registered twice"):
        stages.add(_stage("prune", "magnitude"))
    with pytest.raises(Conflict, match="two default methods"):
        stages.add(_stage("prune", "taylor", default=True))


def test_an_unknown_name_mentions_the_plugins_that_failed():
    registry = DatasetRegistry()
    registry.add("digits", Dataset)
    registry.broken_note = "some plugins failed to load: plugin 'mine' = 'my_data' failed"
    with pytest.raises(ConfigError) as error:
        registry.get("mine", "p.yaml:4")
    assert "p.yaml:4: unknown dataset 'mine'" in error.value.message
    assert "plugin 'mine' = 'my_data' failed" in error.value.hint
