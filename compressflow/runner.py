"""Running a validated Plan: the input model first, then each stage, each measured and logged.

A stage gets a copy of the previous model, so every earlier model stays as it was (for
``ctx.model_at`` and for MLflow). A stage that raises leaves its run FAILED with the
traceback as ``error.txt``; everything logged before it stays. With ``reuse``, a stage whose
key (see :func:`compressflow.engine.stage_key`) was already logged in the experiment is not
run again: its model and figures are taken from that run, which a tag names.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import yaml

from compressflow.engine import Plan, PlannedStage, source_context
from compressflow.errors import CompressflowError, ConfigError, StageFailed
from compressflow.gates import GateFailed, gate_failures
from compressflow.measure import measure_model, ratios_to_input
from compressflow.report import stage_chart, summary_markdown
from compressflow.stage import DataBundle, DataSpec, ModelSpec, PipelineContext, StageContext, StageResult
from compressflow.tracking import DEFAULT_URI, LoggedStage, Tracker, flatten, git_commit

if TYPE_CHECKING:
    from torch import nn

INPUT = "input"


class PipelineRunner:
    """Runs one Plan into one MLflow parent run.

    ``reuse``: take a stage's result from an earlier run with the same key. ``lock(key)``:
    held while a stage is looked up, computed and logged, so that parallel runs of a sweep
    compute each shared stage once. ``tags``/``params``: added to the parent run.
    """

    def __init__(self, plan: Plan, tracking_uri: str | None = None, experiment: str | None = None,
                 *, reuse: bool = False, lock: Callable[[str], ContextManager] | None = None,
                 tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                 register: bool = True, run_name: str | None = None):
        spec = plan.spec
        self.plan, self.spec, self.plugins = plan, spec, plan.plugins
        self.uri = tracking_uri or spec.tracking.uri or DEFAULT_URI
        self.experiment = experiment or spec.tracking.experiment or spec.name
        self.ctx = PipelineContext(spec, plan.file.path, self.uri, self.experiment)
        self.reuse, self.lock = reuse, lock or (lambda key: contextlib.nullcontext())
        self.extra_tags, self.extra_params = tags or {}, params or {}
        self.register_model = register and spec.registration is not None
        self.run_name = run_name or spec.name
        self.models: dict[str, nn.Module] = {}
        self.data_cache: dict[str, DataBundle] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="compressflow-"))
        self.tracker: Tracker | None = None
        self.reused: list[str] = []
        self.model_uris: dict[str, str | None] = {}

    # --- what stages may ask for ----------------------------------------------------------

    def build_model(self, model_spec: ModelSpec, place: str = "model") -> nn.Module:
        """Load a model through its source plugin; a failure is the user's input, exit 2."""
        source = self.plugins.model_sources.get(model_spec.scheme, place)
        load = source.load if hasattr(source, "load") else source
        context = source_context(self.plan.file, model_spec, place, self.uri,
                                 lambda inner: self.build_model(inner, place))
        try:
            return load(model_spec.reference, model_spec.args, context)
        except CompressflowError:
            raise
        except Exception as error:
            raise ConfigError(
                f"{place}: model source '{model_spec.source}' failed: {type(error).__name__}: {error}",
                "check the reference and args; COMPRESSFLOW_DEBUG=1 shows the traceback",
            ) from error

    def data_for(self, data_spec: DataSpec) -> DataBundle:
        """The loaders for ``data_spec``, built once per distinct spec."""
        key = data_spec.model_dump_json()
        if key not in self.data_cache:
            factory = self.plugins.datasets.get(data_spec.dataset)
            input_shape = getattr(self.models.get(INPUT), "input_shape", None)
            try:
                self.data_cache[key] = factory(data_spec, self.spec.seed, input_shape)
            except CompressflowError:
                raise
            except Exception as error:
                raise ConfigError(
                    f"dataset '{data_spec.dataset}' failed: {type(error).__name__}: {error}",
                    "check the data settings; COMPRESSFLOW_DEBUG=1 shows the traceback",
                ) from error
        return self.data_cache[key]

    def evaluate(self, model: nn.Module, loader: Any = None) -> dict[str, float]:
        """The task metric and the extra metrics on ``loader`` (default: validation)."""
        loader = loader if loader is not None else self.data_for(self.spec.data).val
        names = [self.spec.evaluation.metric, *self.spec.evaluation.extra]
        model.eval()
        return {name: float(self.plugins.metrics.get(name).fn(model, loader)) for name in names}

    def model_at(self, ref: str, current: str) -> nn.Module:
        """A copy of the model after stage ``ref`` (``previous``: the one before ``current``)."""
        names = list(self.models)
        if ref == "previous":
            ref = names[-1]
        if ref not in self.models:
            raise ConfigError(f"stage '{current}': no model '{ref}' yet", f"known: {', '.join(names)}")
        return copy.deepcopy(self.models[ref])

    # --- the run --------------------------------------------------------------------------

    def run(self) -> PipelineContext:
        """Preflight (input model and data, exit 2 on failure), then every stage in order."""
        import torch

        torch.manual_seed(self.spec.seed)
        self.models[INPUT] = self.build_model(self.spec.model, self.plan.file.place(("model",)))
        for data_spec in [self.spec.data, *(p.data for p in self.plan.stages)]:
            self.data_for(data_spec)  # a bad data setting is bad input: found before any run
        self.tracker = Tracker(self.uri, self.experiment, self.spec.tracking.log_models)
        self.ctx.run_id = self.tracker.start_pipeline(
            self.run_name, {**self._tags(), **self.extra_tags}, {**self._params(), **self.extra_params})
        self._log_pipeline_files()
        self.plugins.pipeline_start(self.ctx)
        status = "FAILED"
        try:
            self._run_input()
            for planned in self.plan.stages:
                self._run_stage(planned)
            status = "FINISHED"
            if self.register_model:
                self._register()
        finally:
            self._log_summary()
            self.tracker.end_pipeline(status)
            self.plugins.pipeline_end(self.ctx, status)
        return self.ctx

    def cleanup(self) -> None:
        """Remove the stages' work folders (their files are logged; results still name them)."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _tags(self) -> dict[str, str]:
        import compressflow

        tags = {
            "compressflow.pipeline_hash": self.plan.file.content_hash(),
            "compressflow.version": compressflow.__version__,
            "compressflow.pipeline_file": str(self.plan.file.path),
        }
        commit = git_commit(self.plan.file.path.resolve().parent)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        return tags

    def _params(self) -> dict[str, Any]:
        return {
            "seed": self.spec.seed,
            "model.source": self.spec.model.source,
            "data.dataset": self.spec.data.dataset,
            "stages": " -> ".join(f"{p.entry.name}:{p.stage.kind}/{p.stage.method}"
                                  for p in self.plan.stages),
        }

    def _log_pipeline_files(self) -> None:
        resolved = {k: v for k, v in self.plan.file.raw.items() if k != "sweep"}
        resolved["stages"] = [
            {"name": p.entry.name, p.stage.kind: {"method": p.stage.method,
                                                 **p.stage.params.model_dump(mode="json")},
             **({"data": p.entry.data} if p.entry.data else {}),
             **({"gate": p.entry.gate.model_dump(mode="json")} if p.entry.gate else {})}
            for p in self.plan.stages
        ]
        self.tracker.log_text(self.plan.file.text, "pipeline.yaml")
        self.tracker.log_text(yaml.safe_dump(resolved, sort_keys=False), "pipeline.resolved.yaml")

    def _run_input(self) -> None:
        params = flatten("model", self.spec.model.model_dump(mode="json"))
        with self.lock(self.plan.input_key):
            found = self._find(self.plan.input_key)
            self.tracker.start_stage(INPUT, params, self._stage_tags("input", self.plan.input_key, found))
            try:
                result = self._reused(found) if found else StageResult(model=self.models[INPUT])
                self._measure_and_log(INPUT, "input", result, found)
            except BaseException:
                self.tracker.log_text(traceback.format_exc(), "error.txt")
                self.tracker.end_stage("FAILED")
                raise
        self.tracker.end_stage()

    def _find(self, key: str) -> LoggedStage | None:
        return self.tracker.find_stage(key) if self.reuse else None

    def _stage_tags(self, kind: str, key: str, found: LoggedStage | None) -> dict[str, str]:
        tags = {"compressflow.kind": kind, "compressflow.stage_key": key}
        if found:
            tags["compressflow.reused_from"] = found.run_id
        return tags

    def _reused(self, found: LoggedStage) -> StageResult:
        return StageResult(model=self.tracker.load_model(found.model_uri), metrics=found.metrics,
                           notes=[f"reused run {found.run_id}: same input, params, plugin and data"])

    def _stage_context(self, planned: PlannedStage) -> StageContext:
        name = planned.entry.name
        stage = planned.stage
        return StageContext(
            name=name,
            seed=self.spec.seed + planned.entry.index + 1,
            workdir=Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)),
            metric=self.spec.evaluation.metric,
            data=lambda: self.data_for(planned.data),
            evaluate=self.evaluate,
            model_at=lambda ref: self.model_at(ref, name),
            build_model=lambda spec: self.build_model(spec, f"stage '{name}'"),
            log_metric=self.tracker.log_metric,
            log_metrics=self.tracker.log_metrics,
            progress=lambda step, total, figures: self.plugins.stage_progress(
                stage, step, total, figures),
        )

    def _run_stage(self, planned: PlannedStage) -> None:
        stage, entry = planned.stage, planned.entry
        params = flatten("", stage.params.model_dump(mode="json"))
        params.update(flatten("data", entry.data or {}))
        previous = list(self.models)[-1]
        with self.lock(planned.key):
            found = self._find(planned.key)
            tags = {**self._stage_tags(stage.kind, planned.key, found),
                    "compressflow.method": stage.method, "compressflow.plugin": str(planned.provider)}
            self.tracker.start_stage(entry.name, params, tags)
            self.plugins.stage_start(stage, self.ctx)
            try:
                result = self._reused(found) if found else self._compute(planned, previous)
                self._measure_and_log(entry.name, f"{stage.kind}/{stage.method}", result, found)
            except BaseException as error:
                self._fail(planned, error)
        failures = self._check_gate(planned, previous)
        self.tracker.end_stage()
        self.plugins.stage_end(stage, result, self.ctx)
        if failures and entry.gate.on_fail == "stop":
            raise GateFailed(
                f"stage '{entry.name}' failed its gate against '{entry.gate.against}': "
                + "; ".join(failures),
                "the pipeline stopped here (exit 3); every run so far is logged. "
                "Use `gate: {on_fail: continue}` to record and go on")

    def _compute(self, planned: PlannedStage, previous: str) -> StageResult:
        import torch

        stage_ctx = self._stage_context(planned)
        torch.manual_seed(stage_ctx.seed)
        result = planned.stage.run(copy.deepcopy(self.models[previous]), stage_ctx)
        if not isinstance(result, StageResult):
            raise TypeError(f"run() returned {type(result).__name__}, not a StageResult")
        return result

    def _fail(self, planned: PlannedStage, error: BaseException) -> None:
        stage, entry = planned.stage, planned.entry
        self.tracker.log_text(traceback.format_exc(), "error.txt")
        self.tracker.end_stage("FAILED" if isinstance(error, Exception) else "KILLED")
        self.plugins.stage_error(stage, error, self.ctx)
        if not isinstance(error, Exception):
            raise error
        # a stage failing at run time exits 1, even when it blames its input
        cause = error.message if isinstance(error, CompressflowError) else f"{type(error).__name__}: {error}"
        hint = f"{error.hint}; " if isinstance(error, CompressflowError) and error.hint else ""
        raise StageFailed(
            f"stage '{entry.name}' ({stage.kind}/{stage.method}, {planned.provider}) failed: {cause}",
            f"{hint}its MLflow run {self.tracker.last_stage_id} is FAILED with error.txt; every "
            "earlier stage's run and model is kept. COMPRESSFLOW_DEBUG=1 shows the traceback",
        ) from error

    def _check_gate(self, planned: PlannedStage, previous: str) -> list[str]:
        gate = planned.entry.gate
        if gate is None:
            return []
        against = previous if gate.against == "previous" else gate.against
        metric = self.spec.evaluation.metric
        failures = gate_failures(gate, self.ctx.results[planned.entry.name].metrics,
                                 self.ctx.results[against].metrics, metric,
                                 self.plugins.metrics.get(metric).higher_is_better)
        self.tracker.set_tags({"compressflow.gate": "failed" if failures else "passed"})
        if failures:
            self.tracker.log_text("\n".join(failures) + "\n", "gate.txt")
            self.ctx.gate_failures.append(planned.entry.name)
            self.ctx.summary[-1]["notes"] += " gate failed: " + "; ".join(failures)
        return failures

    def _measure_and_log(self, name: str, method: str, result: StageResult,
                         found: LoggedStage | None) -> None:
        bundle = self.data_for(self.spec.data)
        example = bundle.example_input(1)
        if found:
            # reused: the figures were measured when that run computed this very model
            self.tracker.log_metrics(result.metrics)
            self.tracker.set_tags({"compressflow.model_uri": found.model_uri})
            self.model_uris[name] = found.model_uri
            self.reused.append(name)
        else:
            measure = self.spec.measure
            figures = self.evaluate(result.model)
            figures.update(measure_model(result.model, example, bundle.example_input(64),
                                         latency=measure.latency, threads=measure.threads,
                                         warmup=measure.warmup, repeats=measure.repeats))
            if name != INPUT:
                self._compare_to_input(figures, result)
            figures.update(result.metrics)
            result.metrics = figures
            self.tracker.log_metrics(figures)
            self.model_uris[name] = self.tracker.log_model(result.model, example)
            for artifact in result.artifacts.values():
                self.tracker.log_file(Path(artifact))
        if result.notes:
            self.tracker.log_text("\n".join(result.notes) + "\n", "notes.txt")
        self.models[name] = result.model
        self.ctx.results[name] = result
        self.ctx.summary.append(self._summary_row(name, method, result))

    def _compare_to_input(self, figures: dict[str, float], result: StageResult) -> None:
        metric = self.spec.evaluation.metric
        start = self.ctx.results[INPUT].metrics
        figures.update(ratios_to_input(figures, start))
        figures[f"{metric}_delta"] = figures[metric] - start[metric]
        if result.metrics.get("compressed_bytes"):
            # a packed file stands against the input's serialized state dict
            figures["compressed_ratio"] = start["size_bytes"] / result.metrics["compressed_bytes"]
        before = list(self.ctx.results.values())[-1].metrics
        if figures["sparsity"] > before["sparsity"] + 1e-3 and figures["size_bytes"] >= before["size_bytes"]:
            result.notes.append(
                f"sparsity rose to {figures['sparsity']:.1%} but the model is not smaller on "
                "disk: its tensors are stored densely, zeros included")

    def _summary_row(self, name: str, method: str, result: StageResult) -> dict[str, Any]:
        figures, metric = result.metrics, self.spec.evaluation.metric
        return {"stage": name, "method": method, metric: figures[metric],
                "size_bytes": int(figures["size_bytes"]), "sparsity": figures["sparsity"],
                "macs": int(figures["macs"]), "latency_ms_b1": figures.get("latency_ms_b1"),
                "size_ratio": figures.get("size_ratio", 1.0),
                "compressed_bytes": figures.get("compressed_bytes"),
                "compressed_ratio": figures.get("compressed_ratio"),
                "latency_b1_speedup": figures.get("latency_b1_speedup", 1.0),
                "reused": name in self.reused, "notes": " ".join(result.notes)}

    def _register(self) -> None:
        register = self.spec.registration
        uri = self.model_uris[list(self.ctx.results)[-1]]
        if uri is None:
            raise ConfigError("register: the final model was not logged (tracking.log_models is off)",
                              "turn tracking.log_models on to register a model")
        version = self.tracker.register(uri, register.name, register.alias)
        self.tracker.set_tags({"compressflow.registered": f"{register.name}/{version}"})

    def _log_summary(self) -> None:
        import json

        if not self.ctx.summary:
            return
        self.tracker.log_text(json.dumps(self.ctx.summary, indent=2), "summary.json")
        self.tracker.log_text(summary_markdown(self.ctx.summary), "summary.md")
        self.tracker.log_file(stage_chart(self.ctx.summary, self.spec.evaluation.metric,
                                          self.spec.name, self.workdir / "stages.png"))
        final = {k: v for k, v in self.ctx.summary[-1].items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tracker.log_metrics(final)
        final_stage = self.ctx.summary[-1]["stage"]
        tags = {"compressflow.final_stage": final_stage,
                "compressflow.gate": "failed" if self.ctx.gate_failures else "passed"}
        if self.model_uris.get(final_stage):
            tags["compressflow.final_model_uri"] = self.model_uris[final_stage]
        self.tracker.set_tags(tags)
