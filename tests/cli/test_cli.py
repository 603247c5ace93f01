"""Thin commands: help without torch, validate without mlflow, plugins, schema, dry run."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, write_pipeline

PROBE = """
import sys
from typer.testing import CliRunner
from compressflow.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print(result.exit_code, 'torch' in sys.modules, 'mlflow' in sys.modules)
"""


def _imports(*args):
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO)
    return done.stdout.split()


def test_help_imports_neither_torch_nor_mlflow():
    assert _imports("--help") == ["0", "False", "False"]
    assert _imports("run", "--help") == ["0", "False", "False"]


def test_validate_does_not_import_mlflow(tmp_path):
    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}, {"prune": {"sparsity": 0.5}}])
    code, _torch, mlflow = _imports("validate", str(path))
    assert code == "0" and mlflow == "False"


def test_plugins_json_lists_methods_with_params(cli):
    result = cli("plugins", "--json")
    assert result.exit_code == 0
    listing = json.loads(result.stdout)
    prune = next(s for s in listing["stages"] if (s["kind"], s["method"]) == ("prune", "magnitude"))
    assert prune["distribution"] == "compressflow" and prune["default"] is True
    assert prune["params"]["scope"]["default"] == "global" and "sparsity" in prune["params"]
    table = cli("plugins")
    assert "prune/magnitude" in table.stdout and "distill/logits" in table.stdout
    idx = next(d for d in listing["datasets"] if d["name"] == "idx")
    assert idx["params"]["root"]["required"] and idx["tasks"] == []  # any task may read it
    embedding = next(t for t in listing["tasks"] if t["name"] == "embedding")
    assert embedding["default_metric"] == "cosine_mean"
    assert embedding["metrics"]["cosine_min"]["higher_is_better"] is True
    for word in ("causal-lm", "perplexity", "image-folder", "eval_paths"):
        assert word in table.stdout, word


def test_schema_has_every_stage_params(cli):
    result = cli("schema")
    assert result.exit_code == 0
    text = result.stdout
    schema = json.loads(text)
    assert "stages" in schema["properties"]
    for word in ("sparsity", "temperature", "dynamic-int8", "train_fraction"):
        assert word in text
    # a dataset's args and a task's params depend on the one named: each one's schema
    assert "root" in schema["x-dataset-args"]["idx"]["properties"]
    assert schema["x-dataset-args"]["csv"]["required"] == ["path", "label"]
    assert set(schema["x-task-params"]) >= {"classification", "embedding", "causal-lm"}


def test_validate_and_dry_run_print_the_plan(tmp_path, cli, store):
    path = write_pipeline(tmp_path, [{"name": "base", "train": {"epochs": 1}}, {"prune": {"sparsity": 0.5}}])
    result = cli("validate", path)
    assert result.exit_code == 0 and "base (train/supervised) -> 1-prune (prune/magnitude)" in result.stdout
    dry = cli("run", path, "--dry-run", "--tracking-uri", store, "--set", "stages.1.prune.sparsity=0.7")
    assert dry.exit_code == 0 and "sparsity=0.7" in dry.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_run_with_set_and_experiment(tmp_path, cli, store):
    from mlflow.tracking import MlflowClient

    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}, {"prune": {"sparsity": 0.5}}])
    result = cli("run", path, "--tracking-uri", store, "--experiment", "other", "--quiet",
                 "--set", "stages.1.prune.sparsity=0.25")
    assert result.exit_code == 0, result.output
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("other").experiment_id],
                              filter_string="attributes.run_name = '1-prune'")
    assert runs[0].data.params["sparsity"] == "0.25"
    assert 0.2 < runs[0].data.metrics["sparsity"] < 0.25


def test_dry_run_says_nothing_is_reused_without_logged_models(tmp_path, cli, store):
    stages = [{"train": {"epochs": 1}}, {"prune": {"sparsity": 0.5}}]
    path = write_pipeline(tmp_path, stages, tracking={"log_models": False})
    dry = cli("run", path, "--dry-run", "--reuse", "--tracking-uri", store)
    assert dry.exit_code == 0, dry.output
    text = " ".join(dry.stdout.split())
    assert "tracking.log_models is false" in text and "nothing will be reused" in text
    logged = cli("run", write_pipeline(tmp_path, stages, name="logged"), "--dry-run", "--tracking-uri", store)
    assert logged.exit_code == 0 and "log_models" not in logged.stdout


def _trusted_only_pipeline(tmp_path):
    return write_pipeline(tmp_path, [{"train": {"epochs": 1}}],
                          model={"source": "import:compressflow_models.zoo:MLP", "args": {"hidden": [8]}})


def test_trusted_only_flag_refuses_import_sources_at_validate_and_run(tmp_path, cli, store, monkeypatch):
    monkeypatch.setenv("COMPRESSFLOW_TRUSTED_ONLY", "0")  # off, and unset again after the test
    path = _trusted_only_pipeline(tmp_path)
    assert cli("validate", path).exit_code == 0  # without the switch: by design, it runs
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "import:" in text)
    for command in (("validate", path, "--trusted-only"),
                    ("run", path, "--trusted-only", "--dry-run", "--tracking-uri", store)):
        monkeypatch.setenv("COMPRESSFLOW_TRUSTED_ONLY", "0")  # the flag alone switches it on
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert f"{path}:{line}: import: runs code named in the pipeline" in result.stderr
        assert "COMPRESSFLOW_TRUSTED_ONLY" in result.stderr and "Traceback" not in result.output


def test_trusted_only_env_var_refuses_import_sources(tmp_path):
    import os

    path = _trusted_only_pipeline(tmp_path)
    env = {**os.environ, "COMPRESSFLOW_TRUSTED_ONLY": "1"}
    done = subprocess.run([sys.executable, "-m", "compressflow", "validate", str(path)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 2 and "import: runs code named in the pipeline" in done.stderr
