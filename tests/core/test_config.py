"""YAML to PipelineSpec: lines, overrides, refusals."""

from __future__ import annotations

import pytest

from compressflow.config import load_pipeline
from compressflow.errors import ConfigError
from tests.conftest import write_pipeline

GOOD = """\
name: demo
model: {source: "zoo:mlp", args: {hidden: [16]}}
data: {dataset: digits}
stages:
  - name: base
    train: {epochs: 2}
  - prune: {method: magnitude, sparsity: 0.5}
"""


def _load(tmp_path, text, overrides=()):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return load_pipeline(path, list(overrides))


def test_stage_entries_and_default_names(tmp_path):
    loaded = _load(tmp_path, GOOD)
    assert [(s.name, s.kind, s.method, s.params) for s in loaded.stages] == [
        ("base", "train", None, {"epochs": 2}),
        ("1-prune", "prune", "magnitude", {"sparsity": 0.5}),
    ]
    assert loaded.place(("stages", 1, "prune", "sparsity")).endswith("p.yaml:7")
    # an absent key is placed at its nearest parent
    assert loaded.place(("stages", 1, "prune", "scope")).endswith("p.yaml:7")


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


@pytest.mark.parametrize("text, words", [
    ("", ["empty"]),
    ("- a\n- b\n", ["not a mapping"]),
    ("name: x\nstages: [\n", ["malformed YAML", "p.yaml:"]),
    (GOOD + "colour: blue\n", ["p.yaml:8", "unknown key 'colour'"]),
    (GOOD.replace("name: demo\n", ""), ["missing required key 'name'"]),
    (GOOD + "  - train: {}\n    prune: {}\n", ["p.yaml:8", "exactly one kind key"]),
    (GOOD + "  - name: base\n    finetune: {}\n", ["p.yaml:8", "'base' is used twice"]),
    (GOOD + "  - name: input\n    finetune: {}\n", ["reserved"]),
    (GOOD.replace("seed", "x") + "seed: many\n", ["p.yaml:8", "seed"]),
])
def test_bad_documents(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, text)
    for word in words:
        assert word in str(error.value)


def test_python_tag_is_refused_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = GOOD + f"extra: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, text)
    assert "p.yaml:8" in str(error.value) and "tag refused" in str(error.value)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_pipeline(tmp_path / "absent.yaml")


def test_content_hash_follows_content(tmp_path):
    first = load_pipeline(write_pipeline(tmp_path, [{"train": {"epochs": 1}}], name="a"))
    again = load_pipeline(write_pipeline(tmp_path, [{"train": {"epochs": 1}}], name="a"))
    other = load_pipeline(write_pipeline(tmp_path, [{"train": {"epochs": 2}}], name="a"))
    assert first.content_hash() == again.content_hash() != other.content_hash()


def test_override_into_a_section_left_to_defaults(tmp_path):
    loaded = _load(tmp_path, GOOD, ["measure.latency=false", "tracking.experiment=other"])
    assert loaded.spec.measure.latency is False and loaded.spec.tracking.experiment == "other"
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD, ["measure.speed=1"])
    assert "--set measure.speed" in str(error.value) and "unknown key 'speed'" in str(error.value)
