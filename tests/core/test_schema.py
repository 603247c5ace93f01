"""The published JSON Schema (``compressflow schema``) accepts what validation accepts.

An editor that checks pipelines against the schema must not flag a pipeline that runs:
every shipped pipeline, every form config.py reads (``task: <name>``, a stage's ``gate``),
and every mutant of them that ``validate`` passes. It still refuses unknown keys.
"""

from __future__ import annotations

import re

import pytest
import yaml

from compressflow.engine import validate
from compressflow.errors import CompressflowError
from compressflow.plugins import load_plugins
from compressflow.schema import pipeline_schema
from tests.conftest import REPO
from tests.core.test_fuzz import mutants, write_mutant

jsonschema = pytest.importorskip("jsonschema")

PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


@pytest.fixture(scope="module")
def plugins():
    """The plugins the schema describes, loaded once."""
    return load_plugins()


@pytest.fixture(scope="module")
def validator(plugins):
    """A JSON Schema validator for the loaded plugins' pipeline schema."""
    schema = pipeline_schema(plugins)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _problems(validator, document) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}"
            for e in validator.iter_errors(document)]


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_fits_the_schema(validator, path):
    assert _problems(validator, yaml.safe_load(path.read_text())) == []


BASE = {"name": "demo", "model": {"source": "zoo:mlp", "args": {"hidden": [16]}},
        "data": {"dataset": "digits"}}


@pytest.mark.parametrize("extra", [
    {"task": "classification"},
    {"task": {"name": "classification"}},
    {"stages": [{"name": "base", "train": {"epochs": 1}},
                {"prune": {"sparsity": 0.5}, "gate": {"max_metric_drop": 0.1, "against": "base"}}]},
    {"stages": [{"name": 3, "train": None}]},
    {"stages": [{"train": {}, "data": {"batch_size": 32}}]},
    {"register": {"name": "m", "alias": "champion"}, "select": {"then": "fastest"}},
], ids=["task-by-name", "task-mapping", "gate", "number-name-and-no-params", "stage-data",
        "register"])
def test_forms_validation_reads_fit_the_schema(tmp_path, validator, plugins, extra):
    document = {**BASE, "stages": [{"train": {"epochs": 1}}], **extra}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(document))
    validate(path, plugins=plugins)  # the form is valid...
    assert _problems(validator, document) == []  # ...and the schema says so


@pytest.mark.parametrize("document", [
    {**BASE, "stages": [{"train": {}}], "colour": "blue"},
    {**BASE, "stages": [{"train": {}, "colour": "blue"}]},
    {**BASE, "stages": [{"train": {}, "gate": {"max_metric_drop": 0.1, "colour": "blue"}}]},
    {**BASE, "stages": [{"train": {"colour": "blue"}}]},
], ids=["top", "stage-entry", "gate", "stage-params"])
def test_the_schema_still_refuses_unknown_keys(validator, document):
    assert any("colour" in problem for problem in _problems(validator, document))


# YAML 1.1 (yaml.safe_load) reads 1e-3 as a string that pydantic takes as a number; the
# schema, like a YAML 1.2 editor, wants the number itself: those mutants prove nothing here
_NUMERIC_TEXT = re.compile(r"^[-+]?(\d[\d_]*)?\.?\d*([eE][-+]?\d+)?$")


def _numeric_strings(value) -> bool:
    if isinstance(value, dict):
        return any(_numeric_strings(v) for v in value.values())
    if isinstance(value, list):
        return any(_numeric_strings(v) for v in value)
    return isinstance(value, str) and bool(value) and bool(_NUMERIC_TEXT.match(value))


def test_the_schema_accepts_every_mutant_that_validates(tmp_path, validator, plugins):
    flagged, checked = [], 0
    for mutant in mutants(200):
        if mutant.overrides:
            continue
        path = write_mutant(mutant, tmp_path)
        try:
            validate(path, plugins=plugins)
        except CompressflowError:
            continue
        document = yaml.safe_load(mutant.data)
        if _numeric_strings(document):
            continue
        checked += 1
        problems = _problems(validator, document)
        if problems:
            flagged.append(f"#{mutant.index} {mutant.source.name} {mutant.ops}: {problems[0]}")
    assert checked > 20
    assert not flagged, "\n".join(flagged[:5])
