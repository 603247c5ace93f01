"""MLflow, as docs/architecture.md lays it out: one parent run a pipeline, one nested run a stage.

Only this module, :mod:`compressflow.store` (the store's creation, checks and runs left by
dead processes) and the mlflow model source talk to MLflow, and a model that logs itself in
its users' flavor too (``log_mlflow_flavors``: an ONNX graph). Models are logged with
``serialization_format="pickle"`` (the pt2 format fails on torch.ao quantized models) and
explicit ``pip_requirements`` (inferring them costs seconds a call).
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressflow import store
from compressflow.errors import StoreUnreachable
from compressflow.interrupts import interrupts_deferred

DEFAULT_URI = "sqlite:///mlflow.db"
MODEL_NAME = "model"


class Tag:
    """Every tag compressflow writes, in one place so that its writers and readers agree."""

    PIPELINE_HASH = "compressflow.pipeline_hash"
    PIPELINE_FILE = "compressflow.pipeline_file"
    VERSION = "compressflow.version"
    KIND = "compressflow.kind"
    METHOD = "compressflow.method"
    PLUGIN = "compressflow.plugin"
    STAGE_KEY = "compressflow.stage_key"
    REUSED_FROM = "compressflow.reused_from"
    MODEL_URI = "compressflow.model_uri"
    GATE = "compressflow.gate"
    FINAL_STAGE = "compressflow.final_stage"
    FINAL_MODEL_URI = "compressflow.final_model_uri"
    REGISTERED = "compressflow.registered"
    SWEEP_ID = "compressflow.sweep_id"
    VARIANT = "compressflow.variant"
    SELECTED_RUN = "compressflow.selected_run"
    TASK = "compressflow.task"
    METRIC = "compressflow.metric"
    HIGHER_IS_BETTER = "compressflow.higher_is_better"
    GIT_COMMIT = "mlflow.source.git.commit"
    SOURCE_NAME = "mlflow.source.name"
    SOURCE_TYPE = "mlflow.source.type"
    # who opened a run, so that a later command can close the runs of a killed process
    PID = "compressflow.pid"
    HOST = "compressflow.host"
    PROCESS_START = "compressflow.process_start"


@dataclass
class LoggedStage:
    """A finished stage run found in the store, whose result another run may reuse."""

    run_id: str
    model_uri: str | None
    metrics: dict[str, float]
    gate_failed: bool = False


_PARAM_KEY = re.compile(r"^[\w\-. :/]+$")  # what MLflow accepts in a param's name


def _whole(write):
    """A write to the store that a signal does not cut in half: SIGINT and SIGTERM wait until
    it is done. A sqlite transaction cut by a signal keeps the store locked against the
    write that then marks the runs KILLED (``database is locked``). A server that does not
    answer is :class:`StoreUnreachable` (:func:`_answered`)."""

    answered = _answered(write)

    @functools.wraps(write)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        with interrupts_deferred():
            return answered(self, *args, **kwargs)

    return wrapper


def _answered(call):
    """``call`` (a Tracker method), with a server that cannot be reached or keeps failing
    after MLflow's retries raised as one :class:`StoreUnreachable` naming the server."""

    @functools.wraps(call)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(self, *args, **kwargs)
        except Exception as error:
            reason = unreachable(error)
            if reason is None:
                raise
            raise StoreUnreachable(
                f"tracking server {self.uri} stopped answering ({call.__name__}): {reason}",
                "every run it holds stays as it is; once it answers again, run the same "
                "command with --resume to continue from the last finished stage") from error

    return wrapper


def duplicate_key(error: BaseException) -> bool:
    """Whether a store call failed on a unique key (PostgreSQL's and sqlite's words for it)."""
    text = str(error)
    return "duplicate key value" in text or "UNIQUE constraint failed" in text


