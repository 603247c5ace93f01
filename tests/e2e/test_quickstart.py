"""The quickstart through the CLI into a real sqlite store, read back with MlflowClient."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

STAGE_METRICS = {"accuracy", "loss", "params_total", "params_nonzero", "sparsity", "size_bytes",
                 "macs", "latency_ms_b1", "latency_ms_b64"}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    from typer.testing import CliRunner

    from compressflow.cli import app

    folder = tmp_path_factory.mktemp("quickstart")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = CliRunner().invoke(app, ["run", str(REPO / "pipelines/quickstart.yaml"),
                                      "--tracking-uri", uri, "--quiet"])
    assert result.exit_code == 0, result.output
    return uri, result


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_summary_table_printed(quickstart):
    _, result = quickstart
    for name in ("input", "baseline", "student", "2-prune", "3-finetune", "4-quantize"):
        assert name in result.stdout
    assert "not smaller on disk" in result.stdout


def test_lineage_in_mlflow(quickstart):
    uri, _ = quickstart
    client, parents, children = _runs(uri)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["compressflow.pipeline_hash"]
    assert parent.data.tags["compressflow.version"]
    # the UI's Source column names the pipeline file, not the Python module that ran it
    assert parent.data.tags["mlflow.source.name"].endswith("pipelines/quickstart.yaml")
    assert parent.data.tags["compressflow.task"] == "classification"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pipeline.yaml", "pipeline.resolved.yaml", "summary.md", "summary.json"} <= artifacts
    names = [r.info.run_name for r in sorted(children, key=lambda r: r.info.start_time)]
    assert names == ["input", "baseline", "student", "2-prune", "3-finetune", "4-quantize"]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert STAGE_METRICS <= set(run.data.metrics), run.info.run_name
        # the data the stage used, as MLflow dataset inputs (the UI's Dataset column)
        assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["digits"], run.info.run_name
    by_name = {r.info.run_name: r for r in children}
    assert by_name["4-quantize"].data.metrics["size_bytes"] < by_name["3-finetune"].data.metrics["size_bytes"]
    assert by_name["2-prune"].data.metrics["sparsity"] > 0.75
    assert by_name["2-prune"].data.params["sparsity"] == "0.8"
    # training curves: one point an epoch
    history = client.get_metric_history(by_name["baseline"].info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 31))


def test_every_logged_model_reproduces_its_accuracy(quickstart):
    import mlflow.pytorch

    from compressflow.stage import DataSpec
    from compressflow_data import digits
    from compressflow_tasks import accuracy

    uri, _ = quickstart
    _, _, children = _runs(uri)
    mlflow.set_tracking_uri(uri)
    bundle = digits(DataSpec(dataset="digits"), 0, None)
    for run in children:
        model = mlflow.pytorch.load_model(run.data.tags["compressflow.model_uri"])
        assert accuracy(model.eval(), bundle.val) == pytest.approx(run.data.metrics["accuracy"]), \
            run.info.run_name
