"""What goes to MLflow: params MLflow can name, dataset inputs, the tag constants."""

from __future__ import annotations

import json

import pytest

from compressflow.tracking import Tag, flatten


def test_flatten_names_nested_params_and_keeps_pattern_keys_whole():
    params = {"bits": 5, "layer_bits": {"features.*": 8}, "per_layer": {"features.0": 0.3}}
    flat = flatten("", params)
    assert flat["bits"] == 5 and flat["per_layer.features.0"] == 0.3
    assert json.loads(flat["layer_bits"]) == {"features.*": 8}  # '*' is no MLflow name


def test_a_stage_with_layer_patterns_logs_its_params(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner
    from tests.conftest import write_pipeline

    path = write_pipeline(tmp_path, [
        {"train": {"epochs": 1}},
        {"name": "shared", "quantize": {"method": "kmeans", "bits": 4, "layer_bits": {"layers.*": 3},
                                        "finetune_epochs": 0}}], tracking={"log_models": False})
    ctx = PipelineRunner(validate(path), tracking_uri=store).run()
    client = MlflowClient(store)
    run = next(r for r in client.search_runs([client.get_experiment_by_name("test").experiment_id])
               if r.info.run_name == "shared")
    assert json.loads(run.data.params["layer_bits"]) == {"layers.*": 3}
    assert run.data.tags[Tag.KIND] == "quantize" and ctx.results["shared"].metrics["accuracy"] > 0


def test_a_connection_failure_anywhere_in_the_chain_is_told_and_others_are_not():
    import requests
    from mlflow.exceptions import MlflowException

    from compressflow.tracking import unreachable

    def mlflow_call(cause: Exception):
        try:
            raise cause
        except Exception:  # MLflow's rest_utils wraps without `from`: only __context__ links
            raise MlflowException("API request to http://h/api failed with exception ...")

    for cause, said in ((requests.ConnectionError("[Errno 111] Connection refused"), "connection refused"),
                        (requests.Timeout("Read timed out. (read timeout=30)"), "timed out"),
                        (requests.exceptions.RetryError("too many 503 error responses"), "RetryError")):
        with pytest.raises(MlflowException) as caught:
            mlflow_call(cause)
        assert unreachable(caught.value) == said
    with pytest.raises(MlflowException) as caught:
        mlflow_call(ValueError("RESOURCE_DOES_NOT_EXIST"))
    assert unreachable(caught.value) is None


def test_a_dataset_another_run_is_inserting_at_the_same_time_is_logged_on_a_second_try(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from compressflow.data import DataInfo
    from compressflow.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "race", log_models=False)
    run_id = tracker.start_pipeline("p", {}, {})
    real, calls = tracker.mlflow.log_input, []

    def racing(dataset, context=None):
        calls.append(context)
        if len(calls) == 1:  # what the store answers the slower of two inserts
            raise MlflowException("(psycopg.errors.UniqueViolation) duplicate key value violates "
                                  'unique constraint "dataset_pk"')
        return real(dataset, context=context)

    monkeypatch.setattr(tracker.mlflow, "log_input", racing)  # the mlflow module: restored after
    tracker.log_dataset(DataInfo("digits", "abc123", "sklearn"), "train")
    assert calls == ["train", "train"]
    (found,) = tracker.mlflow.get_run(run_id).inputs.dataset_inputs
    assert (found.dataset.name, found.dataset.digest) == ("digits", "abc123")

    def refusing(dataset, context=None):
        calls.append(context)
        raise MlflowException("INVALID_PARAMETER_VALUE: something else")

    calls.clear()
    monkeypatch.setattr(tracker.mlflow, "log_input", refusing)
    with pytest.raises(MlflowException, match="something else"):
        tracker.log_dataset(DataInfo("digits", "def456", "sklearn"), "train")
    assert calls == ["train"]  # only the race is asked again
    tracker.end_pipeline("FINISHED")
