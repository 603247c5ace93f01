"""Mutated pipelines: validation says what is wrong (CompressflowError) or accepts; it never
raises anything else.

A seeded mutator rewrites the shipped pipelines (bytes flipped or deleted, lines duplicated,
dropped or swapped, values swapped between keys or replaced by other types, odd characters,
``--set`` overrides) and validates each mutant in-process with one set of loaded plugins.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from compressflow.engine import validate
from compressflow.errors import CompressflowError
from compressflow.plugins import load_plugins
from compressflow.sweep import plan_variants
from tests.conftest import REPO

PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))
SEED = 20240601
COUNT = 300

# values of other types, and YAML that is hard to read: what a slip of the keyboard makes
VALUES = [
    "5", "-1", "0", "1.0e+308", "-1.0e+308", ".inf", "-.inf", ".nan", "99999999999999999999",
    "1" * 5000, "[a]", "[]", "{}", "{a: 1}", "null", "~", "true", "no", "''", '"x"', "2:4",
    "2001-12-14", "!!binary aGVsbG8=", "!!set {a: null}", "!!omap [a: 1]", "!!int x",
    "!!timestamp 2001-13-45", "!!python/name:os.system", "!custom x", "*nowhere", "&a [1, *a]",
    "[[[[[[[[[[]]]]]]]]]]", "? [a]\n  : b", "<<: 5", "'\\x0c'", '"\\x00"', "zoo:", "input",
    "previous", "magnitude", "digits", "import:builtins:dict", "file:../nowhere.pt",
]
ODD = ["\t", "\x00", "\x0c", "\x7f", "\ufeff", "\u2028", "\ud800", "\xff", "é", "%", "@", "`",
       "&", "*", "!", "|", ">", "#", "---\n", "...\n", "- ", ": ", "{", "}", "[", "]", ","]
OVERRIDES = [
    "seed=[", "seed=*x", "seed=\t", "seed=@", "seed=99999999999999999999", "seed=-3",
    "seed=4294967295", "name=", "stages.0=5", "stages.0.x.y=1", "model.args=[", "stages=[]",
    "data.batch_size=.nan", "measure.repeats=1.5", "evaluation.metric=5", "task=5",
    "task.name=[a]", "stages.-1.x=1", "stages.99=1", "a..b=1", ".=1", "=1", "seed",
]


TREE_VALUES = [0, 1, -1, 2**31, 2**64, 10**30, 0.5, -0.5, 1e-300, 1e300, float("inf"),
               float("nan"), True, False, None, "", "x", "\x00", "../..", "a/b", "zoo:mlp",
               "import:os:getcwd", "file:", "runs:/x", [], [1, "a"], {}, {"a": 1}, {"source": 1},
               [[[]]], "2:4", "8", "1e3"]


@dataclass
class Mutant:
    """A mutated pipeline: where it came from, what was done, its bytes and overrides."""

    source: Path
    index: int
    ops: list[str]
    data: bytes
    overrides: list[str]


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True) or [b""]


def _value_lines(lines: list[bytes]) -> list[int]:
    return [i for i, line in enumerate(lines) if b": " in line and not line.lstrip().startswith(b"#")]


def _set_value(line: bytes, value: bytes) -> bytes:
    key, _, _ = line.partition(b": ")
    return key + b": " + value + b"\n"


def _mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    lines = _lines(data)
    op = rng.choice(["flip", "delete", "duplicate", "drop", "swap-lines", "swap-values",
                     "retype", "odd", "indent", "rename"])
    if op == "flip" and data:
        at = rng.randrange(len(data))
        return f"flip@{at}", data[:at] + bytes([rng.randrange(256)]) + data[at + 1:]
    if op == "delete" and data:
        at = rng.randrange(len(data))
        return f"delete@{at}", data[:at] + data[at + rng.randint(1, 20):]
    at = rng.randrange(len(lines))
    if op == "duplicate":
        return f"duplicate:{at}", b"".join(lines[:at + 1] + lines[at:])
    if op == "drop":
        return f"drop:{at}", b"".join(lines[:at] + lines[at + 1:])
    if op == "swap-lines":
        other = rng.randrange(len(lines))
        lines[at], lines[other] = lines[other], lines[at]
        return f"swap-lines:{at},{other}", b"".join(lines)
    valued = _value_lines(lines)
    if op == "swap-values" and len(valued) > 1:
        a, b = rng.sample(valued, 2)
        value_a, value_b = (lines[i].partition(b": ")[2].rstrip(b"\n") for i in (a, b))
        lines[a], lines[b] = _set_value(lines[a], value_b), _set_value(lines[b], value_a)
        return f"swap-values:{a},{b}", b"".join(lines)
    if op == "retype" and valued:
        at, value = rng.choice(valued), rng.choice(VALUES)
        lines[at] = _set_value(lines[at], value.encode())
        return f"retype:{at}={value[:20]!r}", b"".join(lines)
    if op == "indent":
        lines[at] = b"  " + lines[at] if rng.random() < 0.5 else lines[at].removeprefix(b"  ")
        return f"indent:{at}", b"".join(lines)
    if op == "rename" and valued:
        at = rng.choice(valued)
        key = rng.choice(["name", "method", "gate", "data", "stages", "seed", "x", "5", "~", "<<"])
        indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
        lines[at] = indent + key.encode() + b": " + lines[at].partition(b": ")[2]
        return f"rename:{at}={key}", b"".join(lines)
    odd = rng.choice(ODD).encode("utf-8", "surrogatepass")
    where = rng.randrange(len(data) + 1)
    return f"odd@{where}={odd!r}", data[:where] + odd + data[where:]


def _paths(tree, loc=()) -> Iterator[tuple]:
    yield loc
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield from _paths(value, loc + (key,))


def _mutate_tree(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """A value of the parsed document replaced, or a key added: deeper than text edits reach."""
    tree = yaml.safe_load(data)
    loc = rng.choice([p for p in _paths(tree) if p])
    parent = tree
    for key in loc[:-1]:
        parent = parent[key]
    value = rng.choice(TREE_VALUES)
    if isinstance(parent, dict) and rng.random() < 0.2:
        loc = loc[:-1] + (rng.choice(["x", "method", "args", "name", "data", "gate", "source"]),)
    parent[loc[-1]] = value
    return f"tree:{'.'.join(map(str, loc))}={value!r}", yaml.safe_dump(tree).encode()


def mutants(count: int = COUNT, seed: int = SEED) -> Iterator[Mutant]:
    """``count`` mutants of the shipped pipelines, the same ones for the same seed."""
    rng = random.Random(seed)
    sources = {path: path.read_bytes() for path in PIPELINES}
    for index in range(count):
        source = rng.choice(PIPELINES)
        data, ops = sources[source], []
        if rng.random() < 0.3:
            op, data = _mutate_tree(rng, data)
            ops.append(op)
        for _ in range(rng.choice([0, 1, 1, 2, 3]) if ops else rng.choice([1, 1, 2, 3])):
            op, data = _mutate(rng, data)
            ops.append(op)
        overrides = [rng.choice(OVERRIDES)] if rng.random() < 0.15 else []
        yield Mutant(source, index, ops, data, overrides)


def write_mutant(mutant: Mutant, folder: Path) -> Path:
    """The mutant as a file beside a ``data`` folder like the repository's, so that the
    pipelines' relative paths (``../data/mnist``) resolve as they do from ``pipelines/``."""
    (folder / "pipelines").mkdir(exist_ok=True)
    if (REPO / "data").is_dir() and not (folder / "data").exists():
        (folder / "data").symlink_to(REPO / "data")
    path = folder / "pipelines" / mutant.source.name
    path.write_bytes(mutant.data)
    return path


