"""--set PATH=VALUE on a pipeline file: typed by YAML, placed, every wrong path refused."""

from __future__ import annotations

import pytest

from compressflow.errors import ConfigError
from compressflow.overrides import apply_override, split_path
from tests.core.test_config import GOOD, _load


def test_a_dotted_path_indexes_lists_by_its_digits_and_a_sweep_sets_a_value_as_it_is():
    assert split_path("stages.2.prune.sparsity") == ["stages", 2, "prune", "sparsity"]
    raw = {"stages": [{"prune": {"sparsity": 0.5}}]}
    assert apply_override(raw, ("stages.0.prune.sparsity", "0.9")) == "stages.0.prune.sparsity"
    assert raw["stages"][0]["prune"]["sparsity"] == "0.9"  # a sweep's value is not YAML-read
    apply_override(raw, "measure.latency=false", ("measure",))
    assert raw["measure"] == {"latency": False}
    with pytest.raises(ConfigError, match="does not exist"):
        apply_override(raw, "tracking.uri=x")  # not an optional section here


def test_override_is_typed_and_placed(tmp_path):
    loaded = _load(tmp_path, GOOD, ["stages.1.prune.sparsity=0.9", "stages.1.prune.scope=layer",
                                    "name=0042"])
    assert loaded.stages[1].params == {"sparsity": 0.9, "scope": "layer"}
    assert loaded.spec.name == "0042"  # a string stays a string
    assert loaded.place(("stages", 1, "prune", "sparsity")) == "--set stages.1.prune.sparsity"


@pytest.mark.parametrize("override, words", [
    ("stages.5.prune.sparsity=0.9", ["stages.5", "does not exist"]),
    ("stages.1.quantize.bits=4", ["stages.1.quantize", "does not exist"]),
    ("nothing.here=1", ["nothing", "does not exist"]),
    ("no-equals-sign", ["PATH=VALUE"]),
])
def test_bad_override(tmp_path, override, words):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD, [override])
    for word in words:
        assert word in str(error.value)


def test_override_into_a_section_left_to_defaults(tmp_path):
    loaded = _load(tmp_path, GOOD, ["measure.latency=false", "tracking.experiment=other"])
    assert loaded.spec.measure.latency is False and loaded.spec.tracking.experiment == "other"
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD, ["measure.speed=1"])
    assert "--set measure.speed" in str(error.value) and "unknown key 'speed'" in str(error.value)


@pytest.mark.parametrize("override, words", [
    ("seed=[", ["--set seed", "malformed YAML", "quote a string"]),
    ("seed=*x", ["--set seed", "undefined alias"]),
    ("seed=\t", ["--set seed", "'\\t'", "quote a string"]),
    ("seed=@", ["--set seed", "'@'"]),
    ("description=`", ["--set description", "'`'"]),
    ("seed=!!python/name:os.system", ["--set seed", "tag refused"]),
    ("seed=" + "[" * 200 + "]" * 200, ["--set seed", "nested more than 100 deep"]),
])
def test_set_value_that_is_not_yaml(tmp_path, override, words):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD, [override])
    for word in words:
        assert word in str(error.value), str(error.value)
