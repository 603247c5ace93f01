"""YAML to PipelineSpec: lines, refusals (overrides: test_overrides.py)."""

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


# --- hostile YAML: bounded, and every failure a ConfigError at file:line -------------------


def _laughs(levels: int = 9) -> str:
    """A 'billion laughs' document: each level lists the one before nine times."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n" + GOOD


def test_alias_bomb_is_refused_in_bounded_memory_and_time(tmp_path):
    import resource
    import subprocess
    import sys

    path = tmp_path / "p.yaml"
    path.write_text(_laughs())
    assert len(path.read_bytes()) < 1024  # 9**9 values once expanded
    limit = 1536 * 2**20

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    code = ("import sys\nfrom compressflow.config import load_pipeline\n"
            "from compressflow.errors import ConfigError\n"
            "try:\n    load_pipeline(sys.argv[1])\n"
            "except ConfigError as error:\n    print(error)\n    sys.exit(2)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], preexec_fn=cap_memory,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{path}:" in done.stdout and "aliases expand to too much" in done.stdout


def test_recursive_alias_is_refused(tmp_path):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD + "extra: &loop [1, *loop]\n")
    assert "p.yaml:8" in str(error.value) and "recursive" in str(error.value)


def test_aliases_and_merge_keys_still_work(tmp_path):
    text = GOOD.replace("train: {epochs: 2}", "train: &two {epochs: 2}") + (
        "  - finetune: *two\n  - finetune: {<<: *two, lr: 0.01}\n")
    loaded = _load(tmp_path, text)
    assert [s.params for s in loaded.stages[2:]] == [{"epochs": 2}, {"epochs": 2, "lr": 0.01}]


@pytest.mark.parametrize("nested", ["[" * 1000 + "]" * 1000, "{a: " * 1000 + "1" + "}" * 1000,
                                    "[" * 101 + "]" * 101])
def test_deep_nesting_is_refused(tmp_path, nested):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD + f"extra: {nested}\n")
    assert "p.yaml:8" in str(error.value) and "nested more than 100 deep" in str(error.value)


@pytest.mark.parametrize("junk, words", [
    (b"\x0c", ["p.yaml:8", "#x000c is not allowed"]),
    (b"\x00", ["p.yaml:8", "#x0000 is not allowed"]),
    (b"\xff", ["p.yaml:8", "not UTF-8", "0xff at column 15"]),
    (b"\xed\xa0\x80", ["p.yaml:8", "not UTF-8"]),  # a lone surrogate
])
def test_bytes_that_are_not_yaml_text(tmp_path, junk, words):
    path = tmp_path / "p.yaml"
    path.write_bytes(GOOD.encode() + b"description: a" + junk + b"b\n")
    with pytest.raises(ConfigError) as error:
        load_pipeline(path)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_a_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_pipeline(path).spec.name == "demo"


@pytest.mark.parametrize("value, words", [
    ("!!int abc", ["p.yaml:8", "cannot read int value 'abc'"]),
    ("!!bool maybe", ["p.yaml:8", "cannot read bool value 'maybe'"]),
    ("!!timestamp 2001-13-45", ["p.yaml:8", "timestamp"]),
    ("1" * 5000, ["p.yaml:8", "int", "digits"]),
    ("{? [a, b] : c}", ["p.yaml:8", "malformed YAML", "unhashable"]),
])
def test_values_yaml_cannot_convert(tmp_path, value, words):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD + f"extra: {value}\n")
    for word in words:
        assert word in str(error.value), str(error.value)
    assert "tag refused" not in str(error.value)


# --- stage entries: kinds, methods and names of the wrong type ------------------------------


@pytest.mark.parametrize("method", ["5", "[a]", "1.0e+308", "true", "{a: 1}"])
def test_method_must_be_a_name(tmp_path, method):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD + f"  - prune: {{method: {method}, sparsity: 0.5}}\n")
    assert "p.yaml:8" in str(error.value) and "method must be a name" in str(error.value)


@pytest.mark.parametrize("kind", ["~", "5", "true"])
def test_kind_key_must_be_a_name(tmp_path, kind):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD + f"  - {kind}: {{sparsity: 0.5}}\n")
    assert "p.yaml:8" in str(error.value) and "kind key must be a name" in str(error.value)


@pytest.mark.parametrize("name, words", [
    ("[a]", ["name must be a string", "list"]), ("{a: 1}", ["name must be a string"]),
    ("yes", ["name must be a string", "bool"]), ("a/b", ["path separator"]),
    ('"x\\ty"', ["control character"]),
])
def test_stage_name_must_be_plain_text(tmp_path, name, words):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD + f"  - name: {name}\n    finetune: {{}}\n")
    assert "p.yaml:8" in str(error.value)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_a_number_is_a_stage_name(tmp_path):
    assert _load(tmp_path, GOOD + "  - name: 7\n    finetune: {}\n").stages[2].name == "7"


# --- --set values that are not YAML, seeds out of range, numbers that are not finite --------


@pytest.mark.parametrize("seed, words", [
    ("99999999999999999999", ["less than 4294967296"]),
    ("-1", ["greater than or equal to 0"]),
    ("4294967296", ["less than 4294967296"]),
    ("4294967294", ["too large for 2 stage(s)", "below 4294967294"]),  # stage 1 runs with +2
    ("true", ["not true/false"]),
])
def test_seed_fits_numpy(tmp_path, seed, words):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, GOOD, [f"seed={seed}"])
    assert "--set seed" in str(error.value)
    for word in words:
        assert word in str(error.value), str(error.value)
    assert _load(tmp_path, GOOD, ["seed=4294967293"]).spec.seed == 2**32 - 3


@pytest.mark.parametrize("text, words", [
    (GOOD + "  - finetune: {}\n    gate: {max_metric_drop: .nan}\n", ["p.yaml:9", "finite number"]),
    (GOOD + "  - finetune: {}\n    gate: {min_size_ratio: .inf}\n", ["p.yaml:9", "finite number"]),
    (GOOD + "  - finetune: {}\n    gate: {max_metric_drop: no}\n", ["p.yaml:9", "not true/false"]),
    (GOOD + "select: {max_metric_drop: .inf}\n", ["p.yaml:8", "finite number"]),
    (GOOD + "measure: {batch_sizes: [1, 0]}\n", ["p.yaml:8", "batch_sizes.1"]),
    (GOOD.replace("{dataset: digits}", "{dataset: digits, batch_size: true}"),
     ["p.yaml:3", "batch_size", "not true/false"]),
])
def test_pipeline_numbers_are_finite_and_not_booleans(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, text)
    for word in words:
        assert word in str(error.value), str(error.value)