def check(path: Path, overrides: list[str], plugins) -> None:
    """What ``compressflow run --dry-run`` checks: the plan, and each variant of a sweep."""
    plan = validate(path, overrides, plugins)
    if plan.spec.sweep is not None:
        plan_variants(path, overrides, plugins)


@pytest.fixture(scope="module")
def plugins():
    """One set of plugins for every mutant: loading them is most of a validation's time."""
    return load_plugins()


def test_mutated_pipelines_fail_only_with_a_compressflow_error(tmp_path, plugins):
    unexpected, refused = [], 0
    for mutant in mutants():
        path = write_mutant(mutant, tmp_path)
        try:
            check(path, mutant.overrides, plugins)
        except CompressflowError as error:
            refused += 1
            assert error.exit_code == 2 and error.message, (mutant.ops, error)
        except Exception:  # noqa: BLE001 - anything else is the finding
            unexpected.append(f"#{mutant.index} {mutant.source.name} {mutant.ops} "
                              f"{mutant.overrides}:\n{traceback.format_exc(limit=-3)}")
    assert not unexpected, f"{len(unexpected)} mutant(s) raised:\n" + "\n".join(unexpected[:5])
    # a mutator that breaks nothing, or everything, tests little
    assert 0.2 * COUNT < refused < 0.95 * COUNT, refused


def test_mutants_are_reproducible():
    first, again = list(mutants(20)), list(mutants(20))
    assert [m.data for m in first] == [m.data for m in again]
    assert len({m.data for m in first}) > 15