def unreachable(error: BaseException) -> str | None:
    """Why a store call failed when the cause is the connection (refused, reset, timed out,
    retries spent on 5xx answers), found along the exception's chain; else None."""
    import requests

    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            text = str(seen)
            for marker in ("Connection refused", "timed out", "Connection reset", "Name or service"):
                if marker in text:
                    return marker.lower()
            return type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, for MLflow params. A mapping whose keys MLflow
    cannot name (layer patterns such as ``features.*``) stays one param, as JSON."""
    if isinstance(value, dict):
        if not all(_PARAM_KEY.match(str(key)) for key in value):
            return {prefix: json.dumps(value, sort_keys=True)}
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: value}


def git_commit(folder: Path) -> str | None:
    """The commit of the git checkout holding ``folder``, if there is one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def open_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created with ``artifact_location`` if it is new (an
    existing one keeps the location it was created with: MLflow cannot move it)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it just now
        if found is None:
            raise
        return found.experiment_id


class Tracker:
    """Opens and closes the runs of one pipeline and logs into the current one.

    ``artifacts``: where a new experiment keeps its artifacts (``tracking.artifacts``; see
    :func:`compressflow.store.artifact_root`): by default beside a sqlite store, never in the
    current folder.
    """

    def __init__(self, uri: str, experiment: str, log_models: bool = True,
                 artifacts: str | None = None) -> None:
        import mlflow

        store.quiet_mlflow_logs()
        store.prepare(uri)

        self.mlflow = mlflow
        self.uri, self.experiment, self.log_models = uri, experiment, log_models
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        self.experiment_id = open_experiment(client, experiment, store.artifact_root(uri, artifacts))
        mlflow.set_experiment(experiment_id=self.experiment_id)
        store.close_dead_runs(client, [self.experiment_id])
        self.parent_id: str | None = None
        self.stage_id: str | None = None
        self.last_stage_id: str | None = None

    @_whole
    def start_pipeline(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        """Open the parent run; returns its id."""
        run = self.mlflow.start_run(run_name=run_name, tags={**tags, **store.process_tags()})
        self.parent_id = run.info.run_id
        self.mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        return self.parent_id

    @_whole
    def start_stage(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Open a nested run under the parent; returns its id."""
        run = self.mlflow.start_run(run_name=name, nested=True, tags={**tags, **store.process_tags()})
        self.stage_id = self.last_stage_id = run.info.run_id
        if params:
            self.mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        return self.stage_id

    @_whole
    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        """One figure into the open stage run (or the parent between stages)."""
        self.mlflow.log_metric(name, float(value), step=step)

    @_whole
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Several figures at once into the open run (one write to the store)."""
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    @_whole
    def log_text(self, text: str, name: str) -> None:
        """A text artifact of the open run."""
        self.mlflow.log_text(text, name)

    @_whole
    def log_file(self, path: Path, folder: str | None = None) -> None:
        """A file artifact of the open run."""
        self.mlflow.log_artifact(str(path), folder)

    @_whole
    def log_model(self, model: Any, example: Any, feed: Any = None) -> str | None:
        """The model of the open stage run, with a signature of ``example`` (inputs in any
        form the task feeds) and of its outputs; returns its URI."""
        if not self.log_models:
            return None
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        import compressflow
        from compressflow.task import call, to_numpy

        with torch.inference_mode():
            output = (feed or call)(model, example)
        signature = infer_signature(to_numpy(example), to_numpy(output))
        info = mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            signature=signature,
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"compressflow=={compressflow.__version__}"],
        )
        # MLflow 3 keeps logged models apart from runs: models:/<model_id> is their own address
        self.mlflow.set_tag(Tag.MODEL_URI, info.model_uri)
        if callable(getattr(model, "log_mlflow_flavors", None)):
            # a model its users load in another flavor (an ONNX graph: mlflow.onnx) logs that
            # too, beside the pickled module the engine reloads; it returns {tag: uri}
            self.mlflow.set_tags(model.log_mlflow_flavors(signature))
        return info.model_uri

    @_whole
    def end_stage(self, status: str = "FINISHED") -> None:
        """Close the open stage run with ``status``."""
        self.mlflow.end_run(status=status)
        self.stage_id = None

    def end_pipeline(self, status: str) -> None:
        """Close every run still open (a stage run first), the parent last."""
        while self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)
        self.parent_id = None

    @_whole
    def log_dataset(self, info: Any, context: str) -> None:
        """The data a stage used, as an MLflow dataset input (the UI's Dataset column)."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        source = CodeDatasetSource({"source": info.source, **{f"{k}_samples": str(v)
                                                              for k, v in info.splits.items()}})
        dataset = MetaDataset(source, name=info.name, digest=info.digest)
        for attempt in range(3):
            try:
                self.mlflow.log_input(dataset, context=context)
                return
            except Exception as error:
                # two runs logging one new dataset at once: the store checks, then inserts, and
                # the slower insert breaks the unique key; asked again, it finds the row
                if attempt == 2 or not duplicate_key(error):
                    raise
                time.sleep(0.2 * (attempt + 1))

    @_whole
    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags on the open run."""
        self.mlflow.set_tags(tags)

    @_answered
    def find_stage(self, key: str) -> LoggedStage | None:
        """A stage run of this experiment with ``key`` whose model is logged, if any.

        A run still open counts once its model is logged: a parallel sweep holds the stage's
        lock only until then, and the figures are logged before the model.
        """
        runs = self.mlflow.search_runs(
            experiment_ids=[self.experiment_id], output_format="list", max_results=20,
            filter_string=f"tags.`{Tag.STAGE_KEY}` = '{key}' and attributes.status != 'FAILED'",
        )
        for run in runs:
            if run.data.tags.get(Tag.MODEL_URI):
                # a reused run points on to the run that computed the model: name that one
                origin = run.data.tags.get(Tag.REUSED_FROM, run.info.run_id)
                return LoggedStage(origin, run.data.tags[Tag.MODEL_URI], dict(run.data.metrics))
        return None

    @_answered
    def unfinished_pipeline(self, pipeline_hash: str) -> str | None:
        """The parent run to resume: the latest run of the pipeline with ``pipeline_hash`` in
        this experiment, when it did not finish (None when it did, or there is none)."""
        from compressflow.errors import ConfigError

        runs = self.mlflow.search_runs(
            experiment_ids=[self.experiment_id], output_format="list", max_results=50,
            filter_string=f"tags.`{Tag.PIPELINE_HASH}` = '{pipeline_hash}'",
            order_by=["attributes.start_time DESC"])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        if not parents or parents[0].info.status == "FINISHED":
            return None
        latest = parents[0]
        if latest.info.status == "RUNNING":
            raise ConfigError(
                f"run {latest.info.run_id} of this pipeline is still running "
                f"(pid {latest.data.tags.get(Tag.PID, '?')} on {latest.data.tags.get(Tag.HOST, '?')})",
                "wait for it, or stop it (its runs are then marked KILLED) and resume")
        return latest.info.run_id

    def resume_pipeline(self, run_id: str) -> str:
        """Reopen the parent run ``run_id`` (RUNNING again, in this process)."""
        self.mlflow.start_run(run_id=run_id)
        self.parent_id = run_id
        from compressflow.store import process_tags

        self.mlflow.set_tags(process_tags())  # this process holds it now
        return run_id

    @_answered
    def finished_stages(self, parent_id: str) -> dict[str, LoggedStage]:
        """The stage runs under ``parent_id`` that finished with a logged model, by key."""
        runs = self.mlflow.search_runs(
            experiment_ids=[self.experiment_id], output_format="list", max_results=1000,
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'")
        return {r.data.tags[Tag.STAGE_KEY]: LoggedStage(r.info.run_id, r.data.tags[Tag.MODEL_URI],
                                                        dict(r.data.metrics),
                                                        r.data.tags.get(Tag.GATE) == "failed")
                for r in runs if r.data.tags.get(Tag.STAGE_KEY) and r.data.tags.get(Tag.MODEL_URI)}

    @_answered
    def load_model(self, uri: str) -> Any:
        """A model logged to this store."""
        import mlflow.pytorch

        return mlflow.pytorch.load_model(uri, map_location="cpu")

    def register(self, model_uri: str, name: str, alias: str | None) -> str:
        """Register ``model_uri`` as a new version of ``name`` (with ``alias``); its version."""
        version = self.mlflow.register_model(model_uri, name).version
        if alias:
            self.mlflow.MlflowClient(self.uri).set_registered_model_alias(name, alias, version)
        return str(version)
